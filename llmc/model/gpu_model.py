"""GPT-2 on one GPU: our kernels (llmc/ops) composed over flat parameter and gradient buffers.

The GPU implementation of the Model interface of docs/DESIGN.md (CPUModel is the CPU one):

    model = GPUModel(mc, B, T, dtype="bf16", recompute=0, attention="auto")
    model.load_params(llmc.model.params.init_params(mc, seed))       # fp32 host -> floatX device
    model.zero_grad()
    loss = model.forward_backward(inputs, targets, loss_scale=1.0)   # 0-d cupy f32, not synced
    float(loss)                                                  # the one sync, when wanted

Design:
- `.params` and `.grads` are each ONE contiguous floatX buffer in the `llmc.model.params` layout, so
  the optimizer, ZeRO shards and NCCL see one flat array; per-tensor views are made once.
- Every activation is allocated at construction for (B, T) (llmc/model/activations.py); a training
  step allocates nothing: the step's outputs (the mean loss) live in preallocated 0-d arrays.
  The returned loss array is the model's own and is overwritten by the next call of the same
  method: read it (or add it into your own buffer) before calling again.
- Forward as llm.c: per layer ln1 -> qkv matmul (+bias) -> attention -> attproj matmul ->
  fused residual + ln2 -> fc matmul -> gelu -> fcproj matmul -> fused residual + next ln1 (the
  last layer's fuses lnf); logits = lnf @ wte.T (N, Vp); the fused classifier writes the losses
  and overwrites the logits with dlogits = loss_scale/(B*T) * (softmax - onehot). Products are
  cuBLASLt's with the bias added in their epilogue (llmc/cuda/cublaslt.py).
- The GELU backward is fused into the fcproj backward's dinp product (cuBLASLt's DGELU
  epilogue reads fch): dfch is written once, no separate gelu_backward pass. The forward keeps
  our gelu kernel by default; gelu_epilogue=True (recompute=0 only) has the fc product write
  both fch and its GELU (cuBLASLt's GELU_AUX_BIAS epilogue), one pass over fch fewer, but its
  GELU of the fp32 accumulator is not what recompute=1 rebuilds from the stored bf16 fch, so
  the two settings then differ in the last bits.
- classifier_chunks=k > 1 runs the LM head over k chunks of rows, each chunk's forward, loss
  and backward (dlnf rows, dwte +=) before the next, so the (N, Vp) logits buffer shrinks to
  (N/k, Vp): at d12, B=64, T=1024 that is 6.6 GB -> 1.65 GB for k=4, the same FLOPs.
- Backward in reverse; parameter gradients accumulate (+=), so gradient accumulation is calling
  forward_backward again before zero_grad. `on_layer_grads(l)` is called once layer l's
  gradients are complete (l = L-1 .. 0), then with -1 once wte, wpe, lnfw, lnfb are: data
  parallelism starts each bucket's reduction on its own stream while the backward goes on.
- recompute=1 keeps no GELU output per layer (one shared buffer, recomputed in the backward).
- attention: "auto" | "flash" | "matmul", resolved by llmc.ops.attention.resolve_method.
- fp8=True (bf16 models on compute capability 8.9+): the qkv, attproj, fc and fcproj products
  run in fp8 through llmc/model/fp8.py (E4M3 weights and activations, E5M2 gradients, delayed
  per-tensor scaling); the GELU is fused into the cast of its output. fp8 weight copies must
  follow the weights: `params_updated()` refreshes them; load_params, GPUAdamW.update and
  DataParallel.update call it. The LM head, attention and everything else stay bf16.
- Ops are called through their modules (`matmul.matmul_forward`), so a profiler may wrap them
  (bench/e2e.py --profile).
- graphs=True: `forward_backward` without `on_layer_grads` replays a CUDA graph of the whole
  micro-step (input copy into the staging buffers aside): the first call per loss_scale runs
  eagerly (NVRTC modules, cuBLASLt plans, shared-memory limits), the second captures the
  launches on a side stream and replays them, every later one only replays, so no launch waits
  on Python. The graph reads the staging buffers `acts.inputs` / `acts.targets`, into which each
  call copies its batch first. Nothing may allocate inside a step (it would be captured at one
  address and handed back to the pool): CuPy's allocator raises while capturing, and any
  failure to capture falls back to eager launches for good, with a warning naming the cause.
  Replays are bitwise the eager step (tests/test_gpu_train.py). Under data parallelism the
  last micro-step (which starts the gradient reductions from `on_layer_grads`) stays eager.
  The matmul attention method (fp32, or bf16 when chosen) calls CuPy's cuBLAS, which refuses
  stream capture: such a model runs eager from the start (graph_failure says why, no warning). Measured on an H200 at d12: 0.57 ms of idle GPU removed from
  a 31.9 ms step at B=16 (513K -> 522K tokens/s), 0.61 ms at B=64.

Shapes: B batch, T time, C channels, NH heads, L layers, N = B*T, V / Vp (padded) vocabulary.
Tests: pytest -m gpu tests/test_gpu_model.py tests/test_gpu_train.py
"""
from __future__ import annotations

