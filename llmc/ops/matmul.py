"""Linear layer launchers: cuBLASLt products with fused epilogues (llmc/cuda/cublaslt.py) plus
kernels/matmul.cu for the bias gradient.

    matmul_forward(out (N,OC), inp (N,C), weight (OC,C), bias (OC,) | None, *, gelu=False,
                   pre_gelu=None)
        out = inp @ weight.T + bias                      (cuBLASLt's bias epilogue)
        with gelu: out = gelu(inp @ weight.T + bias)     (its GELU_BIAS epilogue; generation)
        with gelu and pre_gelu (N,OC): also pre_gelu = inp @ weight.T + bias, the GELU's input
                                                         (GELU_AUX_BIAS; training's fc layer)
    matvec_forward(out (M,OC), inp (M,C), weight, bias | None, *, gelu=False)    M <= 8 rows
        the same product by our kernel (kernels/matmul.cu): generation's one row per sequence
    matvec_layernorm_forward(out, residual, inp1, inp2, ln_weight, ln_bias, weight, bias, *, gelu)
        residual = inp1 + inp2; out = LayerNorm(residual) @ weight.T + bias, one launch
    matmul_backward(dinp (N,C) =, dweight (OC,C) +=, dbias (OC,) += | None, dout (N,OC), inp,
                    weight, scratch, *, pre_gelu=None)
        dinp = dout @ weight ; dweight += dout.T @ inp ; dbias += sum over rows of dout
        with pre_gelu (N,C) (inp = gelu(pre_gelu)): dinp = (dout @ weight) * gelu'(pre_gelu),
        the GELU backward fused into the product (cuBLASLt's DGELU epilogue, tanh GELU)
    bias_backward(dbias (OC,) +=, dout (N,OC), scratch)      the dbias part alone
    matmul(x, weight, bias=None) -> out
    matmul_grad(dout, x, weight, has_bias=True, pre_gelu=None) -> dx, dweight, dbias | None
        the same, allocating outputs and scratch (the gradients are new arrays, not +=)

Rows may be (N, X) or (B, T, X). The bias is added to the product's fp32 accumulator by the
epilogue, so out is written once. dbias is our deterministic two-pass reduction (fixed per-block
fp32 partials, then a fixed-order sum) and needs `matmul_backward_scratch_size(N, OC)` bytes of
scratch: cuBLASLt's bias-gradient epilogue (BGRADB) made the dweight product slower than the
product plus this reduction (bench/test_bench_matmul.py, H100: qkv 0.806 vs 0.768 ms) and it
writes only a bf16 vector beside a bf16 product. Products accumulate in fp32, never TF32.
"""
from __future__ import annotations

import numpy as np

from llmc import kernels

from llmc.cuda import cublaslt
from llmc.ops import (ceil_div, check, check_aligned, check_same, check_scratch, dtype_name,
                      pack_size, set_dynamic_smem)
from llmc.ops.arrays import empty, scratch as new_scratch, zeros

DBIAS_BY = 8            # thread rows of a bias_backward_partial block
DBIAS_MIN_ROWS = 64     # rows per block at least
DBIAS_MAX_ROW_BLOCKS = 256


