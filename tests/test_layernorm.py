"""LayerNorm and residual on the GPU (llmc/ops/layernorm.py) against llmc.model.reference.

layernorm_forward (out, mean, rstd), fused_residual_layernorm_forward (the residual is stored
exactly as the rounded sum, and normalized as stored), residual_forward (bit-exact sum) and
layernorm_backward (dinp, dweight, dbias accumulated onto random initial values) in fp32 and
bf16; reference in float64 on the values as stored, outputs poisoned with NaN first. Shapes:
production rows (B=8, T=1024, C=768), T=1 (one row), C=96, C not a multiple of a warp's 256
columns, C=1600 (>48 KiB of shared memory in fp32), and (B, T, C) 3-D arrays. The backward is
bitwise deterministic run to run (also at B=64).

Run: pytest tests/test_layernorm.py        (the gpu tests skip without a CUDA device)
"""
import numpy as np
import pytest

from llmc.model import reference
from tests.gpu_arrays import DTYPES, UINT, device, host, host_bits, poisoned
from tests.tolerances import assert_close

# row shapes (..., C)
SHAPES = [(8, 1024, 768), (1, 768), (1, 96), (37, 40), (3, 5, 264), (6, 1600)]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def randn(rng, shape, dtype, scale=1.0, shift=0.0):
    x = (shift + scale * rng.standard_normal(shape)).astype(DTYPES[dtype])
    return x, x.astype(np.float64)


