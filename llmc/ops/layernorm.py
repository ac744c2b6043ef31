"""LayerNorm and residual launchers for kernels/layernorm.cu.

    layernorm_forward(out (N,C), mean f32 (N,), rstd f32 (N,), inp (N,C), weight (C,), bias (C,))
    fused_residual_layernorm_forward(residual, out, mean, rstd, inp1, inp2, weight, bias)
        residual = inp1 + inp2 (stored), then out = LayerNorm(residual)
    residual_forward(out, inp1, inp2)                       out = inp1 + inp2 (any shape)
    layernorm_backward(dinp +=, dweight +=, dbias +=, dout, inp, weight, mean, rstd, scratch,
                       *, dinp_colsum=None)
        dinp_colsum (C,) += column sums of dinp as updated: the bias gradient of the linear
        layer whose output joined the residual stream dinp is the gradient of
Functional forms (allocate their outputs and scratch):
    layernorm(x, weight, bias) -> out, (mean, rstd)
    layernorm_grad(dout, x, weight, saved) -> dx, dweight, dbias
    residual_layernorm(a, b, weight, bias) -> residual, out, (mean, rstd)
    residual(a, b) -> a + b

Rows may be given as (N, C) or (B, T, C): every dimension but the last is a row. C must be a
multiple of the 128-bit pack (8 bf16 / 4 fp32). One warp per row; the forward caches the row in
shared memory. The backward is deterministic: per-block fp32 partials of dweight/dbias (and
dinp_colsum) in scratch (`layernorm_backward_scratch_size(N, C)` bytes), then a fixed-order
reduction.
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.ops import (F32, ceil_div, check, check_aligned, check_same, check_scratch,
                      dtype_name, pack_size, set_dynamic_smem)
from llmc.ops.arrays import empty, scratch as new_scratch, zeros

FWD_WARPS = 8       # rows per forward block
BWD_MAX_WARPS = 16          # rows in flight per backward block, at most
BWD_SMEM_BUDGET = 96 * 1024  # the block's per-warp accumulators fit every supported GPU's opt-in
BWD_MAX_BLOCKS = 256        # fp32 partials (G, 2C or 3C) the reduction then adds
EW_BLOCK = 256      # residual_forward


def _rows(name, x):
    if x.ndim < 2:
        raise ValueError(f"{name}: expected (N, C) or (B, T, C), got shape {x.shape}")
    return x.size // x.shape[-1] if x.shape[-1] else 0, x.shape[-1]


def _check_ln(names, x, mean, rstd, weight, bias, others):
    """Validate a LayerNorm call; `others` are (name, array) of x's shape. Returns dt, N, C."""
    dt = dtype_name(x, names[0])
    check(names[0], x)
    N, C = _rows(names[0], x)
    if C % pack_size(dt) != 0:
        raise ValueError(f"{names[0]}: C must be a multiple of {pack_size(dt)} for {dt} "
                         f"(128-bit access), got C={C}")
    for name, a in others:
        check_same(name, a, x, names[0])
    check("weight", weight, (C,), dt)
    if bias is not None:
        check("bias", bias, (C,), dt)
    for name, a in (("mean", mean), ("rstd", rstd)):
        check(name, a, dtype=F32)
        if a.size != N:
            raise ValueError(f"{name}: expected {N} fp32 values (one per row of {names[0]} "
                             f"{tuple(x.shape)}), got shape {tuple(a.shape)}")
    for name, a in [(names[0], x), ("weight", weight)] + list(others):
        check_aligned(name, a)
    if bias is not None:
        check_aligned("bias", bias)
    return dt, N, C


def _forward_launch(name, dt, N, C, args):
    kernel = kernels.function("layernorm", name, dt)
    smem = FWD_WARPS * C * (16 // pack_size(dt))  # the block's rows, floatX
    set_dynamic_smem(kernel, smem)
    kernel((ceil_div(N, FWD_WARPS),), (32 * FWD_WARPS,), args, shared_mem=smem)


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps: float = 1e-5):
    """out = (inp - mean) * rstd * weight + bias per row; saves mean, rstd (fp32)."""
    dt, N, C = _check_ln(("inp",), inp, mean, rstd, weight, bias, [("out", out)])
    if N == 0:
        return out
    _forward_launch("layernorm_forward", dt, N, C,
                    (out, mean, rstd, inp, weight, bias, np.int32(N), np.int32(C), np.float32(eps)))
    return out


def fused_residual_layernorm_forward(residual, out, mean, rstd, inp1, inp2, weight, bias,
                                     eps: float = 1e-5):
    """residual = inp1 + inp2; out = LayerNorm(residual) with its mean, rstd."""
    dt, N, C = _check_ln(("inp1",), inp1, mean, rstd, weight, bias,
                         [("inp2", inp2), ("residual", residual), ("out", out)])
    if N == 0:
        return out
    _forward_launch("fused_residual_layernorm_forward", dt, N, C,
                    (residual, out, mean, rstd, inp1, inp2, weight, bias, np.int32(N),
                     np.int32(C), np.float32(eps)))
    return out


def residual_forward(out, inp1, inp2):
    """out = inp1 + inp2 (any shape, floatX)."""
    dt = dtype_name(inp1, "inp1")
    check("inp1", inp1)
    check_same("inp2", inp2, inp1, "inp1")
    check_same("out", out, inp1, "inp1")
    for name, a in (("out", out), ("inp1", inp1), ("inp2", inp2)):
        check_aligned(name, a)
    n = inp1.size
    if n == 0:
        return out
    kernels.function("layernorm", "residual_forward", dt)(
        (ceil_div(ceil_div(n, pack_size(dt)), EW_BLOCK),), (EW_BLOCK,),
        (out, inp1, inp2, np.int64(n)))
    return out


