"""KV-cache decoding launchers for kernels/decode.cu.

    decode_embed(out (B, C) =, ids int32 (B, S), pos int32 (B,), wte (Vp, C), wpe (maxT, C))
    gather_rows(out (B, C) =, inp (B*T, C), pos int32 (B,))            out[b] = inp[b*T + pos[b]]
    kv_append(kcache, vcache (B, NH, S, HS) =, qkv (B, R, 3C), pos int32 (B,))
        rows r of sequence b go to cache position pos[b] + r (positions >= S are dropped)
    decode_attention(out (B, C) =, qkv (B, 3C), kcache, vcache, pos int32 (B,), scratch, chunk)
        writes the newest token's k and v (in qkv) into the caches at pos[b], then the causal
        attention of its query over the keys 0 .. pos[b]
    decode_scratch(B, NH, HS, S, chunk) -> {name: array}    allocated once, counters zeroed

floatX is bf16 or fp32 throughout; pos and ids live on the device, so a captured CUDA graph
replays the same launches while the positions advance. The attention is split over the cache
length in `chunk`-key pieces (see the kernel file); the head size must be HS = k * (16 bytes of
floatX) with k a power of two <= 32 (8 .. 256 for bf16, 4 .. 128 for fp32; GPT-2 has 64).

Tests: pytest -m gpu tests/test_decode.py
"""
from __future__ import annotations

import math

import numpy as np

from llmc import kernels
from llmc.ops import F32, FLOATX, I32, ceil_div, check, check_aligned, dtype_name, pack_size

BLOCK = 256
ATTENTION_THREADS = 128  # DA_THREADS in the kernel
DEFAULT_CHUNK = 64


