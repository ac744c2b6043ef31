"""Matmul on the GPU: llmc.cuda.cublas.gemm, llmc.cuda.cublaslt.matmul and llmc/ops/matmul.py against
NumPy / llmc.model.reference.

cublas.gemm: the four transpose combinations, alpha/beta, batched (3-D), a or b broadcast (2-D
with a 3-D partner), row-strided views (column slices of a wider array) and 4-D batches whose
strides do not merge (heads of a qkv buffer); fp32 must match float64 to 1e-5 (no TF32), bf16
to the bf16 tolerance.
cublaslt.matmul: the transpose combinations, beta = 1, row-strided views, no TF32 in fp32, the
bias epilogue, and the DGELU epilogue on exact inputs over [-8, 8], which must be the gradient
of llmc.model.reference's tanh GELU to the dtype's tolerance. Argument validation.
matmul_forward/backward: out = inp @ weight.T + bias, dinp =, dweight += and dbias += onto
random initial values, with and without bias, (N, C) and (B, T, C) inputs, and the backward
with the GELU fused (pre_gelu: dinp = (dout @ weight) * gelu'(pre_gelu)); dbias is bitwise
deterministic. Shapes: GPT-2's (B=4, T=1024, C=768 -> 2304 and 3072, 3072 -> 768), N=1, C=96,
OC not a multiple of a block's columns. Argument validation. The fc product with GELU_AUX_BIAS
(out = gelu, pre_gelu = the product + bias). Algorithm tuning (LLMC_MATMUL_TUNE=1): a tuned
beta = 1 product still accumulates once, the choice lands in the cache file, and a fresh process
state takes the file's choice instead of timing.

Run: pytest tests/test_matmul.py        (the gpu tests skip without a CUDA device)
"""
import numpy as np
import pytest

from llmc.model import reference
from tests.gpu_arrays import DTYPES, device, host, host_bits, poisoned
from tests.tolerances import assert_close

# (N rows, C in, OC out)
SHAPES = [(4096, 768, 2304), (4096, 768, 3072), (4096, 3072, 768), (1, 768, 768), (37, 96, 40),
          (5, 96, 8)]
IDS = ["N%dC%dOC%d" % s for s in SHAPES]


def randn(rng, shape, dtype, scale=1.0):
    x = (scale * rng.standard_normal(shape)).astype(DTYPES[dtype])
    return x, x.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# cublas.gemm

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("mnk", [(256, 192, 320), (1, 7, 3), (65, 33, 129)], ids=str)
def test_gemm_transposes(mnk, trans_b, trans_a, dtype):
    from llmc.cuda.cublas import gemm
    M, N, K = mnk
    rng = np.random.default_rng(M + N + K)
    a, a64 = randn(rng, (K, M) if trans_a else (M, K), dtype)
    b, b64 = randn(rng, (N, K) if trans_b else (K, N), dtype)
    c = poisoned((M, N), dtype)
    gemm(c, device(a), device(b), trans_a=trans_a, trans_b=trans_b)
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    assert_close(host(c), want, dtype, "c")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemm_alpha_beta(dtype):
    from llmc.cuda.cublas import gemm
    rng = np.random.default_rng(1)
    a, a64 = randn(rng, (64, 96), dtype)
    b, b64 = randn(rng, (96, 48), dtype)
    c0, c064 = randn(rng, (64, 48), dtype)
    c = device(c0)
    gemm(c, device(a), device(b), alpha=0.5, beta=-2.0)
    assert_close(host(c), 0.5 * a64 @ b64 - 2.0 * c064, dtype, "c")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bcast", ["none", "a", "b"])
