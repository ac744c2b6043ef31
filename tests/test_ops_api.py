"""The public op API (llmc.ops): every functional form against llmc.model.reference, the host/device
transfers bit for bit, and (on any machine) that the API is complete, documented in its
docstrings and in docs/OPS.md, and rejects host arrays with a ValueError naming the argument.

The out= forms have their own tests (tests/test_<family>.py); here each functional form is
checked once per dtype on a small awkward shape, which catches wrong allocation shapes, dtypes,
scratch sizes and saved-array plumbing.
Run:  pytest tests/test_ops_api.py        (the gpu tests skip without a CUDA device)
"""
import importlib
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from llmc import ops

from llmc.model import reference
from tests.gpu_arrays import DTYPES, host
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]


def test_api_is_complete_and_documented():
    for name in ops.FUNCTIONAL + ops.OUT_FORMS + ("to_device", "to_host", "from_host", "empty",
                                                   "zeros", "scratch"):
        fn = getattr(ops, name)
        assert callable(fn), name
        doc = inspect.getdoc(fn) if not inspect.ismodule(fn) else inspect.getdoc(fn._functional)
        assert doc and len(doc) > 20, f"ops.{name} needs a docstring with shapes and dtypes"
    for name in ops.FUNCTIONAL:
        fn = getattr(ops, name)
        doc = inspect.getdoc(fn._functional if inspect.ismodule(fn) else fn)
        assert "new" in doc.lower(), f"ops.{name}'s docstring must say it returns new arrays"


def test_family_modules_are_their_functional_forms():
    for name in ops.CALLABLE_FAMILIES:
        module = importlib.import_module(f"llmc.ops.{name}")
        assert getattr(ops, name) is module                      # still the module ...
        assert module._functional is getattr(module, name)       # ... calling its function
        assert inspect.signature(module) == inspect.signature(getattr(module, name))


def test_ops_md_lists_every_op():
    text = (ROOT / "docs" / "OPS.md").read_text()
    for name in ops.FUNCTIONAL + ops.OUT_FORMS + ("to_device", "to_host"):
        assert f"`{name}(" in text, f"docs/OPS.md does not list {name}"


def test_functional_forms_reject_host_arrays():
    pytest.importorskip("cupy")
    a = np.zeros((2, 4, 24), np.float32)
    t = np.zeros((2, 4), np.int32)
    calls = {
        "x": [lambda: ops.gelu(a), lambda: ops.gelu_grad(a, a), lambda: ops.layernorm(a, a, a),
              lambda: ops.layernorm_grad(a, a, a, (a, a)), lambda: ops.matmul(a, a),
              lambda: ops.matmul_grad(a, a, a)],
        "a": [lambda: ops.residual(a, a), lambda: ops.residual_layernorm(a, a, a, a)],
        "inp": [lambda: ops.encoder(t, a, a)],
        "dout": [lambda: ops.encoder_grad(a, t, (8, 24), (4, 24))],
        "qkv": [lambda: ops.attention(a, 2), lambda: ops.attention_grad(a, a, a, {}, 2),
                lambda: ops.flash_attention(a, 2), lambda: ops.flash_attention_grad(a, a, a, a, 2)],
        "logits": [lambda: ops.cross_entropy(a[0], t[0], 8),
                   lambda: ops.cross_entropy_grad(a[0], t[0], 8)],
        "grads[0]": [lambda: ops.global_norm(a.reshape(-1))],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match="^" + re.escape(f"{name}: expected a cupy.ndarray")):
                fn()
    with pytest.raises(ValueError, match="at least one"):
        ops.global_norm()


# ---------------------------------------------------------------------------------------------
# on the GPU

def rand(shape, dtype, seed, scale=1.0):
    """(device array, float64 host copy of the stored values)."""
    x = (scale * np.random.default_rng(seed).standard_normal(shape)).astype(DTYPES[dtype])
    return ops.to_device(x), x.astype(np.float64)


