"""Encoder on the GPU (llmc/ops/encoder.py) against llmc.model.reference.encoder_forward/backward.

Forward out = wte[inp] + wpe[t] and the accumulating backward (dwte +=, dwpe += onto random
initial gradients) in fp32 and bf16, reference in float64 on the values as stored; outputs
poisoned with NaN first. Shapes: production (B=8, T=1024, C=768, Vp=50304), T=1, C=96 and C not a
multiple of the kernels' 256-column chunk, tiny vocabularies (long buckets of repeated tokens).
The backward must be bitwise deterministic, also when every position holds the same token.
An out-of-range token makes its output row NaN (and only that row).

Run: pytest tests/test_encoder.py        (the gpu tests skip without a CUDA device)
"""
import numpy as np
import pytest

from llmc.model import reference
from tests.gpu_arrays import DTYPES, UINT, device, host, host_bits, poisoned
from tests.tolerances import assert_close

# (B, T, C, Vp, maxT)
SHAPES = [(8, 1024, 768, 50304, 1024), (1, 1, 96, 50304, 1024), (3, 7, 40, 64, 9),
          (2, 33, 96, 5, 64), (4, 100, 264, 1000, 128)]


def randn(rng, shape, dtype, scale=1.0):
    x = (scale * rng.standard_normal(shape)).astype(DTYPES[dtype])
    return x, x.astype(np.float64)


def tokens(rng, B, T, Vp):
    inp = rng.integers(0, Vp, size=(B, T)).astype(np.int32)
    inp.flat[0] = Vp - 1  # the last row of wte
    if inp.size > 2:
        inp.flat[-1] = 0
        inp.flat[1] = inp.flat[-1]  # at least one repeat
    return inp


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%dC%dVp%dmaxT%d" % s)
def test_forward(shape, dtype):
    import cupy
    from llmc.ops.encoder import encoder_forward
    B, T, C, Vp, maxT = shape
    rng = np.random.default_rng(B * T + C)
    wte, wte64 = randn(rng, (Vp, C), dtype)
    wpe, wpe64 = randn(rng, (maxT, C), dtype)
    inp = tokens(rng, B, T, Vp)
    out = poisoned((B, T, C), dtype)
    encoder_forward(out, cupy.asarray(inp), device(wte), device(wpe))
    assert_close(host(out), reference.encoder_forward(wte64, wpe64, inp), dtype, "out")


def run_backward(shape, dtype, inp, seed):
    """(dwte, dwpe) on the device after one backward onto fixed random initial gradients."""
    import cupy
    from llmc.ops.encoder import encoder_backward, encoder_backward_scratch_size
    B, T, C, Vp, maxT = shape
    rng = np.random.default_rng(seed)
    dout, _ = randn(rng, (B, T, C), dtype)
    dwte0, _ = randn(rng, (Vp, C), dtype, 0.1)
    dwpe0, _ = randn(rng, (maxT, C), dtype, 0.1)
    dwte, dwpe = device(dwte0), device(dwpe0)
    scratch = cupy.full(encoder_backward_scratch_size(B, T, C, Vp), 0xAB, dtype=cupy.uint8)
    encoder_backward(dwte, dwpe, device(dout), cupy.asarray(inp), scratch)
    return dwte, dwpe, dout, dwte0, dwpe0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%dC%dVp%dmaxT%d" % s)
def test_backward(shape, dtype):
    B, T, C, Vp, maxT = shape
    inp = tokens(np.random.default_rng(7 + B), B, T, Vp)
    dwte, dwpe, dout, dwte0, dwpe0 = run_backward(shape, dtype, inp, seed=T + C)
    ref_dwte, ref_dwpe = reference.encoder_backward(dout.astype(np.float64), inp,
                                                    (Vp, C), (maxT, C))
    assert_close(host(dwte), dwte0.astype(np.float64) + ref_dwte, dtype, "dwte")
    assert_close(host(dwpe), dwpe0.astype(np.float64) + ref_dwpe, dtype, "dwpe")
    # rows of tokens that never occur are untouched, bit for bit
    unused = np.setdiff1d(np.arange(Vp), inp)
    assert np.array_equal(host_bits(dwte)[unused], dwte0.view(UINT[dwte0.itemsize])[unused]), \
        "dwte: rows of absent tokens must not change"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["text", "one_token"])
def test_backward_deterministic(case, dtype):
    """Two runs give the same bits: Zipf-like repeats at B=64, and every position one token."""
    if case == "text":
        shape = (64, 1024, 768, 50304, 1024)
        rng = np.random.default_rng(3)
        inp = np.minimum(rng.zipf(1.3, size=(64, 1024)), 50303).astype(np.int32)
    else:
        shape = (8, 1024, 96, 64, 1024)
        inp = np.full((8, 1024), 5, dtype=np.int32)
    a_dwte, a_dwpe, *_ = run_backward(shape, dtype, inp, seed=11)
    b_dwte, b_dwpe, dout, dwte0, _ = run_backward(shape, dtype, inp, seed=11)
    assert np.array_equal(host_bits(a_dwte), host_bits(b_dwte)), "dwte differs between runs"
    assert np.array_equal(host_bits(a_dwpe), host_bits(b_dwpe)), "dwpe differs between runs"
    if case == "one_token":
        want = dwte0[5].astype(np.float64) + dout.astype(np.float64).reshape(-1, 96).sum(0)
        assert_close(host(a_dwte)[5], want, dtype, "dwte[5] (8192 rows summed)")


@pytest.mark.gpu
def test_out_of_range_token_gives_nan_row():
    import cupy
    from llmc.ops.encoder import encoder_forward
    rng = np.random.default_rng(0)
    wte, _ = randn(rng, (16, 32), "fp32")
    wpe, _ = randn(rng, (8, 32), "fp32")
    inp = np.array([[1, 2, 16, 3]], dtype=np.int32)
    out = poisoned((1, 4, 32), "fp32")
    encoder_forward(out, cupy.asarray(inp), device(wte), device(wpe))
    got = out.get()
    assert np.all(np.isnan(got[0, 2])) and np.all(np.isfinite(got[0, [0, 1, 3]]))


@pytest.mark.gpu
def test_validation():
    import cupy
    from llmc.ops.encoder import (encoder_backward, encoder_backward_scratch_size,
                                  encoder_forward)
    f32 = np.float32
    wte, wpe = cupy.ones((64, 32), f32), cupy.ones((16, 32), f32)
    inp = cupy.zeros((2, 8), np.int32)
    out = cupy.empty((2, 8, 32), f32)
    with pytest.raises(ValueError, match="inp"):
        encoder_forward(out, inp.astype(np.int64), wte, wpe)
    with pytest.raises(ValueError, match="out"):
        encoder_forward(cupy.empty((2, 8, 33), f32), inp, wte, wpe)
    with pytest.raises(ValueError, match="wpe"):
        encoder_forward(out, inp, wte, cupy.zeros((16, 32), DTYPES["bf16"]))
    with pytest.raises(ValueError, match="T=32"):
        encoder_forward(cupy.empty((1, 32, 32), f32), cupy.zeros((1, 32), np.int32), wte, wpe)
    with pytest.raises(ValueError, match="multiple of 4"):
        encoder_forward(cupy.empty((2, 8, 6), f32), inp, cupy.ones((64, 6), f32),
                        cupy.ones((16, 6), f32))
    small = cupy.zeros(encoder_backward_scratch_size(2, 8, 32, 64) - 1, cupy.uint8)
    with pytest.raises(ValueError, match="scratch"):
        encoder_backward(wte, wpe, out, inp, small)
