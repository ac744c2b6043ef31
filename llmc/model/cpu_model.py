"""GPT-2 on the CPU: the `llmc.model.reference` ops composed over one flat parameter buffer.

This is the CPU training path (what llm.c's train_gpt2.c is) and the whole-model oracle. It
implements the model interface of docs/DESIGN.md: `.params` and `.grads` are flat buffers in
the `llmc.model.params` layout, `forward_backward` accumulates `loss_scale * dloss/dparams` into
`.grads` (gradient accumulation is calling it again before `zero_grad`).

Architecture (pre-LN GPT-2, tied LM head):
    x = wte[inputs] + wpe[:T]
    per layer l:  x = x + attproj(attn(ln1(x)));  x = x + fcproj(gelu(fc(ln2(x))))
    logits = lnf(x) @ wte.T          (N, Vp); the loss reads the first V columns only

Activations are plain NumPy arrays kept from the forward for the backward (no preallocation:
the CPU path is for small models). B and T given at construction are maxima; a call may use any
B' <= B and T' <= T (sampling feeds shorter sequences).

Usage:
    model = CPUModel(mc, B=4, T=64)
    model.load_params(llmc.model.params.init_params(mc, seed=1337))
    model.zero_grad(); loss = model.forward_backward(inputs, targets, loss_scale=1.0)
"""
from __future__ import annotations

import numpy as np

from llmc.model import reference as ref
from llmc.config import ModelConfig
from llmc.model.params import num_params, views

_LAYER_PARAMS = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                 "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")


