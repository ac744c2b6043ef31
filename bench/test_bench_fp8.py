"""fp8 casts and products at GPT-2 124M training shapes (B=64, T=1024: N = 65536 rows).

- cast_transpose of an (N, C) bf16 activation or gradient into fp8 and its fp8 transpose:
  memory-bound, 2 + 1 + 1 bytes per element (GB/s and fraction of the card's ceiling).
- gelu_cast_transpose of the (N, 4C) fc output: the same traffic, the GELU folded in.
- fp8 products (E4M3 x E4M3 forward with bias and fast accumulation; E5M2 x E4M3 dgrad and
  wgrad) beside the bf16 product of the same shape: TFLOP/s, and the fraction of the card's
  measured *bf16* GEMM ceiling, so fp8's headroom reads directly (up to ~2 on Hopper).
Correctness first: a small cast bitwise against llmc.model.reference.

Run:  python -m pytest bench/test_bench_fp8.py --benchmark-only -q
"""
import ml_dtypes
import numpy as np
import pytest

from bench.timing import device_randn, record, to_host
from llmc.model import reference

N, C = 65536, 768
BF16 = np.dtype(ml_dtypes.bfloat16)
# name -> (M, N, K) of out (M, N) = a (M, K) @ b (N, K).T
PRODUCTS = {"qkv_fwd": (N, 3 * C, C), "fcproj_fwd": (N, C, 4 * C), "fc_dgrad": (N, C, 4 * C),
            "fc_wgrad": (4 * C, C, N)}


def _scale(v):
    import cupy
    return cupy.asarray(np.array([v], np.float32))


def check_small():
    import cupy
    from llmc.ops import fp8
    x = device_randn((64, 96), BF16, seed=0, scale=3.0)
    out = cupy.empty((64, 96), np.uint8)
    amax = cupy.zeros(1, np.float32)
    fp8.cast_transpose(out, None, amax, x, _scale(10.0))
    want = reference.fp8_quantize(to_host(x).astype(np.float32), 10.0, "e4m3")
    assert np.array_equal(cupy.asnumpy(out), want)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cast_transpose_C", "cast_transpose_4C", "gelu_cast_4C"])
def test_bench_fp8_cast(benchmark, kind):
    import cupy
    from llmc.ops import fp8
    check_small()
    cols = C if kind.endswith("_C") else 4 * C
    x = device_randn((N, cols), BF16, seed=1, scale=2.0)
    out = cupy.empty((N, cols), np.uint8)
    out_t = cupy.empty((cols, N), np.uint8)
    amax = cupy.zeros(1, np.float32)
    s = _scale(20.0)
    if kind.startswith("gelu"):
        def fn():
            fp8.gelu_cast_transpose(out, out_t, amax, x, s)
    else:
        def fn():
            fp8.cast_transpose(out, out_t, amax, x, s)
    record(benchmark, fn, nbytes=4 * N * cols)
    assert np.isfinite(float(amax[0]))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
@pytest.mark.parametrize("name", list(PRODUCTS))
def test_bench_fp8_product(benchmark, name, precision):
    import cupy
    from llmc.cuda import cublaslt
    from llmc.ops import fp8
    M, Nn, K = PRODUCTS[name]
    out = device_randn((M, Nn), BF16, seed=2, scale=1e-3)
    if precision == "bf16":
        a = device_randn((M, K), BF16, seed=3)
        b = device_randn((Nn, K), BF16, seed=4, scale=0.02)

        def fn():
            cublaslt.matmul(out, a, b, trans_b=True, beta=1.0 if "wgrad" in name else 0.0)
    else:
        a8 = cupy.asarray(np.random.default_rng(3).integers(0, 0x70, (M, K), dtype=np.uint8))
        b8 = cupy.asarray(np.random.default_rng(4).integers(0, 0x70, (Nn, K), dtype=np.uint8))
        a_fmt = "e4m3" if name.endswith("fwd") else "e5m2"
        s = _scale(1e-3)
        bias = device_randn((Nn,), BF16, seed=5) if name.endswith("fwd") else None
        kw = dict(epilogue="bias", bias=bias, fast_accum=True) if bias is not None else {}
        if "wgrad" in name:
            kw = dict(beta=1.0)

        def fn():
            fp8.fp8_matmul(out, a8, a_fmt, s, b8, "e4m3", s, **kw)
    record(benchmark, fn, flops=2 * M * Nn * K, dtype="bf16")
    assert np.all(np.isfinite(to_host(out[0, :8]).astype(np.float32)))
