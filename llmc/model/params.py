"""The parameter layout: every weight of GPT-2 as a view into one flat buffer.

One layout serves the NumPy reference, the GPU model, checkpoints and ZeRO sharding, so a flat
buffer written by any of them is read by all. Tensors are stacked over layers, as in llm.c:

    wte (Vp, C)  wpe (maxT, C)
    ln1w (L, C)  ln1b (L, C)  qkvw (L, 3C, C)  qkvb (L, 3C)  attprojw (L, C, C)  attprojb (L, C)
    ln2w (L, C)  ln2b (L, C)  fcw (L, 4C, C)  fcb (L, 4C)  fcprojw (L, C, 4C)  fcprojb (L, C)
    lnfw (C)  lnfb (C)

Linear weights are (out_features, in_features): y = x @ W.T + b. The LM head is tied to wte.
Weight decay applies to the matrices (wte, wpe, qkvw, attprojw, fcw, fcprojw), never to biases
or LayerNorm parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmc.config import ModelConfig

PARAM_NAMES = ("wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
               "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb")
DECAYED = frozenset(("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"))


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple
    offset: int  # element offset into the flat buffer

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def decay(self) -> bool:
        return self.name in DECAYED


def param_shapes(mc: ModelConfig) -> dict:
    L, C, Vp, maxT = mc.n_layer, mc.n_embd, mc.padded_vocab_size, mc.block_size
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def param_specs(mc: ModelConfig) -> list:
    """The layout in buffer order."""
    specs, offset = [], 0
    for name, shape in param_shapes(mc).items():
        spec = ParamSpec(name, shape, offset)
        specs.append(spec)
        offset += spec.size
    return specs


def num_params(mc: ModelConfig) -> int:
    """Total parameters, padded vocabulary included (d12: 124,475,904)."""
    return sum(s.size for s in param_specs(mc))


def views(flat, mc: ModelConfig) -> dict:
    """name -> view of `flat` (NumPy or CuPy, 1-D) with the tensor's shape."""
    if flat.ndim != 1 or flat.size != num_params(mc):
        raise ValueError(f"flat parameter buffer must be 1-D with {num_params(mc)} elements, "
                         f"got shape {flat.shape}")
    return {s.name: flat[s.offset:s.offset + s.size].reshape(s.shape) for s in param_specs(mc)}


def decay_mask(mc: ModelConfig) -> np.ndarray:
    """bool (N,): True where AdamW applies weight decay."""
    mask = np.zeros(num_params(mc), dtype=bool)
    for s in param_specs(mc):
        if s.decay:
            mask[s.offset:s.offset + s.size] = True
    return mask


def decay_ranges(mc: ModelConfig) -> list:
    """[(start, stop, decay)] covering the buffer: what the fused AdamW kernel is given."""
    return [(s.offset, s.offset + s.size, s.decay) for s in param_specs(mc)]


def init_params(mc: ModelConfig, seed: int) -> np.ndarray:
    """GPT-2 initialization as a flat float32 buffer.

    Matrices N(0, 0.02); residual projections (attprojw, fcprojw) N(0, 0.02/sqrt(2L));
    biases zero; LayerNorm weights one. Padded vocabulary rows of wte are zero, so they start
    with zero logits and, with zero gradient from the loss, are never predicted.
    """
    rng = np.random.default_rng(seed)
    flat = np.zeros(num_params(mc), dtype=np.float32)
    p = views(flat, mc)
    std = 0.02
    resid_std = 0.02 / math.sqrt(2 * mc.n_layer)
    for name in ("wte", "wpe", "qkvw", "fcw"):
        p[name][...] = rng.standard_normal(p[name].shape, dtype=np.float32) * std
    for name in ("attprojw", "fcprojw"):
        p[name][...] = rng.standard_normal(p[name].shape, dtype=np.float32) * resid_std
    p["wte"][mc.vocab_size:] = 0.0
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][...] = 1.0
    return flat