class CPUModel:
    """GPT-2 forward/backward in NumPy over flat `params`/`grads` of `dtype` (float32 or float64)."""

    def __init__(self, mc: ModelConfig, B: int, T: int, dtype=np.float32):
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"CPUModel dtype must be float32 or float64, got {dtype}")
        mc.check_batch(B, T)
        self.mc, self.B, self.T, self.dtype = mc, B, T, dtype
        self.params = np.zeros(num_params(mc), dtype=dtype)
        self.grads = np.zeros(num_params(mc), dtype=dtype)
        self._p = views(self.params, mc)  # views stay valid: params is only updated in place
        self._g = views(self.grads, mc)

    # -----------------------------------------------------------------------------------------
    def load_params(self, flat: np.ndarray) -> None:
        """Copy a flat (N,) buffer (any float dtype) into `.params`."""
        flat = np.asarray(flat)
        if flat.shape != self.params.shape:
            raise ValueError(f"load_params: expected a flat buffer of shape {self.params.shape} "
                             f"for this model, got {flat.shape}")
        if not np.issubdtype(flat.dtype, np.floating):
            raise ValueError(f"load_params: expected a float buffer, got dtype {flat.dtype}")
        self.params[...] = flat

    def zero_grad(self) -> None:
        self.grads[...] = 0

    # -----------------------------------------------------------------------------------------
    def _check_tokens(self, name, x, shape=None):
        """Validate an int token array (B', T') and return it as int64 for indexing."""
        if not isinstance(x, np.ndarray):
            raise ValueError(f"{name} must be a NumPy int32 array of shape (B, T), got {type(x).__name__}")
        if x.dtype != np.int32:
            raise ValueError(f"{name} must have dtype int32, got {x.dtype}; use .astype(np.int32)")
        if x.ndim != 2 or not (1 <= x.shape[0] <= self.B and 1 <= x.shape[1] <= self.T):
            raise ValueError(f"{name} must have shape (B', T') with 1 <= B' <= {self.B} and "
                             f"1 <= T' <= {self.T}, got {x.shape}")
        if shape is not None and x.shape != shape:
            raise ValueError(f"{name} shape {x.shape} must equal the inputs' shape {shape}")
        V = self.mc.vocab_size
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= V:
            bad = hi if hi >= V else lo
            raise ValueError(f"{name} holds token id {bad} outside the vocabulary [0, {V}); "
                             "check the data matches the GPT-2 tokenizer")
        return x.astype(np.int64)

    def _forward(self, inp):
        """Run the network to the logits; return (logits (N, Vp), activations for the backward)."""
        p, mc = self._p, self.mc
        Bc, Tc = inp.shape
        x = ref.encoder_forward(p["wte"], p["wpe"], inp)  # (B, T, C)
        layers = []
        for l in range(mc.n_layer):
            w = {name: p[name][l] for name in _LAYER_PARAMS}
            a = {"residual": x}
            a["ln1"], a["ln1_mean"], a["ln1_rstd"] = ref.layernorm_forward(x, w["ln1w"], w["ln1b"])
            a["qkv"] = ref.matmul_forward(a["ln1"], w["qkvw"], w["qkvb"])  # (B, T, 3C)
            a["atty"], a["att"] = ref.attention_forward(a["qkv"], mc.n_head)  # (B, T, C)
            attproj = ref.matmul_forward(a["atty"], w["attprojw"], w["attprojb"])  # (B, T, C)
            a["residual2"] = ref.residual_forward(x, attproj)
            a["ln2"], a["ln2_mean"], a["ln2_rstd"] = ref.layernorm_forward(
                a["residual2"], w["ln2w"], w["ln2b"])
            a["fch"] = ref.matmul_forward(a["ln2"], w["fcw"], w["fcb"])  # (B, T, 4C)
            a["fch_gelu"] = ref.gelu_forward(a["fch"])
            fcproj = ref.matmul_forward(a["fch_gelu"], w["fcprojw"], w["fcprojb"])  # (B, T, C)
            x = ref.residual_forward(a["residual2"], fcproj)
            layers.append(a)
        lnf, lnf_mean, lnf_rstd = ref.layernorm_forward(x, p["lnfw"], p["lnfb"])
        logits = ref.matmul_forward(lnf.reshape(Bc * Tc, -1), p["wte"])  # (N, Vp)
        acts = dict(inp=inp, layers=layers, x=x, lnf=lnf, lnf_mean=lnf_mean, lnf_rstd=lnf_rstd)
        return logits, acts

    def _loss(self, logits, targets):
        losses, probs = ref.crossentropy_forward(logits, targets.reshape(-1), self.mc.vocab_size)
        return float(losses.mean()), probs

    # -----------------------------------------------------------------------------------------
    def forward(self, inputs, targets=None):
        """Mean loss over the batch as a float, or None without targets."""
        inp = self._check_tokens("inputs", inputs)
        tgt = None if targets is None else self._check_tokens("targets", targets, inputs.shape)
        logits, _ = self._forward(inp)
        if tgt is None:
            return None
        return self._loss(logits, tgt)[0]

    def logits(self, inputs) -> np.ndarray:
        """float32 (B', T', V): the logits over the real vocabulary."""
        inp = self._check_tokens("inputs", inputs)
        logits, _ = self._forward(inp)
        Bc, Tc = inp.shape
        return logits[:, :self.mc.vocab_size].reshape(Bc, Tc, -1).astype(np.float32)

    def token_losses(self, inputs, targets) -> np.ndarray:
        """float32 (B', T'): the cross-entropy of each target given the inputs up to it."""
        inp = self._check_tokens("inputs", inputs)
        tgt = self._check_tokens("targets", targets, inputs.shape)
        logits, _ = self._forward(inp)
        losses, _ = ref.crossentropy_forward(logits, tgt.reshape(-1), self.mc.vocab_size)
        return losses.reshape(inp.shape).astype(np.float32)

    def forward_backward(self, inputs, targets, loss_scale: float = 1.0) -> float:
        """Accumulate loss_scale * d(mean loss)/dparams into `.grads`; return the mean loss."""
        inp = self._check_tokens("inputs", inputs)
        tgt = self._check_tokens("targets", targets, inputs.shape)
        logits, acts = self._forward(inp)
        loss, probs = self._loss(logits, tgt)
        self._backward(acts, probs, tgt.reshape(-1), float(loss_scale))
        return loss

    def _backward(self, acts, probs, targets, loss_scale):
        p, g, mc = self._p, self._g, self.mc
        inp = acts["inp"]
        Bc, Tc = inp.shape
        N = Bc * Tc
        dlosses = np.full(N, loss_scale / N, dtype=self.dtype)  # d(scaled mean)/d(loss_n)
        dlogits = ref.crossentropy_backward(probs, targets, dlosses)  # (N, Vp)
        dlnf, dwte, _ = ref.matmul_backward(dlogits, acts["lnf"].reshape(N, -1), p["wte"],
                                            has_bias=False)  # (N, C)
        g["wte"] += dwte
        dx, dw, db = ref.layernorm_backward(dlnf.reshape(Bc, Tc, -1), acts["x"], p["lnfw"],
                                            acts["lnf_mean"], acts["lnf_rstd"])  # (B, T, C)
        g["lnfw"] += dw
        g["lnfb"] += db
        for l in reversed(range(mc.n_layer)):
            a = acts["layers"][l]
            w = {name: p[name][l] for name in _LAYER_PARAMS}
            gl = {name: g[name][l] for name in _LAYER_PARAMS}  # views: += writes into .grads
            # x = residual2 + fcproj(gelu(fc(ln2(residual2))))
            dres2 = dx
            dgelu, dw, db = ref.matmul_backward(dx, a["fch_gelu"], w["fcprojw"])  # (B, T, 4C)
            gl["fcprojw"] += dw
            gl["fcprojb"] += db
            dfch = ref.gelu_backward(a["fch"], dgelu)
            dln2, dw, db = ref.matmul_backward(dfch, a["ln2"], w["fcw"])  # (B, T, C)
            gl["fcw"] += dw
            gl["fcb"] += db
            dres, dw, db = ref.layernorm_backward(dln2, a["residual2"], w["ln2w"],
                                                  a["ln2_mean"], a["ln2_rstd"])
            gl["ln2w"] += dw
            gl["ln2b"] += db
            dres2 = dres2 + dres
            # residual2 = residual + attproj(attn(qkv(ln1(residual))))
            datty, dw, db = ref.matmul_backward(dres2, a["atty"], w["attprojw"])  # (B, T, C)
            gl["attprojw"] += dw
            gl["attprojb"] += db
            dqkv = ref.attention_backward(datty, a["qkv"], a["att"], mc.n_head)  # (B, T, 3C)
            dln1, dw, db = ref.matmul_backward(dqkv, a["ln1"], w["qkvw"])  # (B, T, C)
            gl["qkvw"] += dw
            gl["qkvb"] += db
            dres, dw, db = ref.layernorm_backward(dln1, a["residual"], w["ln1w"],
                                                  a["ln1_mean"], a["ln1_rstd"])
            gl["ln1w"] += dw
            gl["ln1b"] += db
            dx = dres2 + dres
        dwte, dwpe = ref.encoder_backward(dx, inp, p["wte"].shape, p["wpe"].shape)
        g["wte"] += dwte
        g["wpe"] += dwpe
