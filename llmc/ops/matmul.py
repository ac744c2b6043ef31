"""Linear layer launchers: cuBLAS products (llmc/cublas.py) plus kernels/matmul.cu for the bias.

    matmul_forward(out (N,OC), inp (N,C), weight (OC,C), bias (OC,) | None)
        out = inp @ weight.T + bias
    matmul_backward(dinp (N,C) =, dweight (OC,C) +=, dbias (OC,) += | None, dout (N,OC), inp,
                    weight, scratch)
        dinp = dout @ weight ; dweight += dout.T @ inp ; dbias += sum over rows of dout
    bias_backward(dbias (OC,) +=, dout (N,OC), scratch)      the dbias part alone

Rows may be (N, X) or (B, T, X). With a bias, the forward writes the bias into every row of out
and lets the product add onto it (beta = 1): one pass over out instead of a separate bias-add
pass after the product. dbias is deterministic (fixed per-block fp32 partials, then a
fixed-order reduction) and needs `matmul_backward_scratch_size(N, OC)` bytes of scratch.
cuBLAS accumulates in fp32 and never uses TF32 for fp32 arrays.
"""
from __future__ import annotations

import numpy as np

from llmc import cublas, kernels
from llmc.ops import (ceil_div, check, check_aligned, check_scratch, dtype_name, pack_size)

BROADCAST_BLOCK = 256
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


def matmul_forward(out, inp, weight, bias=None):
    """out (N,OC) = inp (N,C) @ weight (OC,C).T (+ bias (OC,)); floatX, fp32 accumulation."""
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
    N = x.shape[0]
    beta = 0.0
    if bias is not None:
        check("bias", bias, (OC,), dt)
        if OC % pack_size(dt) != 0:
            raise ValueError(f"bias: OC must be a multiple of {pack_size(dt)} for {dt} "
                             f"(128-bit access), got OC={OC}")
        check_aligned("out", out)
        check_aligned("bias", bias)
        packs = N * OC // pack_size(dt)
        if packs:
            kernels.function("matmul", "bias_broadcast", dt)(
                (ceil_div(packs, BROADCAST_BLOCK),), (BROADCAST_BLOCK,),
                (y, bias, np.int32(N), np.int32(OC)))
        beta = 1.0
    cublas.gemm(y, x, weight, trans_b=True, beta=beta)
    return out


def _dbias_grid(N: int) -> tuple:
    """(row blocks G, rows per block): fixed by N alone, so the sum order is GPU-independent."""
    G = max(1, min(ceil_div(N, DBIAS_MIN_ROWS), DBIAS_MAX_ROW_BLOCKS))
    return G, ceil_div(max(N, 1), G)


def matmul_backward_scratch_size(N: int, OC: int) -> int:
    """Bytes of scratch matmul_backward needs for dbias: fp32 (G, OC), G <= 256."""
    return _dbias_grid(N)[0] * OC * 4


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, scratch):
    """dinp = dout @ weight (=); dweight += dout.T @ inp; dbias += column sums of dout."""
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
    if dbias is not None:
        check("dbias", dbias, (OC,), dt)
        if OC % pack_size(dt) != 0:
            raise ValueError(f"dbias: OC must be a multiple of {pack_size(dt)} for {dt} "
                             f"(128-bit access), got OC={OC}")
        check_aligned("dout", dout)
        partial = check_scratch("scratch", scratch, matmul_backward_scratch_size(N, OC))
    cublas.gemm(dx, g, weight)
    cublas.gemm(dweight, g, x, trans_a=True, beta=1.0)
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
