"""Causal flash attention launchers: kernels/flash_attention.cu (forward),
kernels/flash_attention_bwd.cu (backward), and on Hopper kernels/flash_attention_sm90.cu and
kernels/flash_attention_sm90_bwd.cu (the same, on wgmma). bf16 only, head size 64, no T x T
matrix.

    flash_attention_forward(out (B,T,C) =, lse (B,NH,T) f32 =, qkv (B,T,3C), n_head, impl=None)
    flash_attention_backward(dqkv (B,T,3C) =, dout (B,T,C), qkv, out, lse, n_head, scratch,
                             impl=None)
    flash_scratch_shapes(B, T, C, NH) -> {"D": ((B, NH, T), float32)}
    flash_attention(qkv, n_head) -> out, lse ; flash_attention_grad(dout, qkv, out, lse, n_head)
        -> dqkv: the same, allocating outputs and scratch

qkv holds q, k, v at channels [0, C), [C, 2C), [2C, 3C), head h at h*64..h*64+63; lse is the
natural-log softmax normalizer per (b, h, t), saved by the forward for the backward.

Design (the kernels' opening comments have the details):
- Forward: a block is 16*W query rows of one head (W warps of 16 rows), streaming 64-key tiles
  of K and V; online softmax in registers; causal tiles skipped, the diagonal one masked.
- Backward, deterministic without atomics: `backward_dq` (per query tile, also computes
  D = rowsum(dout * out) into scratch["D"]) then `backward_dkdv` (per key tile, reads D). P is
  rebuilt from lse in both, 7 tile products instead of 5, but no fp32 dq buffer and no atomics.
- The grid is (NH, tiles per head, B): blocks start with the heads of one batch, the longest
  tiles of each first (kernels/flash_attention.cuh, fa_query_tile).
- Forward implementation (`impl`): "sm80" (mma.sync, every device) or "sm90" (wgmma, compute
  capability 9.0 only, compiled for sm_90a); None takes $LLMC_FLASH_IMPL, else "sm90" on a 9.0
  device and "sm80" elsewhere. "sm90:<variant>" names one of SM90_VARIANTS (warpgroups per block,
  keys per tile; one is left: bench/test_bench_attention.py and docs/RESULTS.md say which others
  lost). Both forwards write the same out and lse, so either backward takes either forward's.
- Backward implementation (`impl` of the backward, resolve_bwd_impl): "sm80" or "sm90" (the same
  two kernels on wgmma, one 64-row warpgroup per block); None takes $LLMC_FLASH_BWD_IMPL, else
  "sm90" on a 9.0 device and "sm80" elsewhere.
- W = 4 warps per block: the 8-warp variants measured slower on an H100 (forward 0.441 vs 0.419
  ms, backward 1.875 vs 1.487 ms at B=64, NH=12, T=1024) and were removed. Shared memory sizes
  below mirror the kernels' layouts.

Tests: pytest tests/test_flash_attention.py (GPU); bench: pytest bench/test_bench_attention.py.
"""
from __future__ import annotations

import os

import numpy as np

from llmc import kernels
from llmc.ops import BF16, F32, check, check_aligned, ceil_div
from llmc.ops.arrays import empty

HEAD_SIZE = 64
TILE = 64  # rows of the streamed K/V (forward, dq) or Q/dO (dk/dv) tiles, as FA_TILE
WARPS = 4  # warps per block in every flash kernel
_TILE_BYTES = TILE * HEAD_SIZE * 2
_DEFAULT_SMEM = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory

IMPLS = ("sm80", "sm90")
BWD_IMPLS = ("sm80", "sm90")
SM90_VARIANTS = {"w1n128": (1, 128)}  # (warpgroups, keys per tile); the others measured slower
SM90_DEFAULT = "w1n128"  # H200, B=64: fwd 0.317 ms (cuDNN 0.299, alternated); sm80 kernel 0.429

_kernels: dict = {}  # (family, name, device) -> RawKernel with its shared-memory limit raised


def _smem_bytes(kind: str, warps: int) -> int:
    rows = 16 * warps  # block rows: queries (forward, dq) or keys (dkdv)
    if kind == "forward":    # Q tile, K and V double-buffered
        return rows * 128 + 4 * _TILE_BYTES
    if kind == "dq":         # Q and dO tiles, K and V double-buffered, D per row
        return 2 * rows * 128 + 4 * _TILE_BYTES + rows * 4
    if kind == "dkdv":       # K and V tiles, Q and dO double-buffered, lse and D double-buffered
        return 2 * rows * 128 + 4 * _TILE_BYTES + 4 * TILE * 4
    raise ValueError(f"kind: unknown kernel kind {kind!r}")


