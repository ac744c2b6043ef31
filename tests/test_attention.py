"""Causal self-attention on the GPU (llmc/ops/attention.py) against the NumPy reference.

Checks, for the matmul method in fp32 and bf16 (and the flash method in bf16 when
llmc/ops/flash_attention.py exists): out, the saved softmax probabilities (matmul: zeros above
the diagonal included) and dqkv, against llmc.model.reference.attention_forward/backward evaluated in
float64 on the very values the kernels see (inputs rounded to the storage dtype first). Every
output, saved and scratch buffer is poisoned with NaN first; shapes are a production one (B=4,
T=1024, C=768, NH=12) and awkward ones (T=1, T=17, C=96 with NH=2). Also: two layers sharing one
scratch dict, method resolution, buffer specs and argument validation.

Run: pytest tests/test_attention.py        (the gpu tests skip without a CUDA device)
"""
import numpy as np
import pytest

from llmc.model import reference
from llmc.ops import attention as attn
from tests.gpu_arrays import DTYPES, device, host, poison
from tests.tolerances import assert_close

# (B, T, C, NH): production, then awkward (T=1, T not a multiple of a warp, small odd heads)
SHAPES = [(4, 1024, 768, 12), (2, 1, 96, 2), (3, 17, 96, 2), (2, 17, 768, 12), (1, 100, 96, 2)]
# the flash kernel takes HS = 64 only
FLASH_SHAPES = [(4, 1024, 768, 12), (2, 1, 128, 2), (3, 17, 128, 2), (1, 200, 768, 12)]

FLASH_SKIP = pytest.mark.skipif(not attn.flash_available(),
                                reason="llmc/ops/flash_attention.py or kernels/flash_attention.cu "
                                       "not present: flash method not built yet")


def rounded(x, dtype):
    """x (float64) rounded to the storage dtype: (storage array, float64 of the same values)."""
    s = np.asarray(x).astype(DTYPES[dtype])
    return s, s.astype(np.float64)


def allocate_poisoned(spec):
    return {k: poison(v) for k, v in attn.allocate(spec).items()}


def make_inputs(B, T, C, dtype, seed):
    rng = np.random.default_rng(seed)
    qkv_s, qkv = rounded(rng.standard_normal((B, T, 3 * C)), dtype)
    dout_s, dout = rounded(rng.standard_normal((B, T, C)), dtype)
    return qkv_s, qkv, dout_s, dout


def run_layer(B, T, C, NH, dtype, method, qkv_s, dout_s, scratch=None):
    """Forward then backward through the public API; returns (out, saved, dqkv) on the device."""
    import cupy
    dt = DTYPES[dtype]
    if scratch is None:
        scratch = allocate_poisoned(attn.attention_scratch(B, T, C, NH, dt, method))
    saved = allocate_poisoned(attn.attention_buffers(B, T, C, NH, dt, method))
    qkv = device(qkv_s)
    dout = device(dout_s)
    out = poison(cupy.empty((B, T, C), dtype=dt))
    dqkv = poison(cupy.empty((B, T, 3 * C), dtype=dt))
    attn.attention_forward(out, saved, qkv, NH, scratch)
    attn.attention_backward(dqkv, dout, qkv, out, saved, NH, scratch)
    cupy.cuda.get_current_stream().synchronize()
    return out, saved, dqkv


def check_against_reference(B, T, C, NH, dtype, method, seed):
    qkv_s, qkv, dout_s, dout = make_inputs(B, T, C, dtype, seed)
    out, saved, dqkv = run_layer(B, T, C, NH, dtype, method, qkv_s, dout_s)
    out_ref, att_ref = reference.attention_forward(qkv, NH)
    dqkv_ref = reference.attention_backward(dout, qkv, att_ref, NH)
    assert_close(host(out), out_ref, dtype, f"out {method}")
    if method == "matmul":
        att = host(saved["att"])
        assert_close(att, att_ref, dtype, "att")
        upper = np.triu(np.ones((T, T), dtype=bool), k=1)
        assert np.all(att[..., upper] == 0), "att: entries above the diagonal must be exactly 0"
    else:
        assert np.all(np.isfinite(host(saved["lse"]))), "lse: non-finite values"
    assert_close(host(dqkv), dqkv_ref, dtype, f"dqkv {method}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%dC%dNH%d" % s)
def test_matmul_method(shape, dtype):
    B, T, C, NH = shape
    check_against_reference(B, T, C, NH, dtype, "matmul", seed=sum(shape) + len(dtype))