def _backward_geometry(N: int, C: int, dt: str, K: int = 2) -> tuple:
    """(blocks G, warps per block) of the backward with K accumulators per column (2; 3 with
    dinp_colsum): fixed by (N, C, dtype, K) alone, so the summation order is the same on any
    GPU. As many warps as BWD_SMEM_BUDGET holds (16 at C = 768 and K = 2: 256 blocks of 16 warps
    keep as many rows in flight as 1024 blocks of 4, and leave a quarter of the partials for the
    reduction to add; 10 with K = 3)."""
    chunk = 32 * pack_size(dt)
    per_warp = K * ceil_div(C, chunk) * chunk * 4
    warps = max(1, min(BWD_MAX_WARPS, BWD_SMEM_BUDGET // per_warp))
    return max(1, min(ceil_div(N, warps), BWD_MAX_BLOCKS)), warps


def layernorm_backward_scratch_size(N: int, C: int) -> int:
    """Bytes of scratch layernorm_backward needs: fp32 (G, 3C) partials, G <= min(N, 256)."""
    return max(1, min(N, BWD_MAX_BLOCKS)) * 3 * C * 4


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, *,
                       dinp_colsum=None):
    """dinp += dL/dinp; dweight += sum(dout * xhat); dbias += sum(dout); dinp_colsum (C,) or
    None += the column sums of dinp after that update (a linear layer's bias gradient when dinp
    is the gradient of its output). Deterministic."""
    dt, N, C = _check_ln(("inp",), inp, mean, rstd, weight, None,
                         [("dout", dout), ("dinp", dinp)])
    check("dweight", dweight, (C,), dt)
    check("dbias", dbias, (C,), dt)
    if dinp_colsum is not None:
        check("dinp_colsum", dinp_colsum, (C,), dt)
    K = 2 if dinp_colsum is None else 3
    G, warps = _backward_geometry(N, C, dt, K)
    partial = check_scratch("scratch", scratch, layernorm_backward_scratch_size(N, C))
    if N == 0:
        return
    kernel = kernels.function("layernorm", "layernorm_backward", dt)
    chunk = 32 * pack_size(dt)  # the kernel pads each warp's accumulators to whole chunks
    smem = warps * K * ceil_div(C, chunk) * chunk * 4
    set_dynamic_smem(kernel, smem)
    kernel((G,), (32 * warps,),
           (dinp, partial, dout, inp, weight, mean, rstd, np.int32(N), np.int32(C),
            np.int32(K == 3)), shared_mem=smem)
    kernels.function("layernorm", "layernorm_backward_reduce", dt)(
        (ceil_div(K * C, 32),), (32, 32),
        (dweight, dbias, dinp_colsum if dinp_colsum is not None else np.uint64(0), partial,
         np.int32(G), np.int32(C)))


# ---------------------------------------------------------------------------------------------
# functional forms: allocate their outputs and scratch


def layernorm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last dimension; returns (out, saved) as new arrays.

    x: (N, C) or (B, T, C), bf16 or fp32, C a multiple of 8 (bf16) or 4 (fp32); weight, bias:
    (C,) of x's dtype. out: x's shape and dtype. saved = (mean, rstd): fp32 of shape x.shape[:-1],
    the row statistics layernorm_grad needs (with x and weight).
    """
    check("x", x)
    stats = x.shape[:-1]
    out, mean, rstd = empty(x.shape, x.dtype), empty(stats, F32), empty(stats, F32)
    layernorm_forward(out, mean, rstd, x, weight, bias, eps)
    return out, (mean, rstd)


def layernorm_grad(dout, x, weight, saved):
    """Gradients of layernorm through dout (x's shape and dtype); returns (dx, dweight, dbias).

    saved: the (mean, rstd) layernorm returned. The three are new arrays holding the gradient
    itself (the out= form layernorm_backward accumulates, +=, into given buffers). Deterministic.
    """
    check("x", x)
    mean, rstd = _saved_pair(saved)
    N, C = _rows("x", x)
    dx, dweight, dbias = zeros(x.shape, x.dtype), zeros((C,), x.dtype), zeros((C,), x.dtype)
    layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd,
                       new_scratch(layernorm_backward_scratch_size(N, C)))
    return dx, dweight, dbias


def residual_layernorm(a, b, weight, bias, eps: float = 1e-5):
    """residual = a + b and out = LayerNorm(residual) in one pass; new arrays.

    Shapes and dtypes as layernorm (a, b alike). Returns (residual, out, (mean, rstd)):
    layernorm_grad(dout, residual, weight, (mean, rstd)) is its LayerNorm's backward.
    """
    check("a", a)
    stats = a.shape[:-1]
    res, out = empty(a.shape, a.dtype), empty(a.shape, a.dtype)
    mean, rstd = empty(stats, F32), empty(stats, F32)
    fused_residual_layernorm_forward(res, out, mean, rstd, a, b, weight, bias, eps)
    return res, out, (mean, rstd)


def residual(a, b):
    """a + b (any shape, bf16 or fp32, a and b alike); a new array. Also the way to add two
    gradients (the residual stream's backward, a tied weight's two uses)."""
    check("a", a)
    return residual_forward(empty(a.shape, a.dtype), a, b)


def _saved_pair(saved):
    if not isinstance(saved, (tuple, list)) or len(saved) != 2:
        raise ValueError(f"saved: expected the (mean, rstd) pair layernorm returned, got "
                         f"{type(saved).__name__}")
    return saved