def _as_rows(name, x, cols=None):
    """(N, X) view of an (N, X) or (..., X) C-contiguous array."""
    if x.ndim < 2:
        raise ValueError(f"{name}: expected (N, X) or (B, T, X), got shape {x.shape}")
    if cols is not None and x.shape[-1] != cols:
        raise ValueError(f"{name}: expected last dimension {cols}, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def matmul_forward(out, inp, weight, bias=None, *, gelu: bool = False, pre_gelu=None):
    """out (N,OC) = inp (N,C) @ weight (OC,C).T (+ bias (OC,)); floatX, fp32 accumulation.

    gelu=True: out = gelu(inp @ weight.T + bias), the tanh GELU applied to the fp32 accumulator
    in cuBLASLt's epilogue. Needs the bias. pre_gelu (out's shape and dtype, gelu=True only):
    also written, with the GELU's input rounded to floatX (what the backward's DGELU epilogue
    reads). Then out is the GELU of the unrounded sum, not of pre_gelu: our gelu kernel on
    pre_gelu (recompute=1) gives slightly different bits.
    """
    dt = dtype_name(weight, "weight")
    check("weight", weight, (None, None), dt)
    OC, C = weight.shape
    check("inp", inp, dtype=dt)
    check("out", out, dtype=dt)
    x = _as_rows("inp", inp, C)
    y = _as_rows("out", out, OC)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"out: expected {x.shape[0]} rows (those of inp {tuple(inp.shape)}), "
                         f"got shape {tuple(out.shape)}")
    if bias is not None:
        check("bias", bias, (OC,), dt)
    if pre_gelu is not None:
        if not gelu:
            raise ValueError("pre_gelu: only with gelu=True (it is the GELU's input)")
        check_same("pre_gelu", pre_gelu, out, "out")
    if gelu and bias is None:
        raise ValueError("bias: matmul_forward(gelu=True) needs the bias (the epilogue adds it "
                         "before the GELU)")
    if pre_gelu is not None:
        cublaslt.matmul(y, x, weight, trans_b=True, epilogue="gelu_aux_bias", bias=bias,
                        aux=_as_rows("pre_gelu", pre_gelu, OC))
        return out
    epilogue = "gelu_bias" if gelu else ("default" if bias is None else "bias")
    cublaslt.matmul(y, x, weight, trans_b=True, epilogue=epilogue, bias=bias)
    return out


def _dbias_grid(N: int) -> tuple:
    """(row blocks G, rows per block): fixed by N alone, so the sum order is GPU-independent."""
    G = max(1, min(ceil_div(N, DBIAS_MIN_ROWS), DBIAS_MAX_ROW_BLOCKS))
    return G, ceil_div(max(N, 1), G)


def matmul_backward_scratch_size(N: int, OC: int) -> int:
    """Bytes of scratch matmul_backward needs for dbias: fp32 (G, OC), G <= 256."""
    return _dbias_grid(N)[0] * OC * 4


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, scratch, *, pre_gelu=None):
    """dinp = dout @ weight (=); dweight += dout.T @ inp; dbias += column sums of dout.

    With pre_gelu (N,C), the forward's input was inp = gelu(pre_gelu) and dinp is the gradient
    with respect to pre_gelu: (dout @ weight) * gelu'(pre_gelu), fused into the product.
    """
    dt = dtype_name(weight, "weight")
    check("weight", weight, (None, None), dt)
    OC, C = weight.shape
    check("dweight", dweight, (OC, C), dt)
    for name, a in (("dout", dout), ("inp", inp), ("dinp", dinp)):
        check(name, a, dtype=dt)
    g = _as_rows("dout", dout, OC)
    x = _as_rows("inp", inp, C)
    dx = _as_rows("dinp", dinp, C)
    N = g.shape[0]
    for name, a in (("inp", x), ("dinp", dx)):
        if a.shape[0] != N:
            raise ValueError(f"{name}: expected {N} rows (those of dout {tuple(dout.shape)}), "
                             f"got {a.shape[0]}")
    if pre_gelu is not None:
        check_same("pre_gelu", pre_gelu, dinp, "dinp")
    if dbias is not None:
        check("dbias", dbias, (OC,), dt)
        if OC % pack_size(dt) != 0:
            raise ValueError(f"dbias: OC must be a multiple of {pack_size(dt)} for {dt} "
                             f"(128-bit access), got OC={OC}")
        check_aligned("dout", dout)
        partial = check_scratch("scratch", scratch, matmul_backward_scratch_size(N, OC))
    if pre_gelu is None:
        cublaslt.matmul(dx, g, weight)
    else:
        cublaslt.matmul(dx, g, weight, epilogue="dgelu", aux=_as_rows("pre_gelu", pre_gelu, C))
    cublaslt.matmul(dweight, g, x, trans_a=True, beta=1.0)
    if dbias is not None:
        _bias_backward(dbias, g, partial, dt)


