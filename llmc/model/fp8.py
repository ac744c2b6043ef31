"""fp8 training state of a GPUModel (`--fp8`): scales, fp8 weight copies, the four linear layers'
products in fp8.

    state = Fp8State(mc, B, T, wgrad=True, fast_accum=True, recompute=0)
    state.refresh_weights(p)           # after every optimizer update and load_params
    state.forward(l, name, out, inp, bias)                  # out = inp @ W.T + bias in fp8
    state.gelu_forward(l, fch, out_x=None)                  # fp8 copy of gelu(fch) (fcproj input)
    state.backward(l, name, dinp, dweight, dbias, dout, inp, scratch, pre_gelu=None)
    state.end_step()                   # after each forward_backward: roll histories, new scales
    state.stats() -> dict              # host read: max amax, min/max scale, non-finite count

What runs in fp8 (names: qkv, attproj, fc, fcproj; the LM head stays bf16):
    forward  out (N, OC) = x (N, C) @ W (OC, C).T + b     x, W e4m3, bias epilogue, bf16 out
    dgrad    dx (N, C) = g (N, OC) @ W^T (C, OC).T        g e5m2, W^T e4m3 (DGELU epilogue
                                                          for fcproj, else gelu_backward)
    wgrad    dW (OC, C) += g^T (OC, N) @ x^T (C, N).T     (wgrad=True; else bf16 from dout, x)
cuBLASLt's fp8 products take only K-contiguous operands ("TN"), so the backward needs the
transposes: W^T is made with W at each refresh (weights are small), x^T by the cast in the
forward (kept per layer until the backward: 1 byte per element, where the bf16 path keeps
2-byte ln1, ln2 and GELU outputs, which fp8 mode then does not store per layer) and g^T by the
gradient's cast.

Scaling, per tensor:
- Activations and gradients: delayed scaling (Transformer Engine's recipe). Each of the 8 L
  slots (x and g of every product of every layer) has an amax history of AMAX_HISTORY steps;
  the cast uses the current scale and records this tensor's amax, and `end_step` (one launch)
  writes the amaxes into the histories and sets scale = fmax / max(history) * 2^-MARGIN,
  keeping the old scale when the history is all zero or the result is not finite. Non-finite
  amaxes never become a scale; `stats()` counts them.
- The first forward_backward has no history: it runs with current scaling (each cast is
  preceded by an amax pass over the same tensor and the slot's scale update), so no step runs
  on a guessed scale. After that a step costs no extra pass.
- Weights: current scaling at each refresh (amax pass, scale, cast + transpose), H = 1.
- Nothing of this is checkpointed: a resumed run re-derives the scales in its first step, and
  checkpoints hold the usual bf16/fp32 weights.

Shapes: B, T, C, L, N = B*T, OC as docs/DESIGN.md. N and C must be multiples of 16.
Tests: pytest tests/test_fp8.py (CPU: the references and bookkeeping; -m gpu: kernels, products,
the model).
"""
from __future__ import annotations

import numpy as np

from llmc.config import ConfigError
from llmc.model.reference import FP8_MAX
from llmc.ops import F32, fp8, matmul
from llmc.cuda import cublaslt

AMAX_HISTORY = 16
MARGIN = 0
GRAD_FMT = "e5m2"  # the gradients' fp8 format (E4M3 trades range for one more mantissa bit)
PRODUCTS = ("qkv", "attproj", "fc", "fcproj")
MIN_CAPABILITY = 89  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and later


def check_fp8_device(capability, name: str = "this GPU") -> None:
    """ConfigError unless the compute capability (e.g. "90") has fp8 tensor cores."""
    cc = int(capability)
    if cc < MIN_CAPABILITY:
        raise ConfigError(f"--fp8 needs fp8 tensor cores (compute capability 8.9 or newer: Ada, "
                          f"Hopper); {name} is sm_{cc}; train without --fp8 (bf16)")


def product_shapes(C: int) -> dict:
    """name -> (OC, IN) of each linear weight."""
    return {"qkv": (3 * C, C), "attproj": (C, C), "fc": (4 * C, C), "fcproj": (C, 4 * C)}