def params(rng, C, dtype):
    w, w64 = randn(rng, (C,), dtype, 0.2, 1.0)
    b, b64 = randn(rng, (C,), dtype, 0.2)
    return w, w64, b, b64


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward(shape, dtype):
    from llmc.ops.layernorm import layernorm_forward
    rng = np.random.default_rng(sum(shape))
    C = shape[-1]
    x, x64 = randn(rng, shape, dtype, 2.0, 0.5)  # a non-zero mean
    w, w64, b, b64 = params(rng, C, dtype)
    out = poisoned(shape, dtype)
    mean, rstd = poisoned(shape[:-1], np.float32), poisoned(shape[:-1], np.float32)
    layernorm_forward(out, mean, rstd, device(x), device(w), device(b))
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x64, w64, b64)
    assert_close(host(out), ref_out, dtype, "out")
    # the statistics are fp32 computed from the stored inputs: fp32 tolerance in both dtypes
    assert_close(mean.get(), ref_mean, "fp32", "mean")
    assert_close(rstd.get(), ref_rstd, "fp32", "rstd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_fused_residual_forward(shape, dtype):
    from llmc.ops.layernorm import fused_residual_layernorm_forward
    rng = np.random.default_rng(sum(shape) + 1)
    C = shape[-1]
    a, _ = randn(rng, shape, dtype, 2.0, 0.5)
    b_, _ = randn(rng, shape, dtype)
    w, w64, b, b64 = params(rng, C, dtype)
    resid_ref = (a.astype(np.float32) + b_.astype(np.float32)).astype(DTYPES[dtype])
    residual, out = poisoned(shape, dtype), poisoned(shape, dtype)
    mean, rstd = poisoned(shape[:-1], np.float32), poisoned(shape[:-1], np.float32)
    fused_residual_layernorm_forward(residual, out, mean, rstd, device(a), device(b_),
                                     device(w), device(b))
    assert np.array_equal(host_bits(residual), resid_ref.view(UINT[resid_ref.itemsize])), \
        "residual: must be inp1 + inp2 rounded once to the storage dtype"
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(resid_ref.astype(np.float64), w64,
                                                              b64)
    assert_close(host(out), ref_out, dtype, "out")
    assert_close(mean.get(), ref_mean, "fp32", "mean")
    assert_close(rstd.get(), ref_rstd, "fp32", "rstd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(8, 1024, 768), (1,), (3, 5, 7), (2, 1001)],
                         ids=["8x1024x768", "1", "3x5x7", "2x1001"])
def test_residual_forward(shape, dtype):
    from llmc.ops.layernorm import residual_forward
    rng = np.random.default_rng(5)
    a, _ = randn(rng, shape, dtype)
    b, _ = randn(rng, shape, dtype)
    out = poisoned(shape, dtype)
    residual_forward(out, device(a), device(b))
    want = (a.astype(np.float32) + b.astype(np.float32)).astype(DTYPES[dtype])
    assert np.array_equal(host_bits(out), want.view(UINT[want.itemsize])), "out != inp1 + inp2"


def run_backward(shape, dtype, seed, colsum=False):
    """Device results of one backward onto random initial gradients, plus the host inputs. With
    colsum, the backward also adds dinp's column sums to a random dinp_colsum: then the results
    end with it and the inits with its float64 initial value."""
    import cupy
    from llmc.ops.layernorm import layernorm_backward, layernorm_backward_scratch_size
    rng = np.random.default_rng(seed)
    C = shape[-1]
    N = int(np.prod(shape[:-1]))
    x, x64 = randn(rng, shape, dtype, 2.0, 0.5)
    w, w64, _, _ = params(rng, C, dtype)
    dout, dout64 = randn(rng, shape, dtype)
    dinp0, _ = randn(rng, shape, dtype, 0.5)
    dw0, _ = randn(rng, (C,), dtype, 0.5)
    db0, _ = randn(rng, (C,), dtype, 0.5)
    extra = {}
    if colsum:
        ds0, ds064 = randn(rng, (C,), dtype, 0.5)
        extra["dinp_colsum"] = device(ds0)
    _, mean, rstd = reference.layernorm_forward(x64, w64, w64)
    mean, rstd = mean.astype(np.float32), rstd.astype(np.float32)
    dinp, dw, db = device(dinp0), device(dw0), device(db0)
    scratch = cupy.full(layernorm_backward_scratch_size(N, C) // 4, np.nan, dtype=cupy.float32)
    layernorm_backward(dinp, dw, db, device(dout), device(x), device(w), cupy.asarray(mean),
                       cupy.asarray(rstd), scratch, **extra)
    ref = reference.layernorm_backward(dout64, x64, w64, mean.astype(np.float64),
                                       rstd.astype(np.float64))
    inits = [a.astype(np.float64) for a in (dinp0, dw0, db0)]
    if colsum:
        return (dinp, dw, db, extra["dinp_colsum"]), ref, inits + [ds064]
    return (dinp, dw, db), ref, inits


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward(shape, dtype):
    got, ref, inits = run_backward(shape, dtype, seed=sum(shape) + 2)
    for name, g, r, i in zip(("dinp", "dweight", "dbias"), got, ref, inits):
        assert_close(host(g), i + r, dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward_dinp_colsum(shape, dtype):
    """dinp_colsum += the column sums of dinp as stored after the update (the bias gradient a
    projection gets from the LayerNorm backward), with dinp, dweight, dbias as without it."""
    (dinp, dw, db, ds), ref, (*inits, ds064) = run_backward(shape, dtype, sum(shape) + 5,
                                                            colsum=True)
    for name, g, r, i in zip(("dinp", "dweight", "dbias"), (dinp, dw, db), ref, inits):
        assert_close(host(g), i + r, dtype, name)
    C = shape[-1]
    N = int(np.prod(shape[:-1]))
    stored = host(dinp).astype(np.float64).reshape(N, C)
    assert_close(host(ds), ds064 + stored.sum(0), dtype, "dinp_colsum")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_backward_deterministic(dtype):
    shape = (64, 1024, 768)
    a, _, _ = run_backward(shape, dtype, seed=3)
    b, _, _ = run_backward(shape, dtype, seed=3)
    for name, x, y in zip(("dinp", "dweight", "dbias"), a, b):
        assert np.array_equal(host_bits(x), host_bits(y)), f"{name} differs between runs"


@pytest.mark.gpu
def test_validation():
    import cupy
    from llmc.ops.layernorm import (layernorm_backward, layernorm_backward_scratch_size,
                                    layernorm_forward, residual_forward)
    f32 = np.float32
    x = cupy.ones((4, 32), f32)
    w, b = cupy.ones(32, f32), cupy.zeros(32, f32)
    mean, rstd = cupy.empty(4, f32), cupy.empty(4, f32)
    with pytest.raises(ValueError, match="out"):
        layernorm_forward(cupy.empty((4, 33), f32), mean, rstd, x, w, b)
    with pytest.raises(ValueError, match="weight"):
        layernorm_forward(cupy.empty_like(x), mean, rstd, x, cupy.ones(31, f32), b)
    with pytest.raises(ValueError, match="mean"):
        layernorm_forward(cupy.empty_like(x), cupy.empty(3, f32), rstd, x, w, b)
    with pytest.raises(ValueError, match="rstd"):
        layernorm_forward(cupy.empty_like(x), mean, cupy.empty(4, np.float64), x, w, b)
    with pytest.raises(ValueError, match="multiple of 4"):
        layernorm_forward(cupy.empty((4, 6), f32), mean, rstd, cupy.ones((4, 6), f32),
                          cupy.ones(6, f32), cupy.ones(6, f32))
    with pytest.raises(ValueError, match="inp2"):
        residual_forward(x, x, cupy.zeros((4, 32), DTYPES["bf16"]))
    small = cupy.empty(layernorm_backward_scratch_size(4, 32) // 4 - 1, f32)
    with pytest.raises(ValueError, match="scratch"):
        layernorm_backward(cupy.empty_like(x), w.copy(), b.copy(), x, x, w, mean, rstd, small)