def _bias_backward(dbias, dout2d, partial, dt):
    N, OC = dout2d.shape
    if N == 0:
        return
    G, rows = _dbias_grid(N)
    size = pack_size(dt)
    kernels.function("matmul", "bias_backward_partial", dt)(
        (ceil_div(OC, 32 * size), G), (32, DBIAS_BY),
        (partial, dout2d, np.int32(N), np.int32(OC), np.int32(rows)),
        shared_mem=32 * DBIAS_BY * size * 4)
    kernels.function("matmul", "bias_backward_reduce", dt)(
        (ceil_div(OC, 32),), (32, 32), (dbias, partial, np.int32(G), np.int32(OC)))


def bias_backward(dbias, dout, scratch):
    """dbias (OC,) += column sums of dout (N, OC) alone (matmul_backward does this too)."""
    dt = dtype_name(dbias, "dbias")
    check("dbias", dbias, (None,), dt)
    OC = dbias.shape[0]
    check("dout", dout, dtype=dt)
    g = _as_rows("dout", dout, OC)
    if OC % pack_size(dt) != 0:
        raise ValueError(f"dbias: OC must be a multiple of {pack_size(dt)} for {dt} "
                         f"(128-bit access), got OC={OC}")
    check_aligned("dout", dout)
    partial = check_scratch("scratch", scratch, matmul_backward_scratch_size(g.shape[0], OC))
    _bias_backward(dbias, g, partial, dt)


MATVEC_MAX_ROWS = 8   # MV_MAX_ROWS in kernels/matmul.cu
MATVEC_THREADS = 256


def _matvec_check(out, inp, weight, bias):
    """(dtype name, M, C, OC, out rows, inp rows) for a few-row product; ValueErrors otherwise."""
    dt = dtype_name(weight, "weight")
    check("weight", weight, (None, None), dt)
    OC, C = weight.shape
    x = _as_rows("inp", check("inp", inp, dtype=dt), C)
    y = _as_rows("out", check("out", out, dtype=dt), OC)
    M = x.shape[0]
    if y.shape[0] != M:
        raise ValueError(f"out: expected {M} rows (those of inp {tuple(inp.shape)}), got shape "
                         f"{tuple(out.shape)}")
    if not 1 <= M <= MATVEC_MAX_ROWS:
        raise ValueError(f"inp: matvec_forward takes 1 to {MATVEC_MAX_ROWS} rows, got {M}; use "
                         f"matmul_forward")
    if C % pack_size(dt) != 0:
        raise ValueError(f"weight: C = {C} must be a multiple of {pack_size(dt)} for {dt}")
    if bias is not None:
        check("bias", bias, (OC,), dt)
    for name, a in (("inp", inp), ("weight", weight)):
        check_aligned(name, a)
    return dt, M, C, OC, y, x


