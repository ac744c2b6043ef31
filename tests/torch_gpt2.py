"""An independent PyTorch GPT-2: the oracle for llmc's model tests and the peer in bench/e2e.py.

Written from the GPT-2 architecture (pre-LN transformer blocks, tanh-approximate GELU, causal
self-attention, learned position embeddings, LM head tied to the token embedding), sharing no
code with `llmc.model.reference`; only the flat parameter layout of `llmc.model.params` is used, to move
weights in (`load_flat`) and gradients and weights out (`grads_flat`,
`params_flat`).

Device- and dtype-agnostic: nothing here names a device, so `model.to("cuda")`, bf16 autocast,
`torch.compile` and fused AdamW apply as usual. `attn="sdpa"` uses
F.scaled_dot_product_attention (flash attention on a GPU); `attn="manual"` spells out the masked
softmax (the reference form).

Shapes: B batch, T time, C channels, NH heads, HS head size, V vocabulary, Vp padded vocabulary.
The loss is the mean cross-entropy over logits[..., :V]; logits are returned (B, T, Vp).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmc.config import ModelConfig
from llmc.model.params import param_specs


class CausalSelfAttention(nn.Module):
    def __init__(self, mc: ModelConfig, attn: str):
        super().__init__()
        if attn not in ("sdpa", "manual"):
            raise ValueError(f"attn must be 'sdpa' or 'manual', got {attn!r}")
        self.n_head, self.attn = mc.n_head, attn
        self.c_attn = nn.Linear(mc.n_embd, 3 * mc.n_embd)
        self.c_proj = nn.Linear(mc.n_embd, mc.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, NH, T, HS)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, NH, T, T)
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, mc: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(mc.n_embd, 4 * mc.n_embd)
        self.c_proj = nn.Linear(4 * mc.n_embd, mc.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, mc: ModelConfig, attn: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(mc.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(mc, attn)
        self.ln_2 = nn.LayerNorm(mc.n_embd, eps=1e-5)
        self.mlp = MLP(mc)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT2(nn.Module):
    """GPT-2 with a tied LM head; forward(idx, targets) -> (logits (B, T, Vp), mean loss or None)."""

    def __init__(self, mc: ModelConfig, attn: str = "sdpa"):
        super().__init__()
        self.mc = mc
        self.wte = nn.Embedding(mc.padded_vocab_size, mc.n_embd)
        self.wpe = nn.Embedding(mc.block_size, mc.n_embd)
        self.h = nn.ModuleList(Block(mc, attn) for _ in range(mc.n_layer))
        self.ln_f = nn.LayerNorm(mc.n_embd, eps=1e-5)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), biases 0, LN 1."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.mc.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif "ln_" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        self.wte.weight[self.mc.vocab_size:] = 0.0

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.mc.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.mc.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # (B, T, Vp), tied head
        loss = None
        if targets is not None:
            V = self.mc.vocab_size
            real = logits[..., :V].reshape(-1, V)
            if real.dtype in (torch.float16, torch.bfloat16):
                real = real.float()  # the loss in fp32 when the model runs in half precision
            loss = F.cross_entropy(real, targets.reshape(-1).long())
        return logits, loss


def _tensor_map(model: TorchGPT2) -> dict:
    """llmc parameter name -> list of torch tensors (one per layer for stacked tensors)."""
    h = model.h
    return {
        "wte": [model.wte.weight], "wpe": [model.wpe.weight],
        "ln1w": [b.ln_1.weight for b in h], "ln1b": [b.ln_1.bias for b in h],
        "qkvw": [b.attn.c_attn.weight for b in h], "qkvb": [b.attn.c_attn.bias for b in h],
        "attprojw": [b.attn.c_proj.weight for b in h], "attprojb": [b.attn.c_proj.bias for b in h],
        "ln2w": [b.ln_2.weight for b in h], "ln2b": [b.ln_2.bias for b in h],
        "fcw": [b.mlp.c_fc.weight for b in h], "fcb": [b.mlp.c_fc.bias for b in h],
        "fcprojw": [b.mlp.c_proj.weight for b in h], "fcprojb": [b.mlp.c_proj.bias for b in h],
        "lnfw": [model.ln_f.weight], "lnfb": [model.ln_f.bias],
    }


_STACKED = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
            "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")


def _chunks(spec):
    """(start, stop) of each per-layer piece of a flat tensor (one piece when not stacked)."""
    n = spec.shape[0] if spec.name in _STACKED else 1
    step = spec.size // n
    return [(spec.offset + i * step, spec.offset + (i + 1) * step) for i in range(n)]



@torch.no_grad()
def load_flat(model: TorchGPT2, flat: np.ndarray) -> None:
    """Copy an llmc flat parameter buffer (any float dtype) into the model's parameters."""
    specs = param_specs(model.mc)
    total = specs[-1].offset + specs[-1].size
    if flat.shape != (total,):
        raise ValueError(f"flat buffer must have shape ({total},), got {flat.shape}")
    if flat.dtype not in (np.float16, np.float32, np.float64):
        flat = flat.astype(np.float32)  # e.g. ml_dtypes.bfloat16, which torch cannot wrap
    tensors = _tensor_map(model)
    for spec in specs:
        for t, (a, b) in zip(tensors[spec.name], _chunks(spec)):
            src = torch.from_numpy(np.ascontiguousarray(flat[a:b])).view(t.shape)
            t.copy_(src)


def _gather(model: TorchGPT2, pick) -> np.ndarray:
    """pick(tensor) -> tensor or None, laid out flat as llmc float64 (zeros for None)."""
    specs = param_specs(model.mc)
    out = np.zeros(specs[-1].offset + specs[-1].size, dtype=np.float64)
    tensors = _tensor_map(model)
    for spec in specs:
        for t, (a, b) in zip(tensors[spec.name], _chunks(spec)):
            src = pick(t)
            if src is not None:
                out[a:b] = src.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return out


def grads_flat(model: TorchGPT2) -> np.ndarray:
    """The model's .grad in the llmc flat layout, float64; zeros where a parameter has no grad."""
    return _gather(model, lambda t: t.grad)


def params_flat(model: TorchGPT2) -> np.ndarray:
    """The model's parameters in the llmc flat layout, float64 (the inverse of load_flat)."""
    return _gather(model, lambda t: t)


def make_optimizer(model: TorchGPT2, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, fused=False):
    """torch AdamW with llmc's decay groups: matrices decayed, biases and LayerNorm not."""
    params = list(model.parameters())  # the tied wte appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