class ScaleSet:
    """S per-tensor scales with (S, H) amax histories on the device; slot s has format fmts[s].

    The history column `pos` is an int32 on the device, advanced by the update kernel, so a
    captured training step replays the bookkeeping exactly. Decode scales live in 16-byte rows
    (`scale_inv_rows` (S, INV_STRIDE), column 0): cuBLASLt takes each one by pointer and
    refuses pointers that are not 16-byte aligned.
    """

    def __init__(self, fmts, history: int, margin: int = MARGIN):
        import cupy
        S = len(fmts)
        self.S, self.H, self.margin = S, int(history), int(margin)
        self.pos = cupy.zeros(1, dtype=np.int32)
        self.fmax = cupy.asarray(np.array([FP8_MAX[f] for f in fmts], dtype=np.float32))
        self.scale = cupy.ones(S, dtype=F32)
        self.scale_inv_rows = cupy.ones((S, fp8.INV_STRIDE), dtype=F32)
        self.scale_inv = self.scale_inv_rows[:, 0]  # strided view: host reads only
        self.history = cupy.zeros((S, self.H), dtype=F32)
        self.amax = cupy.zeros(S, dtype=F32)
        # per-slot one-element views, made once (a view costs host time per call)
        self.v_scale = [self.scale[s:s + 1] for s in range(S)]
        self.v_scale_inv = [self.scale_inv_rows[s, 0:1] for s in range(S)]
        self.v_amax = [self.amax[s:s + 1] for s in range(S)]
        self._v_hist = [self.history[s:s + 1] for s in range(S)]
        self._v_fmax = [self.fmax[s:s + 1] for s in range(S)]
        self._v_inv_rows = [self.scale_inv_rows[s:s + 1] for s in range(S)]

    def update(self) -> None:
        """Every slot: history[:, pos] = amax, amax = 0, new scales; pos moves on."""
        fp8.scale_update(self.scale, self.scale_inv_rows, self.history, self.amax, self.fmax,
                         self.pos, self.margin)

    def update_range(self, lo: int, hi: int) -> None:
        """The same for slots [lo, hi) only, at the current pos (which does not move)."""
        fp8.scale_update(self.scale[lo:hi], self.scale_inv_rows[lo:hi], self.history[lo:hi],
                         self.amax[lo:hi], self.fmax[lo:hi], self.pos, self.margin,
                         advance=False)

    def calibrate(self, s: int) -> None:
        """Slot s only, at the current pos: current scaling from the amax just recorded."""
        fp8.scale_update(self.v_scale[s], self._v_inv_rows[s], self._v_hist[s], self.v_amax[s],
                         self._v_fmax[s], self.pos, self.margin, advance=False)