def _smem_bytes_sm90(warpgroups: int, keys: int) -> int:
    """Q (64 rows a warpgroup), K and V double-buffered, 1 KiB to round up to the swizzle atom."""
    return warpgroups * 64 * 128 + 4 * keys * 128 + 1024


def _smem_bytes_sm90_bwd(kind: str) -> int:
    """Six 64-row tiles, D (dq: 64 floats) or lse and D double-buffered (dkdv: 256), 1 KiB slack."""
    return 6 * _TILE_BYTES + (64 if kind == "dq" else 256) * 4 + 1024


def _function(family: str, name: str, smem: int, all_shared: bool = False):
    import cupy
    key = (family, name, cupy.cuda.Device().id)
    k = _kernels.get(key)
    if k is None:
        k = kernels.function(family, name, "bf16")
        if smem > _DEFAULT_SMEM:
            k.max_dynamic_shared_size_bytes = smem
        if all_shared:  # the sm90 kernels: their blocks per SM are counted in shared memory, and
            k.preferred_shared_memory_carveout = 100  # their tile loads bypass L1
        _kernels[key] = k
    return k


def _kernel(family: str, kind: str, warps: int):
    name = "flash_attention_forward" if kind == "forward" else f"flash_attention_backward_{kind}"
    return _function(family, name, _smem_bytes(kind, warps))


def resolve_impl(impl=None) -> str:
    """The forward implementation to run: "sm80", or "sm90:<variant>" (see the module docstring)."""
    import cupy
    if impl is None:
        impl = os.environ.get("LLMC_FLASH_IMPL") or None
    cc = cupy.cuda.Device().compute_capability
    if impl is None:
        impl = "sm90" if cc == "90" else "sm80"
    base, _, variant = str(impl).partition(":")
    if base not in IMPLS or (base == "sm80" and variant) or \
            (variant and variant not in SM90_VARIANTS):
        raise ValueError(f"impl: expected one of {IMPLS} or 'sm90:<variant>' with a variant of "
                         f"{sorted(SM90_VARIANTS)}, got {impl!r}")
    if base == "sm80":
        return "sm80"
    if cc != "90":
        raise ValueError(f"impl: {impl!r} needs a device of compute capability 9.0 (sm_90a "
                         f"wgmma), this one is {cc[:-1]}.{cc[-1:]}; use 'sm80'")
    return f"sm90:{variant or SM90_DEFAULT}"


def resolve_bwd_impl(impl=None) -> str:
    """The backward implementation to run: "sm80" or "sm90" (see the module docstring)."""
    import cupy
    if impl is None:
        impl = os.environ.get("LLMC_FLASH_BWD_IMPL") or None
    cc = cupy.cuda.Device().compute_capability
    if impl is None:
        return "sm90" if cc == "90" else "sm80"
    if impl not in BWD_IMPLS:
        raise ValueError(f"impl: expected a backward implementation of {BWD_IMPLS}, got {impl!r}")
    if impl == "sm90" and cc != "90":
        raise ValueError(f"impl: backward 'sm90' needs a device of compute capability 9.0 (sm_90a "
                         f"wgmma), this one is {cc[:-1]}.{cc[-1:]}; use 'sm80'")
    return impl


def _check_qkv(qkv, n_head: int):
    check("qkv", qkv, (None, None, None))
    if qkv.dtype != BF16:
        raise ValueError(f"qkv: flash attention takes bfloat16 only, got {qkv.dtype}; use "
                         f"attention=\"matmul\" for other dtypes")
    B, T, C3 = qkv.shape
    if C3 % 3 != 0:
        raise ValueError(f"qkv: last dimension must be 3*C, got {C3}")
    C = C3 // 3
    if not isinstance(n_head, (int, np.integer)) or n_head <= 0 or C % n_head != 0:
        raise ValueError(f"n_head: must be a positive divisor of C = {C}, got {n_head!r}")
    if C // n_head != HEAD_SIZE:
        raise ValueError(f"n_head: flash attention needs head size {HEAD_SIZE}, got C / n_head = "
                         f"{C} / {n_head} = {C // n_head}; use attention=\"matmul\"")
    check_aligned("qkv", qkv)
    return B, T, C, int(n_head)


def flash_scratch_shapes(B: int, T: int, C: int, NH: int) -> dict:
    """Scratch the backward needs, {name: (shape, dtype)}: D = rowsum(dout * out) (B, NH, T) f32."""
    return {"D": ((B, NH, T), F32)}