@pytest.mark.gpu
def test_to_device_to_host_bit_for_bit():
    import ml_dtypes
    x = np.random.default_rng(0).standard_normal((3, 37)).astype(ml_dtypes.bfloat16)
    d = ops.to_device(x[:, 1:])                 # a non-contiguous view travels too
    assert d.dtype == x.dtype and d.shape == (3, 36) and d.flags.c_contiguous
    back = ops.to_host(d)
    assert back.dtype == x.dtype and np.array_equal(back.view(np.uint16), x[:, 1:].view(np.uint16))
    ops.from_host(d, np.zeros((3, 36), ml_dtypes.bfloat16))
    assert not ops.to_host(d).astype(np.float32).any()
    with pytest.raises(ValueError, match="host: expected 108 values"):
        ops.from_host(d, np.zeros(5, ml_dtypes.bfloat16))
    s = ops.scratch(1000)
    assert s.nbytes >= 1000 and s.data.ptr % 256 == 0
    z = ops.zeros((5, 3), "bf16")
    assert z.dtype == x.dtype and not ops.to_host(z).astype(np.float32).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gelu_and_residual(dtype):
    x, x64 = rand((3, 5, 40), dtype, 1, 2.0)
    d, d64 = rand((3, 5, 40), dtype, 2)
    assert_close(host(ops.gelu(x)), reference.gelu_forward(x64), dtype, "gelu")
    assert_close(host(ops.gelu_grad(x, d)), reference.gelu_backward(x64, d64), dtype, "gelu_grad")
    assert_close(host(ops.residual(x, d)), x64 + d64, dtype, "residual")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layernorm(dtype):
    B, T, C = 2, 7, 40
    x, x64 = rand((B, T, C), dtype, 1, 2.0)
    y, y64 = rand((B, T, C), dtype, 2)
    w, w64 = rand((C,), dtype, 3)
    b, b64 = rand((C,), dtype, 4)
    out, saved = ops.layernorm(x, w, b)
    ref_out, mean, rstd = reference.layernorm_forward(x64, w64, b64)
    assert out.shape == (B, T, C) and saved[0].shape == (B, T) and saved[0].dtype == np.float32
    assert_close(host(out), ref_out, dtype, "out")
    assert_close(host(saved[1]), rstd, "fp32" if dtype == "fp32" else "bf16", "rstd")
    for got, want, name in zip(ops.layernorm_grad(y, x, w, saved),
                               reference.layernorm_backward(y64, x64, w64, mean, rstd),
                               ("dx", "dweight", "dbias")):
        assert_close(host(got), want, dtype, name)
    res, out2, _ = ops.residual_layernorm(x, y, w, b)
    assert_close(host(res), x64 + y64, dtype, "residual")
    want = reference.layernorm_forward(host(res), w64, b64)[0]
    assert_close(host(out2), want, dtype, "residual_layernorm out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matmul(dtype):
    N, C, OC = 37, 24, 40
    x, x64 = rand((N, C), dtype, 1)
    w, w64 = rand((OC, C), dtype, 2, 0.2)
    b, b64 = rand((OC,), dtype, 3)
    g, g64 = rand((N, OC), dtype, 4)
    assert_close(host(ops.matmul(x, w, b)), reference.matmul_forward(x64, w64, b64), dtype, "out")
    assert_close(host(ops.matmul(x.reshape(1, N, C), w)).reshape(N, OC),
                 reference.matmul_forward(x64, w64), dtype, "out 3-D, no bias")
    dx, dw, db = ops.matmul_grad(g, x, w)
    for got, want, name in zip((dx, dw, db), reference.matmul_backward(g64, x64, w64),
                               ("dx", "dweight", "dbias")):
        assert_close(host(got), want, dtype, name)
    dx, dw, db = ops.matmul_grad(g, x, w, has_bias=False, pre_gelu=x)
    assert db is None
    assert_close(host(dx), reference.gelu_backward(x64, g64 @ w64), dtype, "dx (pre_gelu)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_encoder(dtype):
    B, T, C, Vp, maxT = 2, 9, 24, 50, 16
    ids = np.random.default_rng(0).integers(0, Vp, (B, T)).astype(np.int32)
    inp = ops.to_device(ids)
    wte, wte64 = rand((Vp, C), dtype, 1)
    wpe, wpe64 = rand((maxT, C), dtype, 2)
    out = ops.encoder(inp, wte, wpe)
    assert out.shape == (B, T, C)
    assert_close(host(out), reference.encoder_forward(wte64, wpe64, ids), dtype, "out")
    d, d64 = rand((B, T, C), dtype, 3)
    dwte, dwpe = ops.encoder_grad(d, inp, wte.shape, wpe.shape)
    want = reference.encoder_backward(d64, ids, (Vp, C), (maxT, C))
    assert_close(host(dwte), want[0], dtype, "dwte")
    assert_close(host(dwpe), want[1], dtype, "dwpe")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,method", [("fp32", "matmul"), ("bf16", "matmul"),
                                          ("bf16", "flash")])
def test_attention(dtype, method):
    B, T, NH, HS = 2, 33, 2, 64
    C = NH * HS
    qkv, qkv64 = rand((B, T, 3 * C), dtype, 1)
    d, d64 = rand((B, T, C), dtype, 2)
    out, saved = ops.attention(qkv, NH, method)
    assert set(saved) == ({"lse"} if method == "flash" else {"att"})
    ref_out, att = reference.attention_forward(qkv64, NH)
    assert_close(host(out), ref_out, dtype, "out", rel=1e-2 if dtype == "bf16" else None)
    dqkv = ops.attention_grad(d, qkv, out, saved, NH)
    assert_close(host(dqkv), reference.attention_backward(d64, qkv64, att, NH), dtype, "dqkv",
                 rel=1e-2 if dtype == "bf16" else None)
    if method == "flash":
        out2, lse = ops.flash_attention(qkv, NH)
        assert lse.shape == (B, NH, T) and np.array_equal(host(out2), host(out))
        assert np.array_equal(host(ops.flash_attention_grad(d, qkv, out2, lse, NH)), host(dqkv))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cross_entropy(dtype):
    N, V, Vp = 5, 50, 64
    logits, l64 = rand((N, Vp), dtype, 1, 3.0)
    before = ops.to_host(logits).copy()
    t = np.random.default_rng(2).integers(0, V, N).astype(np.int32)
    targets = ops.to_device(t)
    ref_losses, probs = reference.crossentropy_forward(l64, t, V)
    assert_close(ops.to_host(ops.cross_entropy(logits, targets, V)), ref_losses, "fp32", "losses")
    losses, dlogits = ops.cross_entropy_grad(logits, targets, V)
    assert_close(ops.to_host(losses), ref_losses, "fp32", "losses")
    want = reference.crossentropy_backward(probs, t, np.full(N, 1.0 / N))
    assert_close(host(dlogits), want, dtype, "dlogits")
    assert np.array_equal(ops.to_host(logits).view(np.uint8), before.view(np.uint8)), \
        "the functional forms must leave the logits untouched"


@pytest.mark.gpu
def test_global_norm():
    a, a64 = rand((1000,), "bf16", 1)
    b, b64 = rand((4099,), "bf16", 2)
    got = float(ops.to_host(ops.global_norm(a, b))[0])
    assert abs(got - ((a64 ** 2).sum() + (b64 ** 2).sum())) < 1e-4 * got
