"""Optimizer launchers for kernels/adamw.cu: deterministic gradient norm and fused AdamW.

    global_norm_squared(out f32 (1,) =, grads (n,), scratch)
    adamw_update(params floatX (n,), master f32 (n,) | None, grads floatX (n,), m f32 (n,),
                 v f32 (n,), norm_sq f32 (1,), *, lr, beta1, beta2, eps, weight_decay, step,
                 grad_clip, seed, ranges, offset=0)
    global_norm(grads) -> norm_sq f32 (1,)      global_norm_squared, allocating output and scratch

The update is one launch over the whole buffer (or a ZeRO shard of it): clip factor from the
device-side norm_sq (no host sync), AdamW per docs/DESIGN.md with bias correction t = step,
weight decay only inside the decayed ranges, fp32 master/m/v, and params written from the
master with stochastic rounding to bf16 (bits from (seed, step, global index), so shards and
reruns agree). In fp32 mode pass master=None: params are the fp32 master and are updated in
place. `offset` is the global index of element 0 (a ZeRO shard's start).

`ranges` is the device table from `decay_table(params.decay_ranges(mc))`, built once.
global_norm_squared needs `global_norm_scratch_size(n)` bytes of scratch. All buffers must be
16-byte aligned (a shard's start a multiple of 8 elements).
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.ops import (BF16, F32, ceil_div, check, check_aligned, check_scratch, dtype_name,
                      pack_size)
from llmc.ops.arrays import empty, scratch as new_scratch

NORM_BLOCK = 512
NORM_MAX_BLOCKS = 1024
FINAL_BLOCK = 1024
UPDATE_BLOCK = 256
I64 = np.dtype(np.int64)


def _norm_blocks(n: int) -> int:
    """Blocks of the first pass: fixed by n alone, so the summation order is GPU-independent."""
    return max(1, min(ceil_div(n, NORM_BLOCK * 8), NORM_MAX_BLOCKS))


def global_norm_scratch_size(n: int) -> int:
    """Bytes of scratch global_norm_squared needs: one fp32 partial per block (<= 4 KiB)."""
    return _norm_blocks(n) * 4


def global_norm_squared(out, grads, scratch):
    """out[0] = sum(grads ** 2) in fp32; deterministic (fixed partials, fixed-order final sum)."""
    dt = dtype_name(grads, "grads")
    check("grads", grads, (None,), dt)
    check("out", out, (1,), F32)
    check_aligned("grads", grads)
    partial = check_scratch("scratch", scratch, global_norm_scratch_size(grads.size))
    G = _norm_blocks(grads.size)
    kernels.function("adamw", "norm_squared_partial", dt)(
        (G,), (NORM_BLOCK,), (partial, grads, np.int64(grads.size)))
    kernels.function("adamw", "norm_squared_final", dt)(
        (1,), (FINAL_BLOCK,), (out, partial, np.int32(G)))
    return out


def decay_table(ranges):
    """Device int64 (R, 2) table of the decayed [start, stop) ranges of params.decay_ranges(mc).

    ranges: [(start, stop, decay)]; only decay=True entries are kept, sorted by start (the
    kernel bisects them); empty or overlapping ones are a ValueError. Build it once, outside
    the training step (it allocates).
    """
    rows = sorted((int(a), int(b)) for a, b, d in ranges if d)
    for (a0, b0), (a1, b1) in zip(rows, rows[1:] + [(None, None)]):
        if not 0 <= a0 < b0:
            raise ValueError(f"ranges: a decayed range must be [start, stop) with 0 <= start < "
                             f"stop, got ({a0}, {b0})")
        if a1 is not None and a1 < b0:
            raise ValueError(f"ranges: decayed ranges must not overlap, got ({a0}, {b0}) and "
                             f"({a1}, {b1})")
    import cupy
    table = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return cupy.asarray(table)


def adamw_update(params, master, grads, m, v, norm_sq, *, lr, beta1, beta2, eps, weight_decay,
                 step, grad_clip, seed, ranges, offset=0):
    """One fused AdamW step over n elements (see the module docstring); step counts from 1."""
    dt = dtype_name(params, "params")
    check("params", params, (None,), dt)
    n = params.size
    check("grads", grads, (n,), dt)
    check("m", m, (n,), F32)
    check("v", v, (n,), F32)
    check("norm_sq", norm_sq, (1,), F32)
    if master is not None:
        check("master", master, (n,), F32)
    elif params.dtype == BF16:
        raise ValueError("master: bf16 params need an fp32 master copy (got None); "
                         "only fp32 params are updated in place")
    check("ranges", ranges, (None, 2), I64)
    for name, a in (("params", params), ("master", master), ("grads", grads), ("m", m),
                    ("v", v)):
        if a is not None:
            check_aligned(name, a)
    if int(step) < 1:
        raise ValueError(f"step: AdamW's bias correction counts steps from 1, got {step}")
    if n == 0:
        return params
    grid = (ceil_div(ceil_div(n, pack_size(dt)), UPDATE_BLOCK),)
    kernels.function("adamw", "adamw_update", dt)(
        grid, (UPDATE_BLOCK,),
        (params, master, grads, m, v, norm_sq, ranges, np.int32(ranges.shape[0]), np.int64(n),
         np.int64(offset), np.float32(lr), np.float32(beta1), np.float32(beta2),
         np.float32(eps), np.float32(weight_decay), np.int32(step), np.float32(grad_clip),
         np.uint32(seed & 0xFFFFFFFF)))
    return params


def global_norm(*grads):
    """Sum of squares of every element of the given gradient arrays; a new f32 (1,) device array.

    Each array: 1-D, bf16 or fp32, 16-byte aligned (reshape(-1) a contiguous one). Deterministic;
    nothing is read back to the host: pass the result to adamw_update as norm_sq, or
    float(cupy.sqrt(norm_sq[0])) for the norm. Several arrays are summed on the device.
    """
    if not grads:
        raise ValueError("grads: expected at least one gradient array")
    for i, g in enumerate(grads):
        check(f"grads[{i}]", g)
    out = empty((1,), F32)
    part = empty((1,), F32)
    for i, g in enumerate(grads):
        global_norm_squared(out if i == 0 else part, g, new_scratch(global_norm_scratch_size(g.size)))
        if i:
            out += part
    return out
