"""GPUModel's device buffers for one (B, T): allocated once, reused by every step.

Nothing is allocated inside a training step: the forward writes into per-layer slices of the
arrays below, the backward into a few shared gradient buffers, and every op that needs
temporary space shares one `scratch` byte buffer (ops run one after another on a stream).

What the forward keeps for the backward (N = B*T rows, L layers, floatX unless noted):
    encoded (N, C)                          the embeddings: layer 0's residual input
    ln1, ln2 (L, N, C) + mean, rstd (L, N) f32
    qkv (L, B, T, 3C)   atty (L, B, T, C)   saved[l]: attention's own ({"lse"} flash / {"att"} matmul)
    residual2, residual3 (L, N, C)          the residual stream after attention / after the MLP
    fch (L, N, 4C)                          fc output (GELU input)
    fch_gelu (L, N, 4C), or ONE (N, 4C) shared by all layers with recompute=1 (recomputed in
        the backward from fch: the same kernel on the same input gives the same bits)
    lnf (N, C) + mean, rstd (N,) f32        losses (N,) f32
    logits (ceil(N / chunks), Vp): one chunk of rows of the LM head at a time (chunks = 1: all
        N rows, as llm.c); dlogits in place after the loss
With keep_linear_inputs=False (fp8 mode with fp8 weight gradients: the backward's products
read fp8 transposes that llmc/model/fp8.py keeps instead), ln1 and ln2 are ONE (N, C) buffer
each, shared by all layers, and fch_gelu is not allocated (the fp8 GELU cast writes only fp8).
`ln1_l`, `ln2_l` are the per-layer views either way.
The attention and MLP projections are not kept: their outputs go to `btc` and are folded into
the residual stream at once by the fused residual + LayerNorm kernel (as llm.c does).

Backward buffers: dresidual (N, C), the gradient of the residual stream, accumulated by the
LayerNorm backwards (+=); btc (N, C), the projections' output in the forward and every (N, C)
input gradient in the backward; bt4c (N*4C), the MLP's (N, 4C) gradient and, as its first N*3C
elements, dqkv (B, T, 3C).
"""
from __future__ import annotations

import numpy as np

from llmc.ops import F32, as_dtype, round_up
from llmc.ops import attention, encoder, layernorm, matmul


class Activations:
    """The buffers of one GPUModel; attributes as in the module docstring."""

    def __init__(self, mc, B: int, T: int, dtype, recompute: int, method: str,
                 classifier_chunks: int = 1, keep_linear_inputs: bool = True):
        import cupy
        x = as_dtype(dtype)
        L, C, NH, Vp = mc.n_layer, mc.n_embd, mc.n_head, mc.padded_vocab_size
        N = B * T
        self.B, self.T, self.N = B, T, N

        def buf(shape, dt=x):
            return cupy.empty(shape, dtype=dt)

        self.encoded = buf((N, C))
        kept = L if keep_linear_inputs else 1
        self.ln1, self.ln1_mean, self.ln1_rstd = buf((kept, N, C)), buf((L, N), F32), buf((L, N), F32)
        self.qkv = buf((L, B, T, 3 * C))
        self.atty = buf((L, B, T, C))
        spec = attention.attention_buffers(B, T, C, NH, x, method)
        stacked = {name: cupy.empty((L,) + tuple(shape), dtype=dt)
                   for name, (shape, dt) in spec.items()}
        self.saved = [{name: arr[l] for name, arr in stacked.items()} for l in range(L)]
        self.attn_scratch = attention.allocate(attention.attention_scratch(B, T, C, NH, x, method))
        self.residual2 = buf((L, N, C))
        self.ln2, self.ln2_mean, self.ln2_rstd = buf((kept, N, C)), buf((L, N), F32), buf((L, N), F32)
        self.ln1_l = [self.ln1[l if keep_linear_inputs else 0] for l in range(L)]
        self.ln2_l = [self.ln2[l if keep_linear_inputs else 0] for l in range(L)]
        self.fch = buf((L, N, 4 * C))
        self.fch_gelu = None
        if keep_linear_inputs:
            gelu_store = buf((1 if recompute else L, N, 4 * C))
            self.fch_gelu = [gelu_store[0 if recompute else l] for l in range(L)]
        self.residual3 = buf((L, N, C))
        self.lnf, self.lnf_mean, self.lnf_rstd = buf((N, C)), buf((N,), F32), buf((N,), F32)
        rows = -(-N // classifier_chunks)
        self.head_chunks = [(lo, min(lo + rows, N)) for lo in range(0, N, rows)]
        self.logits = buf((rows, Vp))
        self.losses = buf((N,), F32)

        self.dresidual = buf((N, C))
        self.btc = buf((N, C))
        self.bt4c = buf((N * 4 * C,))
        self.dfch = self.bt4c.reshape(N, 4 * C)
        self.dqkv = self.bt4c[:N * 3 * C].reshape(B, T, 3 * C)
        self.scratch = cupy.empty(round_up(max(scratch_sizes(mc, B, T).values())), dtype=np.uint8)

        # (B, T, X) views of the per-layer arrays, made once (a view costs host time per step)
        self.qkv_l = [self.qkv[l] for l in range(L)]
        self.atty_l = [self.atty[l] for l in range(L)]
        self.btc3 = self.btc.reshape(B, T, C)
        self.inputs = cupy.zeros((B, T), dtype=np.int32)   # staging for host or non-int32 tokens
        self.targets = cupy.zeros((B, T), dtype=np.int32)

    def nbytes(self) -> int:
        """Device bytes held by these buffers (views counted once)."""
        seen, total = set(), 0
        for value in vars(self).values():
            for arr in _arrays(value):
                base = arr
                while base.base is not None:
                    base = base.base
                if id(base) not in seen:
                    seen.add(id(base))
                    total += base.nbytes
        return total


def scratch_sizes(mc, B: int, T: int) -> dict:
    """Bytes each op family's backward needs from the shared scratch buffer."""
    N, C, Vp = B * T, mc.n_embd, mc.padded_vocab_size
    return {
        "encoder": encoder.encoder_backward_scratch_size(B, T, C, Vp),
        "layernorm": layernorm.layernorm_backward_scratch_size(N, C),
        "matmul": max(matmul.matmul_backward_scratch_size(N, oc) for oc in (C, 3 * C, 4 * C)),
    }


def _arrays(value):
    import cupy
    if isinstance(value, cupy.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _arrays(v)
