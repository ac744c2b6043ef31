"""Encoder launchers for kernels/encoder.cu: token + position embedding and its gradients.

    encoder_forward(out (B,T,C), inp int32 (B,T), wte (Vp,C), wpe (maxT,C))
    encoder_backward(dwte (Vp,C) +=, dwpe (maxT,C) +=, dout (B,T,C), inp int32 (B,T), scratch)
    encoder(inp, wte, wpe) -> out ; encoder_grad(dout, inp, wte.shape, wpe.shape) -> dwte, dwpe
        the same, allocating outputs and scratch (the gradients are new arrays, not +=)

C must be a multiple of the 128-bit pack (8 for bf16, 4 for fp32) and T <= maxT. Token ids
outside [0, Vp) give NaN rows in the forward and are skipped by the backward (the kernels
cannot raise; the NaN makes the bad batch visible in the loss).

The backward is deterministic (see the kernel file): positions are bucketed by token with a
stable counting sort built from integer atomics, then blocks of 32 sorted positions sum their
tokens' rows in a fixed order (buckets spanning blocks through fp32 partial rows). It needs `encoder_backward_scratch_size(B, T, C, Vp)` bytes of scratch.
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.ops import (I32, ceil_div, check, check_scratch, dtype_name, pack_size,
                      round_up)
from llmc.ops.arrays import empty, scratch as new_scratch, zeros

BLOCK = 256
SCAN_BLOCK = 1024
PIECE = 32                # DWTE_PIECE in the kernel: sorted entries per dwte_pieces block
PIECES_BLOCK = 128        # 32 * DWTE_WARPS
COMBINE_BLOCK = 256       # 32 * DWTE_COMBINE_WARPS


def _scratch_layout(B: int, T: int, C: int, Vp: int) -> dict:
    """Byte offsets into scratch: int32 counts (Vp), starts (Vp+1), bucket (BT), sorted (BT),
    then fp32 partial rows (pieces, 2, C) of the buckets that span pieces."""
    BT = B * T
    counts = 0
    starts = counts + round_up(4 * Vp)
    bucket = starts + round_up(4 * (Vp + 1))
    sorted_ = bucket + round_up(4 * BT)
    partial = sorted_ + round_up(4 * BT)
    end = partial + round_up(4 * ceil_div(BT, PIECE) * 2 * C)
    return dict(counts=counts, starts=starts, bucket=bucket, sorted=sorted_, partial=partial,
                end=end)


def encoder_backward_scratch_size(B: int, T: int, C: int, Vp: int) -> int:
    """Bytes of scratch encoder_backward needs: ~8 (Vp + BT) + BT C / 4 (6.7 MB for d12, B=64)."""
    return _scratch_layout(B, T, C, Vp)["end"]


def _check_common(x, inp, wte, wpe, names):
    """names: what x, wte, wpe are called in the caller (out/dout, wte/dwte, wpe/dwpe)."""
    xname, wname, pname = names
    dt = dtype_name(wte, wname)
    check(wname, wte, (None, None), dt)
    Vp, C = wte.shape
    check(pname, wpe, (None, C), dt)
    check("inp", inp, (None, None), I32)
    B, T = inp.shape
    check(xname, x, (B, T, C), dt)
    if C % pack_size(dt) != 0:
        raise ValueError(f"{wname}: C must be a multiple of {pack_size(dt)} for {dt} "
                         f"(128-bit access), got C={C}")
    if T > wpe.shape[0]:
        raise ValueError(f"inp: T={T} exceeds the {wpe.shape[0]} positions of {pname}")
    return dt, B, T, C, Vp


def encoder_forward(out, inp, wte, wpe):
    """out[b,t] = wte[inp[b,t]] + wpe[t]; out (B,T,C) floatX, inp int32 (B,T)."""
    dt, B, T, C, Vp = _check_common(out, inp, wte, wpe, ("out", "wte", "wpe"))
    packs = B * T * (C // pack_size(dt))
    if packs == 0:
        return out
    kernels.function("encoder", "encoder_forward", dt)(
        (ceil_div(packs, BLOCK),), (BLOCK,),
        (out, inp, wte, wpe, np.int32(B * T), np.int32(T), np.int32(C), np.int32(Vp)))
    return out


def encoder_backward(dwte, dwpe, dout, inp, scratch):
    """dwte += scatter-sum of dout rows by token; dwpe += sum over batch of dout. Deterministic."""
    dt, B, T, C, Vp = _check_common(dout, inp, dwte, dwpe, ("dout", "dwte", "dwpe"))
    BT = B * T
    lay = _scratch_layout(B, T, C, Vp)
    base = check_scratch("scratch", scratch, lay["end"])
    if BT == 0:
        return
    counts, starts = base + lay["counts"], base + lay["starts"]
    bucket, sorted_ = base + lay["bucket"], base + lay["sorted"]
    partial = base + lay["partial"]

    def fn(name):
        return kernels.function("encoder", name, dt)

    packs = C // pack_size(dt)
    fn("dwpe_backward")((ceil_div(T * packs, BLOCK),), (BLOCK,),
                        (dwpe, dout, np.int32(B), np.int32(T), np.int32(C)))
    fn("bucket_clear")((ceil_div(Vp, BLOCK),), (BLOCK,), (counts, np.int32(Vp)))
    fn("bucket_count")((ceil_div(BT, BLOCK),), (BLOCK,), (counts, inp, np.int32(BT), np.int32(Vp)))
    fn("bucket_scan")((1,), (SCAN_BLOCK,), (starts, counts, np.int32(Vp)))
    fn("bucket_scatter")((ceil_div(BT, BLOCK),), (BLOCK,),
                         (bucket, counts, starts, inp, np.int32(BT), np.int32(Vp)))
    fn("bucket_rank")((ceil_div(BT, BLOCK),), (BLOCK,),
                      (sorted_, bucket, starts, inp, np.int32(BT), np.int32(Vp)))
    pieces = ceil_div(BT, PIECE)
    fn("dwte_pieces")((pieces,), (PIECES_BLOCK,),
                      (dwte, partial, dout, sorted_, starts, inp, np.int32(C), np.int32(Vp)))
    fn("dwte_combine")((pieces, ceil_div(C, 128)), (COMBINE_BLOCK,),
                       (dwte, partial, sorted_, starts, inp, np.int32(C), np.int32(Vp)))


# ---------------------------------------------------------------------------------------------
# functional forms: allocate their outputs and scratch


def encoder(inp, wte, wpe):
    """Token + position embedding; returns out (B, T, C), a new array of wte's dtype.

    inp: int32 (B, T) token ids in [0, Vp); wte: (Vp, C), wpe: (maxT, C), bf16 or fp32, T <= maxT,
    C a multiple of 8 (bf16) or 4 (fp32). Saves nothing: the backward needs inp only.
    """
    check("inp", inp, (None, None), I32)
    check("wte", wte, (None, None))
    B, T = inp.shape
    return encoder_forward(empty((B, T, wte.shape[1]), wte.dtype), inp, wte, wpe)


def encoder_grad(dout, inp, wte_shape, wpe_shape):
    """Gradients of encoder through dout (B, T, C); returns (dwte, dwpe), new arrays of dout's
    dtype and the given shapes ((Vp, C), (maxT, C)) holding the gradient itself. Deterministic."""
    check("dout", dout, (None, None, None))
    B, T, C = dout.shape
    Vp = int(wte_shape[0])
    dwte, dwpe = zeros(tuple(wte_shape), dout.dtype), zeros(tuple(wpe_shape), dout.dtype)
    encoder_backward(dwte, dwpe, dout, inp,
                     new_scratch(encoder_backward_scratch_size(B, T, C, Vp)))
    return dwte, dwpe
