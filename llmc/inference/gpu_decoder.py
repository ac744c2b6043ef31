"""KV-cache text generation on one GPU: our kernels, decode steps replayed as CUDA graphs.

    dec = GPUDecoder(mc, params, max_batch=64, dtype="bf16")    # params: host fp32 (N,) flat
    dec.generate_all([[50256]] * 64, max_new_tokens=128, temperature=0)   # llmc.inference.decoder.Decoder

Design (llmc/inference/decoder.py has the loop and the sampling contract):
- Device state: the parameters (floatX, llmc.model.params layout), the K and V caches
  (L, max_batch, NH, S, HS) floatX, every row's token ids `ids` (max_batch, S) int32 and the
  position of the token each row feeds next, `pos` (max_batch,) int32. A step reads and advances
  pos on the device, so a step launched twice does two steps: that is what lets one captured
  graph serve every step.
- Prefill: the prompts right-padded to the longest, (B, Tp) rows through the blocks as in
  training (flash attention for bf16 with HS 64, else the matmul method), each layer's K and V
  copied into the cache (kv_append); the last prompt position of each row is gathered, its
  logits computed (B, Vp) and the first token sampled. Padding positions write cache entries
  that the row's own decode steps overwrite before any query can reach them.
- Decode step, B rows: decode_embed -> per layer ln1, qkv, decode_attention (which appends the
  new K and V), attproj, residual + ln2, fc with GELU in its epilogue, fcproj, residual + next
  ln -> logits (B, Vp) of the newest position only -> sample_tokens: 7 launches a layer. Up to
  8 rows (batch-1 decoding) the products are our weight-streaming kernels with the residual +
  LayerNorm fused into the product that reads it (matmul.matvec_layernorm_forward): 5 a layer.
- Products above 8 rows are cuBLASLt's (llmc/cuda/cublaslt.py) on the current stream with its
  preallocated workspace, so the whole step, matmuls included, is captured as one CUDA graph
  per batch size (graphs=True) after a first eager step has made every cuBLASLt plan. Replays
  cost one launch from Python per token.
- The host sees token ids only: `_fetch` copies ids (B, width) int32 when the loop asks.

Tests: pytest -m gpu tests/test_gpu_decoder.py      bench: python bench/generation.py
"""
from __future__ import annotations

import numpy as np

from llmc.config import ModelConfig
from llmc.inference.decoder import LAYER_PARAMS, Decoder
from llmc.model.gpu_model import DTYPES, from_host
from llmc.ops import F32, I32, attention, decode, layernorm, matmul, sampling
from llmc.model.params import num_params, views


class _Rows:
    """Activation buffers for R rows (prefill: B*Tp, decode: B)."""

    def __init__(self, cupy, R: int, C: int, dt):
        self.x = cupy.empty((R, C), dtype=dt)        # residual stream after each MLP
        self.res2 = cupy.empty((R, C), dtype=dt)     # residual stream after each attention
        self.ln = cupy.empty((R, C), dtype=dt)       # ln1 / ln2 output (lnf after the last layer)
        self.mean = cupy.empty((R,), dtype=F32)
        self.rstd = cupy.empty((R,), dtype=F32)
        self.qkv = cupy.empty((R, 3 * C), dtype=dt)
        self.atty = cupy.empty((R, C), dtype=dt)
        self.btc = cupy.empty((R, C), dtype=dt)
        self.fchg = cupy.empty((R, 4 * C), dtype=dt)   # gelu(fc(ln2)), from the epilogue