@pytest.mark.gpu
@FLASH_SKIP
@pytest.mark.parametrize("shape", FLASH_SHAPES, ids=lambda s: "B%dT%dC%dNH%d" % s)
def test_flash_method(shape):
    B, T, C, NH = shape
    check_against_reference(B, T, C, NH, "bf16", "flash", seed=sum(shape))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layers_share_scratch(dtype):
    """Two layers, one scratch dict: forward 1, forward 2, backward 2, backward 1 as in a model."""
    import cupy
    B, T, C, NH = 2, 65, 192, 3
    dt = DTYPES[dtype]
    scratch = allocate_poisoned(attn.attention_scratch(B, T, C, NH, dt, "matmul"))
    layers = []
    for seed in (1, 2):
        qkv_s, qkv, dout_s, dout = make_inputs(B, T, C, dtype, seed)
        saved = allocate_poisoned(attn.attention_buffers(B, T, C, NH, dt, "matmul"))
        out = poison(cupy.empty((B, T, C), dtype=dt))
        attn.attention_forward(out, saved, device(qkv_s), NH, scratch)
        layers.append((qkv_s, qkv, dout_s, dout, saved, out))
    for qkv_s, qkv, dout_s, dout, saved, out in reversed(layers):
        dqkv = poison(cupy.empty((B, T, 3 * C), dtype=dt))
        attn.attention_backward(dqkv, device(dout_s), device(qkv_s), out, saved, NH,
                                scratch)
        out_ref, att_ref = reference.attention_forward(qkv, NH)
        assert_close(host(out), out_ref, dtype, "out")
        assert_close(host(dqkv), reference.attention_backward(dout, qkv, att_ref, NH), dtype,
                     "dqkv")


@pytest.mark.gpu
def test_backward_is_deterministic():
    B, T, C, NH = 2, 128, 768, 12
    qkv_s, _, dout_s, _ = make_inputs(B, T, C, "bf16", 7)
    first = run_layer(B, T, C, NH, "bf16", "matmul", qkv_s, dout_s)
    second = run_layer(B, T, C, NH, "bf16", "matmul", qkv_s, dout_s)
    for a, b, name in zip(first[::2], second[::2], ("out", "dqkv")):
        assert np.array_equal(a.view(np.uint16).get(), b.view(np.uint16).get()), name


def test_resolve_method():
    assert attn.resolve_method("auto", "fp32", 64) == "matmul"
    assert attn.resolve_method("auto", "bf16", 48) == "matmul"
    expected = "flash" if attn.flash_available() else "matmul"
    assert attn.resolve_method("auto", "bf16", 64) == expected
    assert attn.resolve_method("auto", DTYPES["bf16"], 64) == expected
    assert attn.resolve_method("matmul", "bf16", 64) == "matmul"
    with pytest.raises(ValueError, match="method"):
        attn.resolve_method("flash", "fp32", 64)
    with pytest.raises(ValueError, match="method"):
        attn.resolve_method("cudnn", "bf16", 64)
    with pytest.raises(ValueError, match="dtype"):
        attn.resolve_method("auto", "int32", 64)


def test_buffer_specs():
    B, T, C, NH = 4, 1024, 768, 12
    saved = attn.attention_buffers(B, T, C, NH, "fp32", "matmul")
    assert saved == {"att": ((B, NH, T, T), np.dtype(np.float32))}
    scratch = attn.attention_scratch(B, T, C, NH, "bf16", "matmul")
    assert scratch["qkvp"] == ((3, B, NH, T, C // NH), DTYPES["bf16"])
    assert scratch["dqkvp"] == ((3, B, NH, T, C // NH), DTYPES["bf16"])
    assert scratch["datt"] == ((B, NH, T, T), DTYPES["bf16"])
    if attn.flash_available():
        assert attn.attention_buffers(B, T, C, NH, "bf16", "flash") == {
            "lse": ((B, NH, T), np.dtype(np.float32))}
    with pytest.raises(ValueError, match="n_head"):
        attn.attention_buffers(B, T, 100, 12, "fp32", "matmul")


@pytest.mark.gpu
def test_validation():
    import cupy
    B, T, C, NH = 2, 8, 96, 2
    dt = DTYPES["fp32"]
    scratch = attn.allocate(attn.attention_scratch(B, T, C, NH, dt, "matmul"))
    saved = attn.allocate(attn.attention_buffers(B, T, C, NH, dt, "matmul"))
    qkv = cupy.ones((B, T, 3 * C), dtype=dt)
    with pytest.raises(ValueError, match="out"):
        attn.attention_forward(cupy.empty((B, T, 2 * C), dtype=dt), saved, qkv, NH, scratch)
    with pytest.raises(ValueError, match="out"):
        attn.attention_forward(cupy.empty((B, T, C), dtype=DTYPES["bf16"]), saved, qkv, NH, scratch)
    with pytest.raises(ValueError, match="saved"):
        attn.attention_forward(cupy.empty((B, T, C), dtype=dt), {}, qkv, NH, scratch)
    with pytest.raises(ValueError, match="scratch"):
        attn.attention_forward(cupy.empty((B, T, C), dtype=dt), saved, qkv, NH, {})
    with pytest.raises(ValueError, match="n_head"):
        attn.attention_forward(cupy.empty((B, T, C), dtype=dt), saved, qkv, 5, scratch)
    with pytest.raises(ValueError, match="qkv"):
        attn.attention_forward(cupy.empty((B, T, C), dtype=dt), saved, qkv[:, ::2], NH, scratch)
