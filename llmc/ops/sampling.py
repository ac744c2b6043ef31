"""Next-token sampling on the GPU: kernels/sampling.cu.

    sample_tokens(ids int32 (B, S), pos int32 (B,), logits (B, Vp) floatX, V, *, temperature,
                  top_k, top_p, seed)
        per row b: tok = greedy (temperature 0) or a draw from softmax(logits[b, :V] / temperature)
        restricted to the top_k largest (0: all) and then to the top_p mass (1: all);
        ids[b, pos[b] + 1] = tok; pos[b] += 1 (both in place, on the device)

The draw uses a hash of (seed, b, pos[b]), so a fixed seed gives the same tokens every run and
a captured CUDA graph draws fresh numbers at every replay. A row whose logits are not finite
gets the id -1 (the caller checks the ids it copies back). The NumPy reference of the filters is
llmc.model.reference.sampling_probs.

Tests: pytest -m gpu tests/test_sampling.py
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.ops import FLOATX, I32, check, check_aligned, dtype_name, set_dynamic_smem

THREADS = 1024  # SAMPLE_THREADS in the kernel
HIST_BYTES = (THREADS // 32) * 256 * 8  # per-warp radix histograms, 64-bit bins


def check_sampling(temperature: float, top_k: int, top_p: float,
                   names=("temperature", "top_k", "top_p")) -> None:
    """ValueError naming the setting unless temperature >= 0, top_k >= 0, 0 < top_p <= 1.

    names: how the message calls the three settings (a CLI passes its flags)."""
    t, k, p = names
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{t}: expected a finite value >= 0 (0 is greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"{k}: expected an integer >= 0 (0 keeps every token), got {top_k}")
    if not (np.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"{p}: expected a value in (0, 1] (1 keeps every token), got {top_p}")


def sample_tokens(ids, pos, logits, V: int, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0):
    """Append one token per row to ids at pos[b] + 1 and advance pos (see the module docstring)."""
    check_sampling(temperature, top_k, top_p)
    check("logits", logits, (None, None), FLOATX)
    B, Vp = logits.shape
    check("ids", ids, (B, None), I32)
    check("pos", pos, (B,), I32)
    if not 0 < int(V) <= Vp:
        raise ValueError(f"V: expected 1 <= V <= Vp = {Vp}, got {V}")
    if (Vp * logits.itemsize) % 16 != 0:
        raise ValueError(f"logits: rows must be a multiple of 16 bytes for 128-bit access, got "
                         f"Vp = {Vp} of {logits.dtype}")
    check_aligned("logits", logits)
    if B == 0:
        return ids
    kernel = kernels.function("sampling", "sample_rows", dtype_name(logits, "logits"))
    set_dynamic_smem(kernel, HIST_BYTES)
    kernel(
        (B,), (THREADS,),
        (ids, pos, logits, np.int32(Vp), np.int32(V), np.int32(ids.shape[1]),
         np.float32(temperature), np.int32(top_k), np.float32(top_p),
         np.uint32(int(seed) & 0xFFFFFFFF)), shared_mem=HIST_BYTES)
    return ids


def sample(logits, V: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           seed: int = 0, step: int = 0):
    """New int32 (B,) array: one token per row of logits (B, Vp) floatX, drawn as sample_tokens
    draws (temperature 0 greedy, top-k, top-p); `step` plays the position in the seed's hash,
    so (seed, step) fixes the draw."""
    import cupy
    check("logits", logits, (None, None), FLOATX)
    B = logits.shape[0]
    if int(step) != step or step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step}")
    ids = cupy.zeros((B, int(step) + 2), dtype=np.int32)
    pos = cupy.full((B,), int(step), dtype=np.int32)
    sample_tokens(ids, pos, logits, V, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed)
    return cupy.ascontiguousarray(ids[:, int(step) + 1])
