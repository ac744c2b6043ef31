"""Encoder launchers for kernels/encoder.cu: token + position embedding and its gradients.

    encoder_forward(out (B,T,C), inp int32 (B,T), wte (Vp,C), wpe (maxT,C))
    encoder_backward(dwte (Vp,C) +=, dwpe (maxT,C) +=, dout (B,T,C), inp int32 (B,T), scratch)

C must be a multiple of the 128-bit pack (8 for bf16, 4 for fp32) and T <= maxT. Token ids
outside [0, Vp) give NaN rows in the forward and are skipped by the backward (the kernels
cannot raise; the NaN makes the bad batch visible in the loss).

The backward is deterministic (see the kernel file): positions are bucketed by token with a
stable counting sort built from integer atomics, then one block per token sums its rows in a
fixed order. It needs `encoder_backward_scratch_size(B, T, Vp)` bytes of scratch.
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.ops import (I32, ceil_div, check, check_scratch, dtype_name, pack_size,
                      round_up)

BLOCK = 256
SCAN_BLOCK = 1024
DWTE_BLOCK = 256  # 32 * DWTE_WARPS in the kernel


def _scratch_layout(B: int, T: int, Vp: int) -> dict:
    """Byte offsets into scratch: counts (Vp), starts (Vp+1), bucket (BT), sorted (BT); int32."""
    BT = B * T
    counts = 0
    starts = counts + round_up(4 * Vp)
    bucket = starts + round_up(4 * (Vp + 1))
    sorted_ = bucket + round_up(4 * BT)
    end = sorted_ + round_up(4 * BT)
    return dict(counts=counts, starts=starts, bucket=bucket, sorted=sorted_, end=end)


def encoder_backward_scratch_size(B: int, T: int, Vp: int) -> int:
    """Bytes of scratch encoder_backward needs: ~8 (Vp + B T) bytes."""
    return _scratch_layout(B, T, Vp)["end"]


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
    lay = _scratch_layout(B, T, Vp)
    base = check_scratch("scratch", scratch, lay["end"])
    if BT == 0:
        return
    counts, starts = base + lay["counts"], base + lay["starts"]
    bucket, sorted_ = base + lay["bucket"], base + lay["sorted"]

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
    fn("dwte_backward")((Vp,), (DWTE_BLOCK,), (dwte, dout, sorted_, starts, np.int32(C)))
