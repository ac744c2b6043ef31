"""The optimizer math in NumPy: learning-rate schedule, global-norm clipping, AdamW.

`adamw_step` is the update on any slice (the CPU optimizer applies it to the whole flat buffer,
ZeRO to a rank's shard); `AdamW` holds the moments for a flat parameter buffer in the
`llmc.model.params` layout and is the CPU path's optimizer and the GPU optimizer's oracle.

Math (t = step + 1, counted from 1):
    g *= min(1, clip / (||g|| + 1e-6))           (clip > 0; ||g|| over the whole buffer)
    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    mhat = m / (1 - b1^t) ;  vhat = v / (1 - b2^t)
    p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p)   wd only on decayed tensors (matrices)

Schedule (step counted from 0, as llm.c): linear warmup lr * (step+1) / warmup_steps, then a
decay from lr to lr * lr_decay_frac over the remaining steps up to max_steps (cosine, linear,
or none for "constant"); steps at or past max_steps stay at the final value.
"""
from __future__ import annotations

import math

import numpy as np

from llmc.config import ModelConfig
from llmc.model.params import decay_mask, num_params

SCHEDULES = ("cosine", "linear", "constant")
CLIP_EPS = 1e-6
_NORM_CHUNK = 1 << 20  # elements per float64 partial sum: no full-size float64 copy


def lr_at(step: int, cfg) -> float:
    """The learning rate at optimizer step `step` (from 0) for a TrainConfig-like `cfg`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.lr_schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")
    lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return lr
    min_lr = lr * float(cfg.lr_decay_frac)
    span = max(int(cfg.max_steps) - warmup, 1)
    ratio = min((step - warmup) / span, 1.0)  # 0 right after warmup, 1 at max_steps
    if cfg.lr_schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    else:
        coeff = 1.0 - ratio
    return min_lr + coeff * (lr - min_lr)


def global_norm(grads) -> float:
    """sqrt(sum g^2) accumulated in float64 over an array or a sequence of arrays."""
    arrays = [grads] if isinstance(grads, np.ndarray) else list(grads)
    total = 0.0
    for a in arrays:
        flat = np.asarray(a).reshape(-1)
        for i in range(0, flat.size, _NORM_CHUNK):
            chunk = flat[i:i + _NORM_CHUNK].astype(np.float64)
            total += float(np.dot(chunk, chunk))
    return math.sqrt(total)


def clip_scale(norm: float, grad_clip: float) -> float:
    """The factor gradients are multiplied by: min(1, clip / (norm + 1e-6)); 1 when clip == 0."""
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0, got {grad_clip}")
    if grad_clip == 0:
        return 1.0
    return min(1.0, grad_clip / (norm + CLIP_EPS))


def adamw_step(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, t, decay,
               grad_scale=1.0):
    """One AdamW update in place on param, m, v (equal shapes); grad is read times grad_scale.

    decay: bool array of the same shape, or a bool, selecting where weight_decay applies.
    t: the 1-based step used for bias correction.
    """
    for name, arr in (("grad", grad), ("m", m), ("v", v)):
        if arr.shape != param.shape:
            raise ValueError(f"adamw_step: {name} shape {arr.shape} != param shape {param.shape}")
    decay = np.asarray(decay)
    if decay.dtype != bool or decay.shape not in ((), param.shape):
        raise ValueError(f"adamw_step: decay must be a bool or a bool array of shape {param.shape}, "
                         f"got dtype {decay.dtype} shape {decay.shape}")
    if t < 1:
        raise ValueError(f"adamw_step: t is 1-based, got {t}")
    lr, beta1, beta2, eps = float(lr), float(beta1), float(beta2), float(eps)
    weight_decay, grad_scale = float(weight_decay), float(grad_scale)
    g = grad * grad_scale if grad_scale != 1.0 else grad
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    update = (m / bc1) / (np.sqrt(v / bc2) + eps)
    if weight_decay != 0.0:
        if decay.shape == ():
            if bool(decay):
                update += weight_decay * param
        else:
            update += (weight_decay * param) * decay
    param -= lr * update


class AdamW:
    """AdamW with global-norm clipping over a flat parameter buffer (updated in place)."""

    def __init__(self, params: np.ndarray, mc: ModelConfig, *, beta1=0.9, beta2=0.95, eps=1e-8,
                 weight_decay=0.0, grad_clip=1.0):
        if not isinstance(params, np.ndarray) or params.shape != (num_params(mc),):
            raise ValueError(f"AdamW params must be a flat NumPy array of shape ({num_params(mc)},) "
                             f"for this model, got {getattr(params, 'shape', type(params).__name__)}")
        if not np.issubdtype(params.dtype, np.floating):
            raise ValueError(f"AdamW params must be floating point, got {params.dtype}")
        if grad_clip < 0 or weight_decay < 0:
            raise ValueError(f"grad_clip and weight_decay must be >= 0, got {grad_clip}, {weight_decay}")
        self.params, self.mc = params, mc
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay, self.grad_clip = weight_decay, grad_clip
        self.decay = decay_mask(mc)
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)

    @classmethod
    def from_config(cls, params: np.ndarray, mc: ModelConfig, cfg) -> "AdamW":
        """Hyper-parameters from a TrainConfig (beta1, beta2, eps, weight_decay, grad_clip)."""
        return cls(params, mc, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                   weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)

    def step(self, grads: np.ndarray, lr: float, step: int) -> float:
        """Clip, then update params in place; return the gradient norm before clipping."""
        if grads.shape != self.params.shape:
            raise ValueError(f"AdamW.step: grads shape {grads.shape} != params shape {self.params.shape}")
        norm = global_norm(grads)
        scale = clip_scale(norm, self.grad_clip)
        adamw_step(self.params, grads, self.m, self.v, lr=lr, beta1=self.beta1, beta2=self.beta2,
                   eps=self.eps, weight_decay=self.weight_decay, t=step + 1, decay=self.decay,
                   grad_scale=scale)
        return norm

    def state_dict(self) -> dict:
        """{"m", "v"}: copies of the moments."""
        return {"m": self.m.copy(), "v": self.v.copy()}

    def load_state_dict(self, d: dict) -> None:
        for key in ("m", "v"):
            if key not in d:
                raise ValueError(f"AdamW state is missing {key!r}; expected keys 'm' and 'v'")
            arr = np.asarray(d[key])
            if arr.shape != self.params.shape:
                raise ValueError(f"AdamW state {key!r} has shape {arr.shape}, expected "
                                 f"{self.params.shape}: was it saved for another model?")
            getattr(self, key)[...] = arr