class Fp8State:
    """See the module docstring."""

    def __init__(self, mc, B: int, T: int, *, wgrad: bool = True, fast_accum: bool = True,
                 recompute: int = 0):
        import cupy
        L, C, N = mc.n_layer, mc.n_embd, B * T
        if C % 16 or N % 16:
            raise ValueError(f"fp8: n_embd ({C}) and batch_size*seq_len ({N}) must be multiples "
                             "of 16 (cuBLASLt's fp8 rows are 16-byte aligned)")
        self.L, self.C, self.N = L, C, N
        self.wgrad, self.fast_accum = bool(wgrad), bool(fast_accum)
        self.shapes = product_shapes(C)
        u8 = np.uint8
        # activations and gradients: slot 8 l + j is x of product j, 8 l + 4 + j its gradient
        self.act = ScaleSet((["e4m3"] * 4 + [GRAD_FMT] * 4) * L, AMAX_HISTORY)
        # weights: slot j L + l, so weight j's L slots are one contiguous range (batched cast)
        self.wts = ScaleSet(["e4m3"] * (4 * L), 1)
        self.w8, self.wt8 = {}, {}
        for name, (OC, IN) in self.shapes.items():
            self.w8[name] = cupy.empty((L, OC, IN), dtype=u8)
            self.wt8[name] = cupy.empty((L, IN, OC), dtype=u8)
        self.x8 = cupy.empty(N * 4 * C, dtype=u8)    # the current product's fp8 input
        self.g8 = cupy.empty(N * 4 * C, dtype=u8)    # the current product's fp8 gradient
        self.gt8 = cupy.empty(N * 4 * C, dtype=u8)   # ... and its transpose
        self.xt8 = {}                                # per layer x^T, kept for the wgrad
        if self.wgrad:
            for name, (OC, IN) in self.shapes.items():
                layers = 1 if (recompute and name == "fcproj") else L
                store = cupy.empty((layers, IN, N), dtype=u8)
                self.xt8[name] = [store[0 if layers == 1 else l] for l in range(L)]
        self.calibrating = True
        self.dgelu_fused = True  # cleared if cuBLASLt has no fp8 DGELU kernel for a shape

    def nbytes(self) -> int:
        """Device bytes held (the shared and per-layer fp8 buffers, weight copies, scales)."""
        arrays = [self.x8, self.g8, self.gt8] + list(self.w8.values()) + list(self.wt8.values())
        seen = {id(a) for a in arrays}
        for views in self.xt8.values():
            base = views[0].base
            if id(base) not in seen:
                seen.add(id(base))
                arrays.append(base)
        return int(sum(a.nbytes for a in arrays))

    # ---- weights --------------------------------------------------------------------------
    def refresh_weights(self, p) -> None:
        """fp8 W and W^T of every linear weight from the working params (views `p`)."""
        L, w = self.L, self.wts
        for j, name in enumerate(PRODUCTS):
            fp8.cast_transpose(None, None, w.amax[j * L:(j + 1) * L], p[name + "w"],
                               w.scale[j * L:(j + 1) * L], batch=L)
        w.update()
        for j, name in enumerate(PRODUCTS):
            fp8.cast_transpose(self.w8[name], self.wt8[name], w.amax[j * L:(j + 1) * L],
                               p[name + "w"], w.scale[j * L:(j + 1) * L], batch=L)
        w.amax.fill(0)  # the cast recorded the amax again; the next refresh starts clean

    # ---- casts ----------------------------------------------------------------------------
    def _cast(self, s: int, src, out, out_t, fmt: str, gelu: bool = False, out_x=None):
        a = self.act
        if self.calibrating:  # current scaling: this tensor's amax first, then its scale
            amax_pass = fp8.gelu_cast_transpose if gelu else fp8.cast_transpose
            amax_pass(None, None, a.v_amax[s], src, a.v_scale[s], fmt=fmt)
            a.calibrate(s)
        if gelu:
            fp8.gelu_cast_transpose(out, out_t, a.v_amax[s], src, a.v_scale[s], out_x=out_x,
                                    fmt=fmt)
        else:
            fp8.cast_transpose(out, out_t, a.v_amax[s], src, a.v_scale[s], fmt=fmt)

    def _x8(self, IN: int):
        return self.x8[:self.N * IN].reshape(self.N, IN)

    def _input(self, l: int, name: str, src) -> None:
        j = PRODUCTS.index(name)
        IN = self.shapes[name][1]
        out_t = self.xt8[name][l] if self.wgrad else None
        self._cast(8 * l + j, src.reshape(self.N, IN), self._x8(IN), out_t, "e4m3")

    def gelu_forward(self, l: int, fch, out_x=None) -> None:
        """fp8 gelu(fch) into the fcproj input buffer (+ its transpose; + floatX out_x)."""
        j = PRODUCTS.index("fcproj")
        out_t = self.xt8["fcproj"][l] if self.wgrad else None
        self._cast(8 * l + j, fch.reshape(self.N, 4 * self.C), self._x8(4 * self.C), out_t,
                   "e4m3", gelu=True, out_x=out_x)

    def recompute_gelu(self, l: int, fch, out_x=None) -> None:
        """The backward's recompute=1 rebuild of what gelu_forward kept: the same scale (it
        only changes in end_step), so the same bits; x^T only (and out_x for a bf16 wgrad)."""
        j = PRODUCTS.index("fcproj")
        out_t = self.xt8["fcproj"][l] if self.wgrad else None
        a = self.act
        fp8.gelu_cast_transpose(None, out_t, a.v_amax[8 * l + j], fch.reshape(self.N, 4 * self.C),
                                a.v_scale[8 * l + j], out_x=out_x)

    # ---- products -------------------------------------------------------------------------
    def forward(self, l: int, name: str, out, inp, bias) -> None:
        """out (N, OC) = inp @ W.T + bias in fp8; inp None: its fp8 copy is already in place
        (gelu_forward)."""
        OC, IN = self.shapes[name]
        if inp is not None:
            self._input(l, name, inp)
        s = 8 * l + PRODUCTS.index(name)
        ws = PRODUCTS.index(name) * self.L + l
        fp8.fp8_matmul(out.reshape(self.N, OC), self._x8(IN), "e4m3", self.act.v_scale_inv[s],
                       self.w8[name][l], "e4m3", self.wts.v_scale_inv[ws], epilogue="bias",
                       bias=bias, fast_accum=self.fast_accum)

    def backward(self, l: int, name: str, dinp, dweight, dbias, dout, inp, scratch,
                 pre_gelu=None) -> None:
        """dinp = dout @ W (=, through gelu' with pre_gelu); dweight += dout^T @ x; dbias +=
        column sums of dout. inp: the bf16 input (used only when wgrad is bf16)."""
        OC, IN = self.shapes[name]
        N, j = self.N, PRODUCTS.index(name)
        s, ws = 8 * l + 4 + j, j * self.L + l
        g = dout.reshape(N, OC)
        g8 = self.g8[:N * OC].reshape(N, OC)
        gt8 = self.gt8[:N * OC].reshape(OC, N) if self.wgrad else None
        self._cast(s, g, g8, gt8, GRAD_FMT)
        a, w = self.act, self.wts
        dx = dinp.reshape(N, IN)
        if pre_gelu is not None and self.dgelu_fused:
            try:
                fp8.fp8_matmul(dx, g8, GRAD_FMT, a.v_scale_inv[s], self.wt8[name][l], "e4m3",
                               w.v_scale_inv[ws], epilogue="dgelu",
                               aux=pre_gelu.reshape(N, IN))
            except RuntimeError:  # no fp8 DGELU kernel in this cuBLASLt: product, then gelu'
                self.dgelu_fused = False
        if pre_gelu is None or not self.dgelu_fused:
            fp8.fp8_matmul(dx, g8, GRAD_FMT, a.v_scale_inv[s], self.wt8[name][l], "e4m3",
                           w.v_scale_inv[ws])
            if pre_gelu is not None:
                from llmc.ops import gelu
                gelu.gelu_backward(dx, pre_gelu.reshape(N, IN), dx)
        if self.wgrad:
            fp8.fp8_matmul(dweight, gt8, GRAD_FMT, a.v_scale_inv[s], self.xt8[name][l], "e4m3",
                           a.v_scale_inv[8 * l + j], beta=1.0)
        else:
            cublaslt.matmul(dweight, g, inp.reshape(N, IN), trans_a=True, beta=1.0)
        if dbias is not None:
            matmul.bias_backward(dbias, g, scratch)

    def end_step(self) -> None:
        """After a forward_backward: the amaxes it recorded become history, scales follow."""
        self.act.update()
        self.calibrating = False

    def stats(self) -> dict:
        """Host values (one sync): the largest finite amax in the histories, the smallest and
        largest scale, and how many history entries or scales are not finite."""
        import cupy
        hist = cupy.asnumpy(self.act.history)
        scales = np.concatenate([cupy.asnumpy(self.act.scale), cupy.asnumpy(self.wts.scale)])
        finite = hist[np.isfinite(hist)]
        return {"amax_max": float(finite.max(initial=0.0)),
                "scale_min": float(scales.min()), "scale_max": float(scales.max()),
                "nonfinite": int((~np.isfinite(hist)).sum() + (~np.isfinite(scales)).sum())}