def _rows_grid(rows: int, C: int, dtype) -> tuple:
    return (max(1, ceil_div(rows * (C // pack_size(dtype)), BLOCK)),)


def _check_pack(name: str, C: int, dtype):
    if C % pack_size(dtype) != 0:
        raise ValueError(f"{name}: the channel count {C} must be a multiple of {pack_size(dtype)} "
                         f"for {dtype} (the kernels' 128-bit access)")


def decode_embed(out, ids, pos, wte, wpe):
    """out[b] = wte[ids[b, pos[b]]] + wpe[pos[b]] (rounded once to floatX, as encoder_forward)."""
    dt = dtype_name(wte, "wte")
    check("wte", wte, (None, None), wte.dtype)
    Vp, C = wte.shape
    check("wpe", wpe, (None, C), wte.dtype)
    check("ids", ids, (None, None), I32)
    B, S = ids.shape
    check("pos", pos, (B,), I32)
    check("out", out, (B, C), wte.dtype)
    _check_pack("wte", C, wte.dtype)
    for name, x in (("out", out), ("wte", wte), ("wpe", wpe)):
        check_aligned(name, x)
    kernels.function("decode", "decode_embed", dt)(
        _rows_grid(B, C, wte.dtype), (BLOCK,), (out, ids, pos, wte, wpe, np.int32(B), np.int32(C),
                                                 np.int32(S)))
    return out


def gather_rows(out, inp, pos):
    """out (B, C) = the rows inp[b*T + pos[b]] of inp (B*T, C); T = inp rows / B."""
    dt = dtype_name(inp, "inp")
    check("inp", inp, (None, None), FLOATX)
    check("out", out, (None, inp.shape[1]), inp.dtype)
    B, C = out.shape
    check("pos", pos, (B,), I32)
    if B == 0 or inp.shape[0] % B != 0:
        raise ValueError(f"inp: expected B*T rows for B = {B}, got {inp.shape[0]}")
    _check_pack("inp", C, inp.dtype)
    check_aligned("out", out)
    check_aligned("inp", inp)
    kernels.function("decode", "gather_rows", dt)(
        _rows_grid(B, C, inp.dtype), (BLOCK,),
        (out, inp, pos, np.int32(B), np.int32(inp.shape[0] // B), np.int32(C)))
    return out


def _check_cache(kcache, vcache, dtype):
    check("kcache", kcache, (None, None, None, None), dtype)
    check("vcache", vcache, kcache.shape, dtype)
    check_aligned("kcache", kcache)
    check_aligned("vcache", vcache)
    return kcache.shape


def kv_append(kcache, vcache, qkv, pos):
    """Write k and v of qkv (B, R, 3C) into the caches (B, NH, S, HS) at pos[b] + r."""
    dt = dtype_name(qkv, "qkv")
    check("qkv", qkv, (None, None, None), FLOATX)
    B, R, C3 = qkv.shape
    Bc, NH, S, HS = _check_cache(kcache, vcache, qkv.dtype)
    if Bc != B or NH * HS * 3 != C3:
        raise ValueError(f"kcache: expected shape ({B}, NH, S, HS) with 3*NH*HS = {C3} (those of "
                         f"qkv), got {tuple(kcache.shape)}")
    check("pos", pos, (B,), I32)
    _check_pack("qkv", HS, qkv.dtype)
    check_aligned("qkv", qkv)
    n = B * R * (C3 // 3 // pack_size(qkv.dtype))
    if n == 0:
        return kcache
    kernels.function("decode", "kv_append", dt)(
        (ceil_div(n, BLOCK),), (BLOCK,),
        (kcache, vcache, qkv, pos, np.int32(B), np.int32(R), np.int32(NH), np.int32(HS), np.int32(S)))
    return kcache


def _splits(S: int, chunk: int) -> int:
    return ceil_div(S, chunk)


def decode_scratch_shapes(B: int, NH: int, HS: int, S: int, chunk: int = DEFAULT_CHUNK) -> dict:
    """{name: (shape, dtype)} of decode_attention's scratch: each split's partial output and
    (max, sum), and a per-head count of finished splits (must start at zero; the kernel leaves
    it at zero)."""
    n = _splits(S, chunk)
    return {"part_o": ((B * NH, n, HS), F32), "part_ml": ((B * NH, n, 2), F32),
            "counters": ((B * NH,), I32)}


def decode_scratch(B: int, NH: int, HS: int, S: int, chunk: int = DEFAULT_CHUNK) -> dict:
    """decode_attention's scratch arrays, zeroed (allocate once, outside a captured step)."""
    import cupy
    return {name: cupy.zeros(shape, dtype=dt)
            for name, (shape, dt) in decode_scratch_shapes(B, NH, HS, S, chunk).items()}


def decode_attention(out, qkv, kcache, vcache, pos, scratch, chunk: int = DEFAULT_CHUNK):
    """kcache/vcache[b, :, pos[b]] = k, v of qkv (B, 3C); out (B, C) = causal attention of its
    query over the cache keys 0 .. pos[b]. scratch: decode_scratch(B, NH, HS, S, chunk)."""
    dt = dtype_name(qkv, "qkv")
    check("qkv", qkv, (None, None), FLOATX)
    B, C3 = qkv.shape
    Bc, NH, S, HS = _check_cache(kcache, vcache, qkv.dtype)
    C = NH * HS
    if Bc != B or 3 * C != C3:
        raise ValueError(f"kcache: expected shape ({B}, NH, S, HS) with 3*NH*HS = {C3}, got "
                         f"{tuple(kcache.shape)}")
    check("out", out, (B, C), qkv.dtype)
    check("pos", pos, (B,), I32)
    check_aligned("qkv", qkv)
    tpk = HS // pack_size(qkv.dtype)
    if HS % pack_size(qkv.dtype) or tpk & (tpk - 1) or not 1 <= tpk <= 32:
        raise ValueError(f"kcache: head size {HS} is not supported by decode attention for "
                         f"{qkv.dtype}: it must be {pack_size(qkv.dtype)} times a power of two "
                         f"<= 32 (GPT-2's 64 is); use the CPU path for this model")
    if not (isinstance(chunk, (int, np.integer)) and chunk >= 1):
        raise ValueError(f"chunk: expected a positive number of keys, got {chunk!r}")
    n = _splits(S, chunk)
    shapes = decode_scratch_shapes(B, NH, HS, S, chunk)
    if not isinstance(scratch, dict):
        raise ValueError(f"scratch: expected a dict as decode_scratch gives, got "
                         f"{type(scratch).__name__}")
    for name, (shape, dtype) in shapes.items():
        check(f"scratch[{name!r}]", scratch.get(name), shape, dtype)
    if B == 0:
        return out
    check_aligned("kcache", kcache)
    kernels.function("decode", "decode_attention", dt)(
        (n, B * NH), (ATTENTION_THREADS,),
        (out, scratch["part_o"], scratch["part_ml"], scratch["counters"], kcache, vcache, qkv, pos,
         np.int32(NH), np.int32(HS), np.int32(S), np.int32(chunk),
         np.float32(math.log2(math.e) / math.sqrt(HS))),
        shared_mem=4 * int(chunk))
    return out


# ---------------------------------------------------------------------------------------------
# functional forms: allocate their outputs and scratch

def embed_at(ids, pos, wte, wpe):
    """New (B, C) array: wte[ids[b, pos[b]]] + wpe[pos[b]] (decode_embed into a new array)."""
    from llmc.ops.arrays import empty
    check("wte", wte, (None, None))
    return decode_embed(empty((ids.shape[0], wte.shape[1]), wte.dtype), ids, pos, wte, wpe)


def kv_attention(qkv, kcache, vcache, pos, chunk: int = DEFAULT_CHUNK):
    """New (B, C) array: the attention of each row's newest query over its cache (decode step).

    qkv (B, 3C) holds the newest token's q, k, v; its k and v are written into kcache/vcache
    (B, NH, S, HS) at pos[b] (in place: the cache is state), then its query attends to keys
    0 .. pos[b]. Scratch is allocated per call; a decoding loop allocates it once with
    decode_scratch and calls decode_attention.
    """
    from llmc.ops.arrays import empty
    check("kcache", kcache, (None, None, None, None))
    B, NH, S, HS = kcache.shape
    out = empty((B, NH * HS), qkv.dtype)
    return decode_attention(out, qkv, kcache, vcache, pos, decode_scratch(B, NH, HS, S, chunk),
                            chunk)