def _matvec_launch(name, dt, M, C, OC, make_args):
    """Launch with tpc threads per output column: about two packs of the row each."""
    packs = C // pack_size(dt)
    tpc = min(MATVEC_THREADS, max(32, 1 << max(0, (packs // 2 - 1).bit_length())))
    kernel = kernels.function("matmul", name, dt)
    smem = M * C * (4 if dt == "fp32" else 2)  # the M input rows, floatX
    set_dynamic_smem(kernel, smem + 1024)  # + the kernel's static reduction buffer
    kernel((ceil_div(OC, MATVEC_THREADS // tpc),), (MATVEC_THREADS,), make_args(np.int32(tpc)),
           shared_mem=smem)


def matvec_forward(out, inp, weight, bias=None, *, gelu: bool = False):
    """out (M,OC) = inp (M,C) @ weight (OC,C).T (+ bias) [then tanh GELU], M <= 8 rows.

    The few-row product of text generation (one row per sequence): our kernel streams the
    weights once with 16-byte loads; same contract as matmul_forward (fp32 accumulation, one
    rounding of out), for M <= MATVEC_MAX_ROWS and C a multiple of the 128-bit pack.
    """
    dt, M, C, OC, y, x = _matvec_check(out, inp, weight, bias)
    _matvec_launch("matvec_forward", dt, M, C, OC, lambda tpc: (
        y, x, weight, bias if bias is not None else np.uint64(0), np.int32(M), np.int32(C),
        np.int32(OC), tpc, np.int32(1 if gelu else 0)))
    return out


def matvec_layernorm_forward(out, residual, inp1, inp2, ln_weight, ln_bias, weight, bias=None,
                             *, gelu: bool = False, eps: float = 1e-5):
    """out (M,OC) = LayerNorm(inp1 + inp2) @ weight.T (+ bias) [then GELU], M <= 8 rows.

    residual (M,C) = inp1 + inp2 rounded to floatX (written when inp2 is given; pass None for
    both to normalize inp1 alone). The LayerNorm as layernorm_forward's (eps, fp32 statistics
    of the rounded residual, output rounded to floatX), without saving mean/rstd: generation's
    fused residual + LayerNorm + product, one launch.
    """
    dt, M, C, OC, y, x = _matvec_check(out, inp1, weight, bias)
    if (inp2 is None) != (residual is None):
        raise ValueError("inp2 and residual: give both (residual = inp1 + inp2) or neither")
    if inp2 is not None:
        check_same("inp2", inp2, inp1, "inp1")
        check_same("residual", residual, inp1, "inp1")
        check_aligned("inp2", inp2)
        check_aligned("residual", residual)
    for name, a in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check(name, a, (C,), dt)
        check_aligned(name, a)
    null = np.uint64(0)
    _matvec_launch("matvec_layernorm_forward", dt, M, C, OC, lambda tpc: (
        y, residual if residual is not None else null, x, inp2 if inp2 is not None else null,
        ln_weight, ln_bias, weight, bias if bias is not None else null, np.int32(M),
        np.int32(C), np.int32(OC), tpc, np.int32(1 if gelu else 0), np.float32(eps)))
    return out


# ---------------------------------------------------------------------------------------------
# functional forms: allocate their outputs and scratch


def matmul(x, weight, bias=None):
    """out = x @ weight.T (+ bias); a new array.

    x: (N, C) or (B, T, C); weight: (OC, C); bias: (OC,) or None; all bf16 or all fp32 (fp32
    accumulation, no TF32). out: x.shape[:-1] + (OC,). Saves nothing: the backward needs x, weight.
    """
    check("x", x)
    check("weight", weight, (None, None))
    return matmul_forward(empty(x.shape[:-1] + (weight.shape[0],), x.dtype), x, weight, bias)


def matmul_grad(dout, x, weight, has_bias: bool = True, *, pre_gelu=None):
    """Gradients of matmul through dout (x.shape[:-1] + (OC,)); returns (dx, dweight, dbias).

    New arrays holding the gradients themselves: dx x's shape, dweight (OC, C), dbias (OC,) or
    None when has_bias is False (then OC needs no alignment). With pre_gelu (x's shape; x was
    gelu(pre_gelu)), dx is the gradient with respect to pre_gelu, the GELU backward fused in.
    """
    check("x", x)
    check("weight", weight, (None, None))
    OC, C = weight.shape
    dx, dweight = empty(x.shape, x.dtype), zeros((OC, C), weight.dtype)
    dbias, scratch = None, None
    if has_bias:
        dbias = zeros((OC,), weight.dtype)
        rows = x.size // C if C else 0
        scratch = new_scratch(matmul_backward_scratch_size(rows, OC))
    matmul_backward(dx, dweight, dbias, dout, x, weight, scratch, pre_gelu=pre_gelu)
    return dx, dweight, dbias


def matvec(x, weight, bias=None, *, gelu: bool = False):
    """New (M, OC) array: x (M, C) @ weight.T (+ bias) [then tanh GELU] for M <= 8 rows, by the
    weight-streaming kernel of generation (matvec_forward into a new array)."""
    check("x", x)
    check("weight", weight, (None, None))
    return matvec_forward(empty(x.shape[:-1] + (weight.shape[0],), x.dtype), x, weight, bias,
                          gelu=gelu)