class GPUDecoder(Decoder):
    """GPT-2 generation on the current CUDA device; see the module docstring."""

    def __init__(self, mc: ModelConfig, params, max_batch: int = 1, max_len: int | None = None,
                 dtype: str = "bf16", graphs: bool = True, chunk: int | None = None):
        import cupy
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
        if int(max_batch) != max_batch or max_batch < 1:
            raise ValueError(f"max_batch: expected an integer >= 1, got {max_batch}")
        self.mc, self.max_batch, self.dtype = mc, int(max_batch), dtype
        self.S = int(max_len or mc.block_size)
        if not 1 <= self.S <= mc.block_size:
            raise ValueError(f"max_len: expected 1 .. {mc.block_size}, got {max_len}")
        self.floatX = DTYPES[dtype]
        self.graphs, self.chunk = bool(graphs), chunk
        n = num_params(mc)
        params = np.asarray(params)
        if params.shape != (n,):
            raise ValueError(f"params: expected a flat buffer of {n} values for this model, "
                             f"got shape {params.shape}")
        self.params = cupy.empty(n, dtype=self.floatX)
        from_host(self.params, np.ascontiguousarray(params.astype(np.float32).astype(self.floatX)))
        self._p = views(self.params, mc)
        L, C, NH, HS, Bm = mc.n_layer, mc.n_embd, mc.n_head, mc.head_size, self.max_batch
        self._pl = [{k: self._p[k][l] for k in LAYER_PARAMS} for l in range(L)]
        self.k = cupy.zeros((L, Bm, NH, self.S, HS), dtype=self.floatX)
        self.v = cupy.zeros((L, Bm, NH, self.S, HS), dtype=self.floatX)
        self.ids = cupy.zeros((Bm, self.S), dtype=I32)
        self.pos = cupy.zeros((Bm,), dtype=I32)
        self._zeros = cupy.zeros((Bm,), dtype=I32)
        self._rows = _Rows(cupy, Bm, C, self.floatX)
        self._logits = cupy.empty((Bm, mc.padded_vocab_size), dtype=self.floatX)
        chunks = {self._chunk(1), self._chunk(Bm)}
        self._scratch = {c: decode.decode_scratch(Bm, NH, HS, self.S, c) for c in chunks}
        self._prefill_bufs = {}   # (B, Tp) -> (_Rows, attention saved, attention scratch)
        self._graphs = {}         # (B, settings) -> cupy.cuda.Graph of one decode step
        self._eager_done = set()  # batch sizes whose first step ran eagerly (plans made)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._host_ids = cupy.cuda.alloc_pinned_memory(Bm * self.S * 4)

    # -----------------------------------------------------------------------------------------
    def _blocks(self, r: _Rows, R: int, attend) -> None:
        """r.x (R, C) through every layer; lnf into r.ln. attend(l, qkv (R, 3C), out (R, C)).

        The fc product applies the GELU in its epilogue (one launch, fchg written once). Up to
        8 rows (batch-1 decoding) the products are our weight-streaming kernels, the residual
        add + LayerNorm fused into the product that reads it: 5 launches a layer."""
        if R <= matmul.MATVEC_MAX_ROWS:
            return self._blocks_few_rows(r, R, attend)
        p, L = self._p, self.mc.n_layer
        x, res2, ln, mean, rstd = r.x[:R], r.res2[:R], r.ln[:R], r.mean[:R], r.rstd[:R]
        qkv, atty, btc, fchg = r.qkv[:R], r.atty[:R], r.btc[:R], r.fchg[:R]
        layernorm.layernorm_forward(ln, mean, rstd, x, p["ln1w"][0], p["ln1b"][0])
        for l in range(L):
            w = self._pl[l]
            matmul.matmul_forward(qkv, ln, w["qkvw"], w["qkvb"])
            attend(l, qkv, atty)
            matmul.matmul_forward(btc, atty, w["attprojw"], w["attprojb"])
            layernorm.fused_residual_layernorm_forward(res2, ln, mean, rstd, x, btc,
                                                       w["ln2w"], w["ln2b"])
            matmul.matmul_forward(fchg, ln, w["fcw"], w["fcb"], gelu=True)
            matmul.matmul_forward(btc, fchg, w["fcprojw"], w["fcprojb"])
            nw, nb = ((p["ln1w"][l + 1], p["ln1b"][l + 1]) if l + 1 < L
                      else (p["lnfw"], p["lnfb"]))
            layernorm.fused_residual_layernorm_forward(x, ln, mean, rstd, res2, btc, nw, nb)

    def _blocks_few_rows(self, r: _Rows, R: int, attend) -> None:
        p, L = self._p, self.mc.n_layer
        x, res2, ln, mean, rstd = r.x[:R], r.res2[:R], r.ln[:R], r.mean[:R], r.rstd[:R]
        qkv, atty, btc, fchg = r.qkv[:R], r.atty[:R], r.btc[:R], r.fchg[:R]
        for l in range(L):
            w = self._pl[l]
            if l == 0:  # the embeddings are layer 0's residual input
                matmul.matvec_layernorm_forward(qkv, None, x, None, w["ln1w"], w["ln1b"],
                                                w["qkvw"], w["qkvb"])
            else:       # x = res2 + the previous MLP's output
                matmul.matvec_layernorm_forward(qkv, x, res2, btc, w["ln1w"], w["ln1b"],
                                                w["qkvw"], w["qkvb"])
            attend(l, qkv, atty)
            matmul.matvec_forward(btc, atty, w["attprojw"], w["attprojb"])
            matmul.matvec_layernorm_forward(fchg, res2, x, btc, w["ln2w"], w["ln2b"], w["fcw"],
                                            w["fcb"], gelu=True)
            matmul.matvec_forward(btc, fchg, w["fcprojw"], w["fcprojb"])
        layernorm.fused_residual_layernorm_forward(x, ln, mean, rstd, res2, btc, p["lnfw"],
                                                   p["lnfb"])

    def _sample(self, B: int, lnf_rows, settings) -> None:
        logits = self._logits[:B]
        matmul.matmul_forward(logits, lnf_rows, self._p["wte"], None)
        sampling.sample_tokens(self.ids[:B], self.pos[:B], logits, self.mc.vocab_size,
                               **settings)

    def _prefill_buffers(self, B: int, Tp: int):
        import cupy
        key = (B, Tp)
        if key not in self._prefill_bufs:
            self._prefill_bufs.clear()  # keep one prompt shape's buffers at a time
            mc, dt = self.mc, self.floatX
            method = attention.resolve_method("auto", dt, mc.head_size)
            spec = attention.attention_buffers(B, Tp, mc.n_embd, mc.n_head, dt, method)
            saved = attention.allocate(spec)
            scratch = attention.allocate(attention.attention_scratch(B, Tp, mc.n_embd, mc.n_head,
                                                                     dt, method))
            self._prefill_bufs[key] = (_Rows(cupy, B * Tp, mc.n_embd, dt), saved, scratch)
        return self._prefill_bufs[key]

    def _prefill(self, prompts, settings) -> None:
        import cupy
        from llmc.ops import encoder
        mc, B = self.mc, len(prompts)
        Tp = max(len(p) for p in prompts)
        host = np.zeros((B, Tp), dtype=np.int32)  # padding: any valid id, never attended
        ids = np.zeros((B, self.S), dtype=np.int32)
        for b, p in enumerate(prompts):
            host[b, :len(p)] = p
            ids[b, :len(p)] = p
        last = np.array([len(p) - 1 for p in prompts], dtype=np.int32)
        r, saved, scratch = self._prefill_buffers(B, Tp)
        C, NH = mc.n_embd, mc.n_head
        with self.stream:
            inp = cupy.asarray(host)
            self.ids[:B].set(ids, stream=self.stream)
            encoder.encoder_forward(r.x.reshape(B, Tp, C), inp, self._p["wte"], self._p["wpe"])

            def attend(l, qkv, out):
                qkv3 = qkv.reshape(B, Tp, 3 * C)
                decode.kv_append(self.k[l, :B], self.v[l, :B], qkv3, self._zeros[:B])
                attention.attention_forward(out.reshape(B, Tp, C), saved, qkv3, NH, scratch)

            self._blocks(r, B * Tp, attend)
            self.pos[:B].set(last, stream=self.stream)
            lnf_last = self._rows.ln[:B]
            decode.gather_rows(lnf_last, r.ln, self.pos[:B])
            self._sample(B, lnf_last, settings)
        self.stream.synchronize()  # the host arrays above are pageable

    def _decode_step(self, B: int, settings) -> None:
        r = self._rows

        def attend(l, qkv, out):
            decode.decode_attention(out, qkv, self.k[l, :B], self.v[l, :B], self.pos[:B],
                                    self._scratch_for(B), self._chunk(B))

        decode.decode_embed(r.x[:B], self.ids[:B], self.pos[:B], self._p["wte"], self._p["wpe"])
        self._blocks(r, B, attend)
        self._sample(B, r.ln[:B], settings)

    def _chunk(self, B: int) -> int:
        """Keys per attention block: 32 up to 8 rows (measured on an H200 at d12: 5.9 vs 7.0 us
        a layer at B=1), 64 above (17.0 vs 22.1 us at B=64); or the constructor's `chunk`."""
        if self.chunk is not None:
            return int(self.chunk)
        return 32 if B <= matmul.MATVEC_MAX_ROWS else decode.DEFAULT_CHUNK

    def _scratch_for(self, B: int) -> dict:
        scratch = self._scratch[self._chunk(B)]
        return {name: arr[:B * self.mc.n_head] for name, arr in scratch.items()}

    def _step(self, B: int, settings) -> None:
        key = (B, tuple(sorted(settings.items())))
        with self.stream:
            if not self.graphs or B not in self._eager_done:
                self._decode_step(B, settings)  # the first step makes the cuBLASLt plans
                self._eager_done.add(B)
                return
            graph = self._graphs.get(key)
            if graph is None:
                self.stream.begin_capture()
                try:
                    self._decode_step(B, settings)
                finally:
                    graph = self.stream.end_capture()
                self._graphs[key] = graph
            graph.launch(self.stream)

    def _fetch(self, B: int, width: int) -> np.ndarray:
        import cupy
        width = min(width, self.S)
        out = np.frombuffer(self._host_ids, dtype=np.int32, count=B * self.S).reshape(B, self.S)
        self.ids[:B].get(stream=self.stream, out=out)
        self.stream.synchronize()
        return out[:, :width]