import numpy as np

from llmc.model.activations import Activations
from llmc.config import ModelConfig
from llmc.ops import BF16, F32, as_dtype
from llmc.ops import attention, classifier, encoder, gelu, layernorm, matmul
from llmc.ops.arrays import from_host, to_host  # noqa: F401 - re-exported for gpu_optim, tests
from llmc.model.params import num_params, views

LAYER_PARAMS = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")
DTYPES = {"bf16": BF16, "fp32": F32}


class GPUModel:
    """GPT-2 forward/backward on the current CUDA device; see the module docstring."""

    def __init__(self, mc: ModelConfig, B: int, T: int, dtype: str = "bf16", recompute: int = 0,
                 attention: str = "auto", classifier_chunks: int = 1, graphs: bool = False,
                 gelu_epilogue: bool = False, fp8: bool = False, fp8_wgrad: bool = True,
                 fp8_fast_accum: bool = True):
        import cupy
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if fp8:
            if dtype != "bf16":
                raise ValueError(f"fp8: the fp8 products write bf16 and keep bf16 weights; "
                                 f"use dtype='bf16' (--dtype bf16), got {dtype!r}")
            from llmc.model.fp8 import check_fp8_device
            check_fp8_device(cupy.cuda.Device().compute_capability, _device_label())
        mc.check_batch(B, T)
        if recompute not in (0, 1):
            raise ValueError(f"recompute must be 0 or 1, got {recompute!r}")
        if not 1 <= classifier_chunks <= B * T:
            raise ValueError(f"classifier_chunks must be in [1, B*T = {B * T}], got "
                             f"{classifier_chunks!r}")
        pack = 16 // DTYPES[dtype].itemsize
        if mc.n_embd % pack != 0:
            raise ValueError(f"n_embd={mc.n_embd} must be a multiple of {pack} for {dtype} "
                             "(the kernels' 128-bit access)")
        self.mc, self.B, self.T = mc, B, T
        self.dtype, self.recompute = dtype, recompute
        self.floatX = DTYPES[dtype]
        self.attention = _resolve_attention(attention, self.floatX, mc.head_size)
        n = num_params(mc)
        self.params = cupy.zeros(n, dtype=self.floatX)
        self.grads = cupy.zeros(n, dtype=self.floatX)
        self._p, self._g = views(self.params, mc), views(self.grads, mc)
        L = mc.n_layer
        self._pl = [{k: self._p[k][l] for k in LAYER_PARAMS} for l in range(L)]
        self._gl = [{k: self._g[k][l] for k in LAYER_PARAMS} for l in range(L)]
        self.fp8 = None
        if fp8:
            from llmc.model.fp8 import Fp8State
            self.fp8 = Fp8State(mc, B, T, wgrad=fp8_wgrad, fast_accum=fp8_fast_accum,
                                recompute=recompute)
        self.acts = Activations(mc, B, T, self.floatX, recompute, self.attention,
                                classifier_chunks,
                                keep_linear_inputs=not (fp8 and fp8_wgrad))
        a = self.acts
        self._encoded3 = a.encoded.reshape(B, T, mc.n_embd)
        self._dresidual3 = a.dresidual.reshape(B, T, mc.n_embd)
        self._loss = cupy.zeros((), dtype=np.float32)       # forward_backward's mean loss
        self._eval_loss = cupy.zeros((), dtype=np.float32)  # forward's mean loss
        self.graphs = bool(graphs)
        if gelu_epilogue and recompute:
            raise ValueError("gelu_epilogue needs recompute=0: the backward's recomputed GELU "
                             "(our kernel on the stored fch) would differ from the epilogue's")
        if gelu_epilogue and fp8:
            raise ValueError("gelu_epilogue: with fp8 the GELU is already fused into the fp8 "
                             "cast of its output; leave gelu_epilogue off")
        self.gelu_epilogue = bool(gelu_epilogue)
        self.graph_failure = None    # why capture failed (graphs are then off), or None
        if self.graphs and self.attention == "matmul":
            # its batched products go through CuPy's cuBLAS, which refuses stream capture
            self.graphs = False
            self.graph_failure = ("the matmul attention method (CuPy's cuBLAS) cannot be "
                                  "captured; eager launches")
        self._graphs = {}            # loss_scale -> cupy.cuda.Graph of one micro-step
        self._eager_done = set()     # loss_scales whose first micro-step ran eagerly
        self._capture_stream = None
        self.params_updated()  # fp8: copies of the (zero) weights until load_params

    # -----------------------------------------------------------------------------------------
    # parameters

    def load_params(self, flat) -> None:
        """Copy a host flat (N,) float buffer into `.params` (rounded to nearest for bf16)."""
        flat = np.asarray(flat)
        if flat.shape != self.params.shape:
            raise ValueError(f"load_params: expected a flat buffer of shape {self.params.shape} "
                             f"for this model, got {flat.shape}")
        if flat.dtype != BF16 and not np.issubdtype(flat.dtype, np.floating):
            raise ValueError(f"load_params: expected a float buffer, got dtype {flat.dtype}")
        host = np.ascontiguousarray(flat.astype(np.float32, copy=False).astype(self.floatX))
        from_host(self.params, host)
        self.params_updated()

    def params_updated(self) -> None:
        """The working params changed (an optimizer update, a load): refresh what is derived
        from them (fp8 mode: the fp8 weight copies and their scales). No-op in bf16/fp32."""
        if self.fp8 is not None:
            self.fp8.refresh_weights(self._p)

    def fp8_stats(self) -> dict | None:
        """fp8 mode: the scale bookkeeping's state (llmc.model.fp8.Fp8State.stats; one sync)."""
        return None if self.fp8 is None else self.fp8.stats()

    def params_fp32(self) -> np.ndarray:
        """The working parameters as a host float32 (N,) array (exact: bf16 widens exactly)."""
        return to_host(self.params).astype(np.float32)

    def zero_grad(self) -> None:
        self.grads.data.memset_async(0, self.grads.nbytes)

    # -----------------------------------------------------------------------------------------
    # the model interface

    def forward_backward(self, inputs, targets, loss_scale: float = 1.0, on_layer_grads=None):
        """Accumulate loss_scale * d(mean loss)/dparams into `.grads`; mean loss (0-d cupy f32)."""
        import cupy
        a = self.acts
        inp = self._tokens("inputs", inputs, a.inputs)
        tgt = self._tokens("targets", targets, a.targets)
        if not self.graphs or on_layer_grads is not None:
            self._micro_step(inp, tgt, float(loss_scale), on_layer_grads)
            return self._loss
        if inp is not a.inputs:
            cupy.copyto(a.inputs, inp)
        if tgt is not a.targets:
            cupy.copyto(a.targets, tgt)
        self._replay(float(loss_scale))
        return self._loss

    def _micro_step(self, inp, tgt, loss_scale: float, on_layer_grads) -> None:
        import cupy
        a = self.acts
        self._forward(inp)
        a.dresidual.data.memset_async(0, a.dresidual.nbytes)  # the LayerNorm backwards add into it
        self._head(tgt.reshape(-1), loss_scale / a.N, backward=True)
        classifier.mean_loss(self._loss, a.losses)
        self._backward(inp, on_layer_grads)
        if self.fp8 is not None:
            self.fp8.end_step()  # device-side: new scales from this step's amaxes

    def _replay(self, loss_scale: float) -> None:
        """One micro-step on the staging buffers: eager the first time per loss_scale, then
        captured once and replayed (see the module docstring)."""
        import cupy
        a = self.acts
        if loss_scale not in self._eager_done:
            self._micro_step(a.inputs, a.targets, loss_scale, None)
            self._eager_done.add(loss_scale)
            return
        graph = self._graphs.get(loss_scale)
        if graph is None:
            try:
                graph = self._capture(lambda: self._micro_step(a.inputs, a.targets, loss_scale,
                                                               None))
            except Exception as e:  # noqa: BLE001 - any capture failure: eager from now on
                import warnings
                self.graphs, self.graph_failure = False, f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture of the training step failed ({self.graph_failure}); "
                              "running eager launches instead", RuntimeWarning, stacklevel=3)
                self._micro_step(a.inputs, a.targets, loss_scale, None)
                return
            self._graphs[loss_scale] = graph
        graph.launch(cupy.cuda.get_current_stream())

    def _capture(self, body):
        """A cupy.cuda.Graph of body()'s launches, captured on a side stream ordered after
        the current stream's queued work; allocating inside body() raises."""
        import cupy
        if self._capture_stream is None:
            self._capture_stream = cupy.cuda.Stream(non_blocking=True)
        stream, current = self._capture_stream, cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(current)
        stream.wait_event(ready)
        allocator = cupy.cuda.get_allocator()

        def refuse(nbytes):
            raise RuntimeError(f"an allocation of {nbytes} bytes inside the captured step")
        with stream:
            cupy.cuda.set_allocator(refuse)
            try:
                stream.begin_capture()
                try:
                    body()
                finally:
                    graph = stream.end_capture()
            finally:
                cupy.cuda.set_allocator(allocator)
        return graph

    def forward(self, inputs, targets=None):
        """Mean loss (0-d cupy f32, not synced) without touching `.grads`; None without targets."""
        import cupy
        a = self.acts
        inp = self._tokens("inputs", inputs, a.inputs)
        tgt = None if targets is None else self._tokens("targets", targets, a.targets)
        self._forward(inp)
        if tgt is None:
            return None
        self._head(tgt.reshape(-1), 1.0, backward=False)
        classifier.mean_loss(self._eval_loss, a.losses)
        return self._eval_loss

    def token_losses(self, inputs, targets) -> np.ndarray:
        """float32 (B', T') host losses of each target, B' <= B, T' <= T (padded like logits)."""
        x, y = np.asarray(inputs), np.asarray(targets)
        if x.ndim != 2 or x.shape != y.shape or not (1 <= x.shape[0] <= self.B
                                                      and 1 <= x.shape[1] <= self.T):
            raise ValueError(f"inputs and targets must share a shape (B', T') with 1 <= B' <= "
                             f"{self.B} and 1 <= T' <= {self.T}, got {x.shape} and {y.shape}")
        Bc, Tc = x.shape
        padded = np.zeros((2, self.B, self.T), dtype=np.int32)
        padded[0, :Bc, :Tc] = _check_host_tokens("inputs", x, self.mc.vocab_size)
        padded[1, :Bc, :Tc] = _check_host_tokens("targets", y, self.mc.vocab_size)
        self.forward(padded[0], padded[1])
        import cupy
        losses = cupy.asnumpy(self.acts.losses).reshape(self.B, self.T)
        return losses[:Bc, :Tc]

    def logits(self, inputs) -> np.ndarray:
        """float32 (B', T', V) host logits for int tokens (B', T'), B' <= B, T' <= T.

        Shorter inputs are padded with token 0 at the end; attention is causal, so the padding
        does not change the logits of the real positions.
        """
        x = np.asarray(inputs)
        if x.ndim != 2 or not (1 <= x.shape[0] <= self.B and 1 <= x.shape[1] <= self.T):
            raise ValueError(f"inputs must have shape (B', T') with 1 <= B' <= {self.B} and "
                             f"1 <= T' <= {self.T}, got {x.shape}")
        Bc, Tc = x.shape
        padded = np.zeros((self.B, self.T), dtype=np.int32)
        padded[:Bc, :Tc] = _check_host_tokens("inputs", x, self.mc.vocab_size)
        self._forward(self._tokens("inputs", padded, self.acts.inputs))
        a, V = self.acts, self.mc.vocab_size
        need = (Bc - 1) * self.T + Tc  # rows 0 .. need-1 hold every wanted position
        out = np.empty((need, V), dtype=np.float32)
        for lo, hi in a.head_chunks:
            if lo >= need:
                break
            logits = a.logits[:hi - lo]
            matmul.matmul_forward(logits, a.lnf[lo:hi], self._p["wte"], None)
            top = min(hi, need)
            out[lo:top] = to_host(logits[:top - lo, :V]).astype(np.float32)
        rows = (np.arange(Bc)[:, None] * self.T + np.arange(Tc)[None, :]).reshape(-1)
        return out[rows].reshape(Bc, Tc, V)

    # -----------------------------------------------------------------------------------------
    def _tokens(self, name, x, staging):
        """A device int32 (B, T) array for `x`: x itself when it already is one, else a copy
        into the preallocated `staging` buffer (host arrays go over on the current stream)."""
        import cupy
        shape = (self.B, self.T)
        if isinstance(x, cupy.ndarray):
            if x.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
            if x.dtype == np.int32 and x.flags.c_contiguous and x.device.id == staging.device.id:
                return x
            if x.dtype.kind not in "iu":
                raise ValueError(f"{name}: expected integer token ids, got dtype {x.dtype}")
            staging[...] = x
            return staging
        host = _check_host_tokens(name, np.asarray(x), self.mc.vocab_size)
        if host.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {host.shape}")
        stream = cupy.cuda.get_current_stream()
        staging.set(host, stream=stream)  # pageable source: staged before the call returns
        return staging

    def _forward(self, inp) -> None:
        """Encoder, L blocks, lnf (N, C) into self.acts; the LM head is `_head`."""
        a, p, mc = self.acts, self._p, self.mc
        L, NH = mc.n_layer, mc.n_head
        encoder.encoder_forward(self._encoded3, inp, p["wte"], p["wpe"])
        layernorm.layernorm_forward(a.ln1_l[0], a.ln1_mean[0], a.ln1_rstd[0], a.encoded,
                                    p["ln1w"][0], p["ln1b"][0])
        for l in range(L):
            w = self._pl[l]
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            self._linear(l, "qkv", a.qkv_l[l], a.ln1_l[l])
            attention.attention_forward(a.atty_l[l], a.saved[l], a.qkv_l[l], NH, a.attn_scratch)
            self._linear(l, "attproj", a.btc, a.atty_l[l])
            layernorm.fused_residual_layernorm_forward(
                a.residual2[l], a.ln2_l[l], a.ln2_mean[l], a.ln2_rstd[l], residual, a.btc,
                w["ln2w"], w["ln2b"])
            if self.fp8 is not None:  # GELU fused into the fp8 cast of its output
                self._linear(l, "fc", a.fch[l], a.ln2_l[l])
                self.fp8.gelu_forward(l, a.fch[l], out_x=None if a.fch_gelu is None
                                      else a.fch_gelu[l])
                self._linear(l, "fcproj", a.btc, None)
            elif self.gelu_epilogue:
                matmul.matmul_forward(a.fch_gelu[l], a.ln2_l[l], w["fcw"], w["fcb"], gelu=True,
                                      pre_gelu=a.fch[l])
                self._linear(l, "fcproj", a.btc, a.fch_gelu[l])
            else:
                self._linear(l, "fc", a.fch[l], a.ln2_l[l])
                gelu.gelu_forward(a.fch_gelu[l], a.fch[l])
                self._linear(l, "fcproj", a.btc, a.fch_gelu[l])
            if l + 1 < L:
                out, mean, rstd = a.ln1_l[l + 1], a.ln1_mean[l + 1], a.ln1_rstd[l + 1]
                nw, nb = p["ln1w"][l + 1], p["ln1b"][l + 1]
            else:
                out, mean, rstd, nw, nb = a.lnf, a.lnf_mean, a.lnf_rstd, p["lnfw"], p["lnfb"]
            layernorm.fused_residual_layernorm_forward(
                a.residual3[l], out, mean, rstd, a.residual2[l], a.btc, nw, nb)

    def _linear(self, l: int, name: str, out, inp) -> None:
        """out = inp @ W.T + b of layer l's product `name` (fp8 mode: inp None means its fp8
        copy is already in place)."""
        w = self._pl[l]
        if self.fp8 is not None:
            self.fp8.forward(l, name, out, inp, w[name + "b"])
        else:
            matmul.matmul_forward(out, inp, w[name + "w"], w[name + "b"])

    def _linear_backward(self, l: int, name: str, dinp, dout, inp, pre_gelu=None,
                         bias: bool = True) -> None:
        """dinp = dout @ W (=), dW += dout^T @ inp, db += sums of dout (unless bias is False: a
        LayerNorm backward added them already), for layer l's `name`."""
        w, dw, s = self._pl[l], self._gl[l], self.acts.scratch
        dbias = dw[name + "b"] if bias else None
        if self.fp8 is not None:
            self.fp8.backward(l, name, dinp, dw[name + "w"], dbias, dout, inp, s,
                              pre_gelu=pre_gelu)
        else:
            matmul.matmul_backward(dinp, dw[name + "w"], dbias, dout, inp, w[name + "w"], s,
                                   pre_gelu=pre_gelu)

    def _head(self, targets, dloss: float, backward: bool) -> None:
        """Per chunk of rows: logits = lnf @ wte.T, losses; with backward, dlogits in place,
        then dlnf (into btc) and dwte += dlogits.T @ lnf."""
        a, p, g, V = self.acts, self._p, self._g, self.mc.vocab_size
        for lo, hi in a.head_chunks:
            logits = a.logits[:hi - lo]
            matmul.matmul_forward(logits, a.lnf[lo:hi], p["wte"], None)
            classifier.fused_classifier(logits, a.losses[lo:hi], targets[lo:hi], V, dloss,
                                        write_dlogits=backward)
            if backward:
                matmul.matmul_backward(a.btc[lo:hi], g["wte"], None, logits, a.lnf[lo:hi],
                                       p["wte"], a.scratch)

    def _backward(self, inp, on_layer_grads) -> None:
        """From dlnf (in a.btc, written by `_head`) to every parameter gradient (+=).

        The two projections that write into the residual stream (attproj, fcproj) get their bias
        gradient, the column sums of the residual's gradient, from the LayerNorm backward that
        finishes that gradient (ln2 for attproj; ln1 of the layer above, or lnf, for fcproj),
        not from a pass of their own over it."""
        a, p, g, mc = self.acts, self._p, self._g, self.mc
        L, NH, s = mc.n_layer, mc.n_head, a.scratch
        layernorm.layernorm_backward(a.dresidual, g["lnfw"], g["lnfb"], a.btc, a.residual3[L - 1],
                                     p["lnfw"], a.lnf_mean, a.lnf_rstd, s,
                                     dinp_colsum=self._gl[L - 1]["fcprojb"])
        for l in reversed(range(L)):
            w, dw = self._pl[l], self._gl[l]
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            # MLP: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2))))
            fch_gelu = None if a.fch_gelu is None else a.fch_gelu[l]
            if self.recompute and self.fp8 is not None:
                self.fp8.recompute_gelu(l, a.fch[l], out_x=fch_gelu)
            elif self.recompute:
                gelu.gelu_forward(fch_gelu, a.fch[l])
            # dfch = (dresidual @ fcprojw) * gelu'(fch): the GELU backward in the product
            self._linear_backward(l, "fcproj", a.dfch, a.dresidual, fch_gelu, pre_gelu=a.fch[l],
                                  bias=False)
            self._linear_backward(l, "fc", a.btc, a.dfch, a.ln2_l[l])
            layernorm.layernorm_backward(a.dresidual, dw["ln2w"], dw["ln2b"], a.btc,
                                         a.residual2[l], w["ln2w"], a.ln2_mean[l],
                                         a.ln2_rstd[l], s, dinp_colsum=dw["attprojb"])
            # attention: residual2 = residual + attproj(attn(qkv(ln1(residual))))
            self._linear_backward(l, "attproj", a.btc, a.dresidual, a.atty_l[l], bias=False)
            attention.attention_backward(a.dqkv, a.btc3, a.qkv_l[l], a.atty_l[l], a.saved[l], NH,
                                         a.attn_scratch)
            self._linear_backward(l, "qkv", a.btc, a.dqkv, a.ln1_l[l])
            layernorm.layernorm_backward(
                a.dresidual, dw["ln1w"], dw["ln1b"], a.btc, residual, w["ln1w"], a.ln1_mean[l],
                a.ln1_rstd[l], s, dinp_colsum=self._gl[l - 1]["fcprojb"] if l > 0 else None)
            if on_layer_grads is not None:
                on_layer_grads(l)
        encoder.encoder_backward(g["wte"], g["wpe"], self._dresidual3, inp, s)
        if on_layer_grads is not None:
            on_layer_grads(-1)


def _device_label() -> str:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _resolve_attention(method: str, floatX, head_size: int) -> str:
    return attention.resolve_method(method, as_dtype(floatX), head_size)


def _check_host_tokens(name, x: np.ndarray, V: int) -> np.ndarray:
    """Host int tokens -> int32, every id in [0, V) (checked here: it costs no device sync)."""
    if x.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integer token ids, got dtype {x.dtype}")
    if x.size and (int(x.min()) < 0 or int(x.max()) >= V):
        raise ValueError(f"{name}: token ids must lie in [0, {V}), got range "
                         f"[{int(x.min())}, {int(x.max())}]")
    return np.ascontiguousarray(x, dtype=np.int32)