def test_gemm_batched(bcast, dtype):
    from llmc.cuda.cublas import gemm
    rng = np.random.default_rng(2)
    Bt, M, N, K = 6, 40, 24, 56
    a, a64 = randn(rng, (M, K) if bcast == "a" else (Bt, M, K), dtype)
    b, b64 = randn(rng, (N, K) if bcast == "b" else (Bt, N, K), dtype)
    c = poisoned((Bt, M, N), dtype)
    gemm(c, device(a), device(b), trans_b=True)
    want = a64 @ np.swapaxes(b64, -1, -2)
    assert_close(host(c), np.broadcast_to(want, (Bt, M, N)), dtype, "c")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemm_strided_views(dtype):
    """q/k/v column slices of a (N, 3C) buffer, and per-head views of (B, T, 3, NH, HS)."""
    from llmc.cuda.cublas import gemm
    rng = np.random.default_rng(3)
    B, T, NH, HS = 3, 17, 4, 16
    C = NH * HS
    qkv, qkv64 = randn(rng, (B, T, 3 * C), dtype)
    d = device(qkv)
    # 2-D: q (N, C) with row stride 3C, times k^T
    q2, k2 = d.reshape(B * T, 3 * C)[:, :C], d.reshape(B * T, 3 * C)[:, C:2 * C]
    s = poisoned((B * T, B * T), dtype)
    gemm(s, q2, k2, trans_b=True)
    q64 = qkv64.reshape(B * T, 3 * C)[:, :C]
    k64 = qkv64.reshape(B * T, 3 * C)[:, C:2 * C]
    assert_close(host(s), q64 @ k64.T, dtype, "q @ k^T (row-strided)")
    # 4-D: (B, NH, T, HS) views whose batch strides do not merge into one
    heads = d.reshape(B, T, 3, NH, HS)
    q4 = heads[:, :, 0].transpose(0, 2, 1, 3)
    k4 = heads[:, :, 1].transpose(0, 2, 1, 3)
    att = poisoned((B, NH, T, T), dtype)
    gemm(att, q4, k4, trans_b=True)
    h64 = qkv64.reshape(B, T, 3, NH, HS)
    want = np.einsum("bthd,bshd->bhts", h64[:, :, 0], h64[:, :, 1])
    assert_close(host(att), want, dtype, "per-head q @ k^T")
    # and the output written through a strided view: y (B, T, NH, HS) seen as (B, NH, T, HS)
    y = poisoned((B, T, NH, HS), dtype)
    v4 = heads[:, :, 2].transpose(0, 2, 1, 3)
    gemm(y.transpose(0, 2, 1, 3), att, v4)
    want_y = np.einsum("bhts,bshd->bthd", host(att), h64[:, :, 2])  # att as stored
    assert_close(host(y), want_y, dtype, "att @ v into a strided output")


@pytest.mark.gpu
def test_gemm_fp32_is_not_tf32():
    """Products whose exact value TF32 (10-bit mantissa inputs) would visibly change."""
    from llmc.cuda.cublas import gemm
    rng = np.random.default_rng(4)
    a = (1.0 + rng.random((512, 512)) * 2.0 ** -12).astype(np.float32)
    b = (1.0 + rng.random((512, 512)) * 2.0 ** -12).astype(np.float32)
    c = poisoned((512, 512), "fp32")
    gemm(c, device(a), device(b))
    want = a.astype(np.float64) @ b.astype(np.float64)
    # TF32 keeps 10 mantissa bits and would drop the 2^-12 parts: relative error ~2e-4
    assert np.max(np.abs(c.get() - want) / want) < 1e-5


@pytest.mark.gpu
def test_gemm_validation():
    import cupy
    from llmc.cuda.cublas import gemm
    f32 = np.float32
    a, b, c = cupy.ones((4, 8), f32), cupy.ones((8, 5), f32), cupy.empty((4, 5), f32)
    with pytest.raises(ValueError, match="inner"):
        gemm(c, a, cupy.ones((7, 5), f32))
    with pytest.raises(ValueError, match="^b:"):
        gemm(c, a, cupy.zeros((8, 5), DTYPES["bf16"]))
    with pytest.raises(ValueError, match="^a:"):
        gemm(c, cupy.ones((3, 8), f32), b)
    with pytest.raises(ValueError, match="^c:"):
        gemm(c.astype(np.float64), a, b)
    with pytest.raises(ValueError, match="contiguous"):
        gemm(c, cupy.ones((4, 16), f32)[:, ::2], b)
    with pytest.raises(ValueError, match="batch"):
        gemm(cupy.empty((2, 4, 5), f32), cupy.ones((3, 4, 8), f32), b)
    with pytest.raises(ValueError, match="^c:"):
        gemm(cupy.broadcast_to(cupy.empty((4, 5), f32), (2, 4, 5)), cupy.ones((2, 4, 8), f32), b)