def flash_attention_forward(out, lse, qkv, n_head: int, impl=None):
    """out (B, T, C) bf16 = causal softmax(q k^T / 8) v per head; lse (B, NH, T) f32 = log of
    each row's softmax normalizer (natural log), kept for the backward. impl: see resolve_impl."""
    B, T, C, NH = _check_qkv(qkv, n_head)
    check("out", out, (B, T, C), BF16)
    check_aligned("out", out)
    check("lse", lse, (B, NH, T), F32)
    impl = resolve_impl(impl)
    if B * T == 0:
        return out
    if impl != "sm80":
        variant = impl.partition(":")[2]
        wgs, keys = SM90_VARIANTS[variant]
        smem = _smem_bytes_sm90(wgs, keys)
        grid = (NH, ceil_div(T, 64 * wgs), B)  # (head, tile, batch): fa_query_tile
        k = _function("flash_attention_sm90", f"flash_attention_forward_sm90_{variant}", smem,
                      all_shared=True)
        k(grid, (128 * wgs,), (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH)),
          shared_mem=smem)
        return out
    w = WARPS
    grid = (NH, ceil_div(T, 16 * w), B)
    _kernel("flash_attention", "forward", w)(
        grid, (32 * w,), (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH)),
        shared_mem=_smem_bytes("forward", w))
    return out


def flash_attention_backward(dqkv, dout, qkv, out, lse, n_head: int, scratch, impl=None):
    """dqkv (B, T, 3C) bf16 `=` gradient of flash_attention_forward through dout (B, T, C).

    out and lse are the forward's outputs (of either forward implementation); scratch is a dict
    of arrays as flash_scratch_shapes. impl: see resolve_bwd_impl.
    """
    B, T, C, NH = _check_qkv(qkv, n_head)
    check("dqkv", dqkv, (B, T, 3 * C), BF16)
    check_aligned("dqkv", dqkv)
    check("dout", dout, (B, T, C), BF16)
    check_aligned("dout", dout)
    check("out", out, (B, T, C), BF16)
    check_aligned("out", out)
    check("lse", lse, (B, NH, T), F32)
    if not isinstance(scratch, dict) or "D" not in scratch:
        got = sorted(scratch) if isinstance(scratch, dict) else type(scratch).__name__
        raise ValueError(f"scratch: expected a dict with 'D' (see flash_scratch_shapes), got {got}")
    D = check("scratch['D']", scratch["D"], (B, NH, T), F32)
    impl = resolve_bwd_impl(impl)
    w = WARPS
    if B * T == 0:
        return dqkv
    grid = (NH, ceil_div(T, 16 * w), B)  # query tiles (dq) and key tiles (dkdv): the same size
    sizes = (np.int32(B), np.int32(T), np.int32(NH))
    if impl == "sm90":  # 64 rows a block as well: one warpgroup
        for kind, args in (("dq", (dqkv, D, dout, qkv, out, lse)),
                           ("dkdv", (dqkv, dout, qkv, lse, D))):
            smem = _smem_bytes_sm90_bwd(kind)
            k = _function("flash_attention_sm90_bwd", f"flash_attention_backward_{kind}_sm90", smem,
                          all_shared=True)
            k(grid, (128,), args + sizes, shared_mem=smem)
        return dqkv
    _kernel("flash_attention_bwd", "dq", w)(
        grid, (32 * w,), (dqkv, D, dout, qkv, out, lse) + sizes, shared_mem=_smem_bytes("dq", w))
    _kernel("flash_attention_bwd", "dkdv", w)(
        grid, (32 * w,), (dqkv, dout, qkv, lse, D) + sizes, shared_mem=_smem_bytes("dkdv", w))
    return dqkv


# ---------------------------------------------------------------------------------------------
# functional forms: allocate their outputs and scratch


def flash_attention(qkv, n_head: int, impl=None):
    """Causal flash attention; returns (out, lse) as new arrays.

    qkv: (B, T, 3C) bf16 with head size C / n_head = 64. out: (B, T, C) bf16; lse: (B, NH, T) f32,
    the softmax normalizers flash_attention_grad needs (with qkv and out). impl: see resolve_impl.
    """
    B, T, C, NH = _check_qkv(qkv, n_head)
    out, lse = empty((B, T, C), BF16), empty((B, NH, T), F32)
    flash_attention_forward(out, lse, qkv, NH, impl=impl)
    return out, lse


def flash_attention_grad(dout, qkv, out, lse, n_head: int, impl=None):
    """dqkv (B, T, 3C) bf16, a new array: the gradient of flash_attention through dout (B, T, C).
    impl: the backward's, see resolve_bwd_impl."""
    B, T, C, NH = _check_qkv(qkv, n_head)
    scratch = {name: empty(shape, dt) for name, (shape, dt) in
               flash_scratch_shapes(B, T, C, NH).items()}
    return flash_attention_backward(empty((B, T, 3 * C), BF16), dout, qkv, out, lse, NH, scratch,
                                    impl=impl)
