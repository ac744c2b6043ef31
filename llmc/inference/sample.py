"""Text generation from any llmc model (CPUModel or GPUModel).

Autoregressive sampling through `model.logits(inputs) -> (1, t, V)` float32: each new token
re-runs the prefix (no KV cache; generation here is for progress checks during training, a
few dozen tokens). The context is cropped to the model's sequence length. Sampling uses the
caller's NumPy Generator so a resumed run draws the same text as an uninterrupted one.
"""
from __future__ import annotations

import numpy as np

from llmc.data.tokenizer import EOT, decode


def softmax_sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                   top_k: int | None = None) -> int:
    """One token id from a (V,) row of logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def generate(model, prompt: list, n_tokens: int, max_len: int, rng: np.random.Generator,
             temperature: float = 1.0, top_k: int | None = 40) -> list:
    """prompt ids + `n_tokens` sampled ids (the prompt is included in the result)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token (use [EOT] to start fresh)")
    ids = list(prompt)
    for _ in range(n_tokens):
        window = np.asarray(ids[-max_len:], dtype=np.int32)[None, :]  # (1, t)
        logits = model.logits(window)  # (1, t, V)
        ids.append(softmax_sample(logits[0, -1], rng, temperature, top_k))
    return ids


def sample_text(model, n_tokens: int, max_len: int, rng: np.random.Generator) -> str:
    """A sample started from <|endoftext|>, decoded (generation stops at the next one)."""
    ids = generate(model, [EOT], n_tokens, max_len, rng)[1:]
    if EOT in ids:
        ids = ids[:ids.index(EOT)]
    return decode(ids)