# ---------------------------------------------------------------------------------------------
# cublaslt.matmul

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("mnk", [(256, 192, 320), (1, 8, 3), (65, 40, 129)], ids=str)
def test_lt_transposes(mnk, trans_b, trans_a, dtype):
    from llmc.cuda.cublaslt import matmul
    M, N, K = mnk
    rng = np.random.default_rng(M + N + K)
    a, a64 = randn(rng, (K, M) if trans_a else (M, K), dtype)
    b, b64 = randn(rng, (N, K) if trans_b else (K, N), dtype)
    c = poisoned((M, N), dtype)
    matmul(c, device(a), device(b), trans_a=trans_a, trans_b=trans_b)
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    assert_close(host(c), want, dtype, "c")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lt_beta_bias_and_strided(dtype):
    """beta = 1 onto c; the bias epilogue; a, b, c as column slices of wider arrays."""
    from llmc.cuda.cublaslt import matmul
    rng = np.random.default_rng(11)
    a, a64 = randn(rng, (64, 3 * 96), dtype)
    b, b64 = randn(rng, (48, 96), dtype)
    c0, c064 = randn(rng, (64, 2 * 48), dtype)
    bias, bias64 = randn(rng, (48,), dtype)
    c = device(c0)
    matmul(c[:, 48:], device(a)[:, 96:192], device(b), trans_b=True, beta=1.0)
    want = c064.copy()
    want[:, 48:] += a64[:, 96:192] @ b64.T
    assert_close(host(c), want, dtype, "c (beta = 1, strided)")
    out = poisoned((64, 48), dtype)
    matmul(out, device(a)[:, :96], device(b), trans_b=True, epilogue="bias", bias=device(bias))
    assert_close(host(out), a64[:, :96] @ b64.T + bias64, dtype, "c (bias)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lt_dgelu_is_tanh_gelu_backward(dtype):
    """cuBLASLt's GELU gradient on exact inputs x over [-8, 8] is llmc.model.reference's tanh GELU's
    (the erf GELU's gradient differs from it by up to 9e-4, far beyond the fp32 tolerance).

    The product g (8, 1) @ ones (1, n) is exact, so c = g * gelu'(x) holds only the epilogue's
    error."""
    from llmc.cuda.cublaslt import matmul
    n = 4096
    x = np.ascontiguousarray(np.broadcast_to(np.linspace(-8.0, 8.0, n).astype(DTYPES[dtype]),
                                             (8, n)))
    g, g64 = randn(np.random.default_rng(13), (8, 1), dtype)
    out = poisoned((8, n), dtype)
    matmul(out, device(g), device(np.ones((1, n), DTYPES[dtype])), epilogue="dgelu",
           aux=device(x))
    want = reference.gelu_backward(x.astype(np.float64), np.broadcast_to(g64, (8, n)))
    assert_close(host(out), want, dtype, "dgelu")


@pytest.mark.gpu
def test_lt_fp32_is_not_tf32():
    from llmc.cuda.cublaslt import matmul
    rng = np.random.default_rng(4)
    a = (1.0 + rng.random((512, 512)) * 2.0 ** -12).astype(np.float32)
    b = (1.0 + rng.random((512, 512)) * 2.0 ** -12).astype(np.float32)
    c = poisoned((512, 512), "fp32")
    matmul(c, device(a), device(b))
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert np.max(np.abs(c.get() - want) / want) < 1e-5


@pytest.mark.gpu
def test_lt_validation():
    import cupy
    from llmc.cuda.cublaslt import matmul
    f32 = np.float32
    a, b, c = cupy.ones((4, 8), f32), cupy.ones((8, 16), f32), cupy.empty((4, 16), f32)
    with pytest.raises(ValueError, match="inner"):
        matmul(c, a, cupy.ones((7, 16), f32))
    with pytest.raises(ValueError, match="^b:"):
        matmul(c, a, cupy.zeros((8, 16), DTYPES["bf16"]))
    with pytest.raises(ValueError, match="^a:"):
        matmul(c, cupy.ones((3, 8), f32), b)
    with pytest.raises(ValueError, match="^a:"):
        matmul(c, cupy.ones((2, 4, 8), f32), b)
    with pytest.raises(ValueError, match="contiguous"):
        matmul(c, cupy.ones((4, 16), f32)[:, ::2], b)
    with pytest.raises(ValueError, match="epilogue"):
        matmul(c, a, b, epilogue="relu")
    with pytest.raises(ValueError, match="^bias:"):
        matmul(c, a, b, epilogue="bias", bias=cupy.ones(4, f32))
    with pytest.raises(ValueError, match="^bias:"):
        matmul(c, a, b, epilogue="bias", bias=cupy.ones(16, DTYPES["bf16"]))
    with pytest.raises(ValueError, match="^bias:"):
        matmul(c, a, b, bias=cupy.ones(16, f32))
    with pytest.raises(ValueError, match="^aux:"):
        matmul(c, a, b, epilogue="dgelu", aux=cupy.empty((4, 8), f32))
    with pytest.raises(ValueError, match="^aux:"):
        matmul(cupy.empty((4, 4), f32), a, b[:, :4], epilogue="dgelu",
               aux=cupy.empty((4, 4), f32))
    with pytest.raises(ValueError, match="^beta:"):
        matmul(c, a, b, epilogue="dgelu", aux=cupy.empty((4, 16), f32), beta=1.0)


# ---------------------------------------------------------------------------------------------
# matmul_forward / matmul_backward

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward(shape, bias, dtype):
    from llmc.ops.matmul import matmul_forward
    N, C, OC = shape
    rng = np.random.default_rng(N + C + OC)
    x, x64 = randn(rng, (N, C), dtype)
    w, w64 = randn(rng, (OC, C), dtype, C ** -0.5)
    b, b64 = randn(rng, (OC,), dtype)
    out = poisoned((N, OC), dtype)
    matmul_forward(out, device(x), device(w), device(b) if bias else None)
    assert_close(host(out), reference.matmul_forward(x64, w64, b64 if bias else None), dtype, "out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_forward_3d(dtype):
    from llmc.ops.matmul import matmul_forward
    rng = np.random.default_rng(9)
    x, x64 = randn(rng, (4, 1024, 768), dtype)
    w, w64 = randn(rng, (2304, 768), dtype, 768 ** -0.5)
    b, b64 = randn(rng, (2304,), dtype)
    out = poisoned((4, 1024, 2304), dtype)
    matmul_forward(out, device(x), device(w), device(b))
    assert_close(host(out), reference.matmul_forward(x64, w64, b64), dtype, "out")


def linear_inputs(N, C, OC, dtype, seed):
    """x (N, C), w (OC, C) scaled by C^-1/2, b (OC,): each (host array, float64 copy)."""
    rng = np.random.default_rng(seed)
    return (randn(rng, (N, C), dtype), randn(rng, (OC, C), dtype, C ** -0.5),
            randn(rng, (OC,), dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 768, 3072), (64, 768, 3072), (37, 40, 96)],
                         ids=["decode_fc_B1", "decode_fc_B64", "N37C40OC96"])
def test_forward_gelu_epilogue(shape, dtype):
    """gelu=True: gelu(x @ w.T + b) with the tanh GELU of llmc.model.reference (generation's fc)."""
    from llmc.ops.matmul import matmul_forward
    N, C, OC = shape
    (x, x64), (w, w64), (b, b64) = linear_inputs(N, C, OC, dtype, seed=N + C + OC + 1)
    out = poisoned((N, OC), dtype)
    matmul_forward(out, device(x), device(w), device(b), gelu=True)
    want = reference.gelu_forward(reference.matmul_forward(x64, w64, b64))
    assert_close(host(out), want, dtype, "gelu(out)")
    with pytest.raises(ValueError, match="needs the bias"):
        matmul_forward(out, device(x), device(w), None, gelu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2048, 768, 3072), (37, 40, 96)], ids=["fc", "N37C40OC96"])
def test_forward_gelu_aux_epilogue(shape, dtype):
    """gelu=True with pre_gelu (training's fused fc): pre_gelu = x @ w.T + b and out = its GELU."""
    from llmc.ops.matmul import matmul_forward
    N, C, OC = shape
    (x, x64), (w, w64), (b, b64) = linear_inputs(N, C, OC, dtype, seed=N + C + OC + 2)
    out, pre = poisoned((N, OC), dtype), poisoned((N, OC), dtype)
    matmul_forward(out, device(x), device(w), device(b), gelu=True, pre_gelu=pre)
    want_pre = reference.matmul_forward(x64, w64, b64)
    assert_close(host(pre), want_pre, dtype, "pre_gelu")
    assert_close(host(out), reference.gelu_forward(want_pre), dtype, "gelu(out)")
    with pytest.raises(ValueError, match="pre_gelu"):
        matmul_forward(out, device(x), device(w), device(b), pre_gelu=pre)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("shape", [(1, 768, 2304), (8, 3072, 768), (3, 768, 3072), (5, 40, 97)],
                         ids=["qkv_B1", "fcproj_B8", "fc_B3", "M5C40OC97"])
def test_matvec_forward(shape, gelu, dtype):
    """The few-row kernel of generation against the reference (with and without bias/GELU)."""
    from llmc.ops.matmul import matvec_forward
    M, C, OC = shape
    rng = np.random.default_rng(M + C + OC + 2)
    x, x64 = randn(rng, (M, C), dtype)
    w, w64 = randn(rng, (OC, C), dtype, C ** -0.5)
    b, b64 = randn(rng, (OC,), dtype)
    for bias in ((True, False) if not gelu else (True,)):
        out = poisoned((M, OC), dtype)
        matvec_forward(out, device(x), device(w), device(b) if bias else None, gelu=gelu)
        want = reference.matmul_forward(x64, w64, b64 if bias else None)
        if gelu:
            want = reference.gelu_forward(want)
        assert_close(host(out), want, dtype, "out")
    with pytest.raises(ValueError, match="1 to 8 rows"):
        matvec_forward(poisoned((9, OC), dtype), device(np.zeros((9, C), DTYPES[dtype])),
                       device(w))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 768, 2304), (8, 768, 3072), (5, 40, 97)],
                         ids=["qkv_B1", "fc_B8", "M5C40OC97"])
def test_matvec_layernorm_forward(shape, dtype):
    """residual = inp1 + inp2 (rounded), out = LayerNorm(residual) @ w.T + b [GELU]; and
    LayerNorm(inp1) alone when inp2 and residual are None."""
    from llmc.ops.matmul import matvec_layernorm_forward
    M, C, OC = shape
    rng = np.random.default_rng(M + C + OC + 3)
    a, a64 = randn(rng, (M, C), dtype)
    b2, b264 = randn(rng, (M, C), dtype)
    lw, lw64 = randn(rng, (C,), dtype)
    lb, lb64 = randn(rng, (C,), dtype)
    w, w64 = randn(rng, (OC, C), dtype, C ** -0.5)
    b, b64 = randn(rng, (OC,), dtype)
    res = (a64 + b264).astype(DTYPES[dtype]).astype(np.float64)  # the stored, rounded residual
    for gelu, two in ((False, True), (True, True), (False, False)):
        out, residual = poisoned((M, OC), dtype), poisoned((M, C), dtype)
        matvec_layernorm_forward(out, residual if two else None, device(a),
                                 device(b2) if two else None, device(lw), device(lb), device(w),
                                 device(b), gelu=gelu)
        x = res if two else a64
        ln = reference.layernorm_forward(x, lw64, lb64)[0]
        want = reference.matmul_forward(ln.astype(DTYPES[dtype]).astype(np.float64), w64, b64)
        if gelu:
            want = reference.gelu_forward(want)
        assert_close(host(out), want, dtype, "out")
        if two:
            np.testing.assert_array_equal(host(residual), res)
    with pytest.raises(ValueError, match="give both"):
        matvec_layernorm_forward(poisoned((M, OC), dtype), None, device(a), device(b2),
                                 device(lw), device(lb), device(w), device(b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4096, 3072, 768), (37, 40, 96), (1, 8, 96)],
                         ids=["fcproj", "N37C40OC96", "N1C8OC96"])
def test_backward_dgelu(shape, dtype):
    """dinp = (dout @ weight) * gelu'(pre_gelu); dweight and dbias as without it."""
    import cupy
    from llmc.ops.matmul import matmul_backward, matmul_backward_scratch_size
    N, C, OC = shape
    rng = np.random.default_rng(N + C + OC + 2)
    pre, pre64 = randn(rng, (N, C), dtype, 2.0)
    x = reference.gelu_forward(pre64).astype(DTYPES[dtype])  # the forward's stored gelu(pre)
    x64 = x.astype(np.float64)
    w, w64 = randn(rng, (OC, C), dtype, C ** -0.5)
    dout, dout64 = randn(rng, (N, OC), dtype)
    dw0, dw064 = randn(rng, (OC, C), dtype)
    db0, db064 = randn(rng, (OC,), dtype)
    dinp, dw, db = poisoned((N, C), dtype), device(dw0), device(db0)
    scratch = cupy.full(matmul_backward_scratch_size(N, OC) // 4, np.nan, dtype=cupy.float32)
    matmul_backward(dinp, dw, db, device(dout), device(x), device(w), scratch,
                    pre_gelu=device(pre))
    dx_r, dw_r, db_r = reference.matmul_backward(dout64, x64, w64)
    assert_close(host(dinp), reference.gelu_backward(pre64, dx_r), dtype, "dinp")
    assert_close(host(dw), dw064 + dw_r, dtype, "dweight")
    assert_close(host(db), db064 + db_r, dtype, "dbias")


def run_backward(shape, dtype, bias, seed):
    import cupy
    from llmc.ops.matmul import matmul_backward, matmul_backward_scratch_size
    N, C, OC = shape
    rng = np.random.default_rng(seed)
    x, x64 = randn(rng, (N, C), dtype)
    w, w64 = randn(rng, (OC, C), dtype, C ** -0.5)
    dout, dout64 = randn(rng, (N, OC), dtype)
    dw0, dw064 = randn(rng, (OC, C), dtype)
    db0, db064 = randn(rng, (OC,), dtype)
    dinp = poisoned((N, C), dtype)
    dw, db = device(dw0), device(db0) if bias else None
    scratch = cupy.full(matmul_backward_scratch_size(N, OC) // 4, np.nan, dtype=cupy.float32)
    matmul_backward(dinp, dw, db, device(dout), device(x), device(w), scratch)
    dx_r, dw_r, db_r = reference.matmul_backward(dout64, x64, w64, has_bias=bias)
    return (dinp, dw, db), (dx_r, dw064 + dw_r, db064 + db_r if bias else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward(shape, bias, dtype):
    (dinp, dw, db), (dx_r, dw_r, db_r) = run_backward(shape, dtype, bias, seed=sum(shape))
    assert_close(host(dinp), dx_r, dtype, "dinp")
    assert_close(host(dw), dw_r, dtype, "dweight")
    if bias:
        assert_close(host(db), db_r, dtype, "dbias")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dbias_deterministic(dtype):
    import cupy
    from llmc.ops.matmul import matmul_backward, matmul_backward_scratch_size
    N, C, OC = 65536, 64, 3072
    rng = np.random.default_rng(5)
    dout = device(randn(rng, (N, OC), dtype)[0])
    x, w = device(randn(rng, (N, C), dtype)[0]), device(randn(rng, (OC, C), dtype)[0])
    scratch = cupy.empty(matmul_backward_scratch_size(N, OC), cupy.uint8)
    results = []
    for _ in range(2):
        db = cupy.zeros(OC, DTYPES[dtype])
        dw = cupy.zeros((OC, C), DTYPES[dtype])
        matmul_backward(cupy.empty((N, C), DTYPES[dtype]), dw, db, dout, x, w, scratch)
        results.append(host_bits(db))
    assert np.array_equal(results[0], results[1]), "dbias differs between runs"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bias_backward_alone(dtype):
    """bias_backward gives the dbias of matmul_backward, bit for bit, on a (B, T, OC) dout."""
    import cupy
    from llmc.ops.matmul import bias_backward, matmul_backward, matmul_backward_scratch_size
    N, C, OC = 999, 96, 264
    rng = np.random.default_rng(6)
    x, _ = randn(rng, (N, C), dtype)
    w, _ = randn(rng, (OC, C), dtype)
    dout, dout64 = randn(rng, (N, OC), dtype)
    db0, db064 = randn(rng, (OC,), dtype)
    scratch = cupy.empty(matmul_backward_scratch_size(N, OC), cupy.uint8)
    with_products = device(db0)
    matmul_backward(cupy.empty((N, C), DTYPES[dtype]), cupy.zeros((OC, C), DTYPES[dtype]),
                    with_products, device(dout), device(x), device(w), scratch)
    alone = device(db0)
    bias_backward(alone, device(dout).reshape(27, 37, OC), scratch)
    assert np.array_equal(host_bits(alone), host_bits(with_products)), \
        "bias_backward differs from matmul_backward's dbias"
    assert_close(host(alone), db064 + dout64.sum(0), dtype, "dbias")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bias_backward_back_to_back(dtype):
    """dbias is right launch after launch of different shapes through one scratch size each:
    one row block (G = 1), the most (G = 256), OC not a multiple of the 32-pack column chunk,
    the production qkv and attention-projection widths."""
    import cupy
    from llmc.ops.matmul import bias_backward, matmul_backward_scratch_size
    rng = np.random.default_rng(7)
    for N, OC in ((5, 24), (40_000, 2304), (129, 264), (1, 8), (16_384, 768), (5, 24)):
        dout, dout64 = randn(rng, (N, OC), dtype)
        db0, db064 = randn(rng, (OC,), dtype)
        db = device(db0)
        bias_backward(db, device(dout), cupy.empty(matmul_backward_scratch_size(N, OC),
                                                   cupy.uint8))
        assert_close(host(db), db064 + dout64.sum(0), dtype, f"dbias (N={N}, OC={OC})")


@pytest.mark.gpu
def test_validation():
    import cupy
    from llmc.ops.matmul import matmul_backward, matmul_backward_scratch_size, matmul_forward
    f32 = np.float32
    x, w, b = cupy.ones((8, 16), f32), cupy.ones((24, 16), f32), cupy.ones(24, f32)
    out = cupy.empty((8, 24), f32)
    with pytest.raises(ValueError, match="inp"):
        matmul_forward(out, cupy.ones((8, 15), f32), w, b)
    with pytest.raises(ValueError, match="out"):
        matmul_forward(cupy.empty((8, 23), f32), x, w, b)
    with pytest.raises(ValueError, match="out"):
        matmul_forward(cupy.empty((7, 24), f32), x, w, b)
    with pytest.raises(ValueError, match="bias"):
        matmul_forward(out, x, w, cupy.ones(23, f32))
    with pytest.raises(ValueError, match="weight"):
        matmul_forward(out, x, w.astype(np.float64), b)
    small = cupy.empty(matmul_backward_scratch_size(8, 24) - 4, cupy.uint8)
    with pytest.raises(ValueError, match="scratch"):
        matmul_backward(cupy.empty_like(x), cupy.zeros_like(w), cupy.zeros_like(b), out, x, w,
                        small)
    with pytest.raises(ValueError, match="dweight"):
        matmul_backward(cupy.empty_like(x), cupy.zeros((24, 15), f32), None, out, x, w, None)


def test_product_dims_shared_by_cublas_and_cublaslt():
    """The one shape check both product wrappers use: (M, N, K), or a ValueError naming a/b."""
    from types import SimpleNamespace as A
    from llmc.cuda.cublas import product_dims
    c = A(shape=(4, 5))
    assert product_dims(c, A(shape=(4, 8)), A(shape=(8, 5)), False, False) == (4, 5, 8)
    assert product_dims(c, A(shape=(8, 4)), A(shape=(5, 8)), True, True) == (4, 5, 8)
    assert product_dims(A(shape=(3, 4, 5)), A(shape=(3, 4, 8)), A(shape=(8, 5)), False,
                        False) == (4, 5, 8)
    with pytest.raises(ValueError, match="^a: op\\(a\\) must have 4 rows"):
        product_dims(c, A(shape=(3, 8)), A(shape=(8, 5)), False, False)
    with pytest.raises(ValueError, match="^b: op\\(b\\) must have 5 columns"):
        product_dims(c, A(shape=(4, 8)), A(shape=(8, 6)), False, False)
    with pytest.raises(ValueError, match="^b: inner dimensions differ"):
        product_dims(c, A(shape=(4, 8)), A(shape=(7, 5)), False, False)


@pytest.mark.gpu
def test_tuning_picks_a_candidate_remembers_it_and_keeps_beta(monkeypatch, tmp_path):
    """LLMC_MATMUL_TUNE=1: the first call of a plan times the heuristic's candidates and keeps
    one; a beta=1 product still accumulates exactly once (tuning ran on scratch); the choice is
    written to $LLMC_CACHE_DIR and a fresh process state reads it back instead of timing."""
    import json
    import cupy
    from llmc.cuda import cublaslt, cublaslt_tuning
    monkeypatch.setenv("LLMC_MATMUL_TUNE", "1")
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path))

    def fresh():
        cublaslt_tuning._tuned_cache.clear()
        cublaslt._device(cupy.cuda.Device().id).plans.clear()

    rng = np.random.default_rng(7)
    a, a64 = randn(rng, (2048, 768), "bf16")           # a wgrad's dout (N, OC)
    x, x64 = randn(rng, (2048, 3072), "bf16")          # ... and its input (N, C)
    b, b64 = randn(rng, (3072, 768), "bf16", 768 ** -0.5)
    c0, c064 = randn(rng, (768, 3072), "bf16")
    fresh()
    try:
        c = device(c0)
        cublaslt.matmul(c, device(a), device(x), trans_a=True, beta=1.0)
        assert_close(host(c), c064 + a64.T @ x64, "bf16", "tuned c += a.T @ x")
        out = poisoned((2048, 3072), "bf16")
        cublaslt.matmul(out, device(a), device(b), trans_b=True)
        assert_close(host(out), a64 @ b64.T, "bf16", "tuned out = a @ b.T")
        plans = cublaslt._device(cupy.cuda.Device().id).plans
        assert all(p.tuned for p in plans.values())
        saved = json.loads(cublaslt_tuning.tuning_cache_path().read_text())
        (section, entries), = saved.items()
        chosen = {p.key_text: bytes(p.algo.data) for p in plans.values() if len(p.candidates) > 1}
        assert set(chosen) <= set(entries), "a tuned plan is missing from the cache file"
        for p in plans.values():
            if p.key_text in entries:
                assert bytes(p.candidates[entries[p.key_text]][0].data) == bytes(p.algo.data)
        # another process: the file's choice, not a new timing (make it a different rank)
        key = next(iter(chosen))
        entries[key] = (entries[key] + 1) % 2
        cublaslt_tuning.tuning_cache_path().write_text(json.dumps(saved))
        fresh()
        cublaslt.matmul(device(c0), device(a), device(x), trans_a=True, beta=1.0)
        cublaslt.matmul(poisoned((2048, 3072), "bf16"), device(a), device(b), trans_b=True)
        plan = next(p for p in plans.values() if p.key_text == key)
        assert bytes(plan.algo.data) == bytes(plan.candidates[entries[key]][0].data)
    finally:
        fresh()
