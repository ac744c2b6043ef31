"""Text generation with a KV cache: the loop every device shares, and the CPU decoder.

    from llmc.inference.decoder import make_decoder
    dec = make_decoder(model_file.config, model_file.params, device="cuda", max_batch=4)
    for update in dec.generate([[50256], ids], max_new_tokens=64, temperature=0.8, top_k=40):
        ...                       # update.new[b]: token ids row b gained since the last update
    update.tokens                 # every row's prompt + generated ids (host lists)

Design:
- A prefill runs each prompt once through the network, writing every position's keys and
  values into the cache and choosing the first new token from the last prompt position; then
  one decode step per token feeds the newest token, appends its K and V, attends over the
  cache, and chooses the next. Prompts of different lengths share a batch: each row keeps its
  own position, so no row waits for or attends to another's padding.
- Sampling (temperature, top-k, top-p) follows llmc.model.reference.sampling_probs on every device;
  temperature 0 is greedy. The CPU draws with a NumPy Generator seeded by `seed`; the GPU
  draws with a hash of (seed, row, position) inside the sampling kernel. Either way a seed
  gives the same text every run.
- `generate` yields an update every `stream_every` tokens (the GPU syncs only then) and at the
  end; with stop_at_eot a row stops at <|endoftext|> (its later tokens are dropped) and the
  loop ends once every row has stopped.
- The CPU decoder (below) is NumPy over llmc.model.reference ops, fp32: the oracle for the GPU one.
  The GPU decoder is llmc/inference/gpu_decoder.py.

Shapes: B rows (prompts), S the cache length (<= the model's block_size), C, NH, HS, L as in
docs/DESIGN.md.
Tests: pytest tests/test_decoder.py (CPU) and pytest -m gpu tests/test_gpu_decoder.py
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmc.model import reference as ref
from llmc.config import ModelConfig
from llmc.model.params import num_params, views
from llmc.data.tokenizer import EOT

LAYER_PARAMS = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")


class GenerationError(ValueError):
    """A generation request that cannot run; the message names the setting and the fix."""


@dataclass
class Update:
    """What `generate` yields: the ids each row gained since the last update, and all so far."""
    new: list                 # per row: list of new token ids (empty once the row has stopped)
    tokens: list              # per row: prompt + every generated id so far
    done: list = field(default_factory=list)  # per row: stopped at <|endoftext|>


def check_request(mc: ModelConfig, prompts, max_new_tokens: int, max_batch: int, S: int,
                  temperature: float, top_k: int, top_p: float) -> list:
    """Validated prompts as lists of ints; GenerationError naming the problem otherwise."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompts: give at least one prompt (a list of token-id lists)")
    if len(prompts) > max_batch:
        raise GenerationError(f"prompts: {len(prompts)} prompts exceed this decoder's max_batch "
                              f"{max_batch}; make the decoder with max_batch={len(prompts)}")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens}")
    from llmc.ops.sampling import check_sampling
    try:
        check_sampling(temperature, top_k, top_p, names=("--temperature", "--top-k", "--top-p"))
    except ValueError as e:
        raise GenerationError(str(e)) from None
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise GenerationError(f"prompt {i}: empty; give at least one token (the empty text "
                                  f"is [<|endoftext|>] = [{EOT}])")
        bad = [t for t in ids if not 0 <= t < mc.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                                  f"[0, {mc.vocab_size})")
        if len(ids) >= S:
            raise GenerationError(
                f"prompt {i}: {len(ids)} tokens leave no room in the model's context of {S} "
                f"tokens; shorten the prompt to at most {S - 1} tokens")
        if len(ids) + max_new_tokens > S:
            raise GenerationError(
                f"prompt {i}: {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceed the "
                f"model's context of {S} tokens; shorten the prompt or use --max-new-tokens "
                f"{S - len(ids)} or less")
        out.append(ids)
    return out


class Decoder:
    """The generation loop; subclasses provide _prefill, _step and _fetch (see the docstring)."""

    mc: ModelConfig
    max_batch: int
    S: int

    def generate(self, prompts, max_new_tokens: int = 64, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eot: bool = True,
                 stream_every: int = 0):
        """Yield Updates while generating; the last one holds everything (see module docstring).

        stream_every=0: one update at the end (no sync while generating).
        """
        prompts = check_request(self.mc, prompts, max_new_tokens, self.max_batch, self.S,
                                temperature, top_k, top_p)
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        settings = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                        seed=int(seed))
        self._prefill(prompts, settings)
        shown = [0] * B
        done = [False] * B
        made = 1
        while True:
            last = made == max_new_tokens
            if last or (stream_every and made % stream_every == 0):
                ids = self._fetch(B, max(lengths) + made)  # (B, >= every row's length)
                new, tokens = [], []
                for b in range(B):
                    gen = [int(t) for t in ids[b, lengths[b]:lengths[b] + made]]
                    if any(t < 0 for t in gen):
                        raise GenerationError("the model produced non-finite logits, so no token "
                                              "could be drawn; check the model file")
                    if stop_at_eot and EOT in gen:
                        gen = gen[:gen.index(EOT) + 1]
                        done[b] = True
                    new.append(gen[shown[b]:])
                    shown[b] = len(gen)
                    tokens.append(prompts[b] + gen)
                yield Update(new, tokens, list(done))
                if last or all(done):
                    return
            self._step(B, settings)
            made += 1

    def generate_all(self, prompts, max_new_tokens: int = 64, **kw) -> list:
        """prompt + generated ids per row (the last Update's tokens)."""
        update = None
        for update in self.generate(prompts, max_new_tokens, **kw):
            pass
        return update.tokens


class CPUDecoder(Decoder):
    """KV-cache generation in NumPy (fp32), over llmc.model.reference ops."""

    def __init__(self, mc: ModelConfig, params, max_batch: int = 1, max_len: int | None = None):
        params = np.asarray(params, dtype=np.float32)
        if params.shape != (num_params(mc),):
            raise ValueError(f"params: expected a flat buffer of {num_params(mc)} values for this "
                             f"model, got shape {params.shape}")
        self.mc, self.max_batch = mc, int(max_batch)
        self.S = int(max_len or mc.block_size)
        if not 1 <= self.S <= mc.block_size:
            raise ValueError(f"max_len: expected 1 .. {mc.block_size}, got {max_len}")
        self.params = params
        self._p = views(params, mc)
        L, NH, HS = mc.n_layer, mc.n_head, mc.head_size
        shape = (L, self.max_batch, NH, self.S, HS)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.ids = np.zeros((self.max_batch, self.S), dtype=np.int64)
        self.pos = np.zeros(self.max_batch, dtype=np.int64)

    def _blocks(self, x, pos):
        """x (B, R, C) at positions pos[b] + r through every layer, caching K and V; lnf out."""
        p, mc = self._p, self.mc
        B, R, C = x.shape
        rows = np.arange(R)
        for l in range(mc.n_layer):
            w = {name: p[name][l] for name in LAYER_PARAMS}
            ln1 = ref.layernorm_forward(x, w["ln1w"], w["ln1b"])[0]
            qkv = ref.matmul_forward(ln1, w["qkvw"], w["qkvb"])  # (B, R, 3C)
            k = qkv[..., C:2 * C].reshape(B, R, mc.n_head, -1).transpose(0, 2, 1, 3)
            v = qkv[..., 2 * C:].reshape(B, R, mc.n_head, -1).transpose(0, 2, 1, 3)
            for b in range(B):
                at = pos[b] + rows
                ok = at < self.S
                self.k[l, b, :, at[ok]] = k[b][:, ok].transpose(1, 0, 2)
                self.v[l, b, :, at[ok]] = v[b][:, ok].transpose(1, 0, 2)
            atty = ref.attention_cached(qkv[..., :C], self.k[l, :B], self.v[l, :B], pos)
            x = x + ref.matmul_forward(atty, w["attprojw"], w["attprojb"])
            ln2 = ref.layernorm_forward(x, w["ln2w"], w["ln2b"])[0]
            h = ref.gelu_forward(ref.matmul_forward(ln2, w["fcw"], w["fcb"]))  # (B, R, 4C)
            x = x + ref.matmul_forward(h, w["fcprojw"], w["fcprojb"])
        return ref.layernorm_forward(x, p["lnfw"], p["lnfb"])[0]  # (B, R, C)

    def _choose(self, lnf_rows, settings):
        """Next token per row from lnf rows (B, C): ids[b, pos[b] + 1], then pos += 1."""
        V = self.mc.vocab_size
        logits = ref.matmul_forward(lnf_rows, self._p["wte"])[:, :V]  # (B, V)
        for b in range(lnf_rows.shape[0]):
            probs = ref.sampling_probs(logits[b], settings["temperature"], settings["top_k"],
                                       settings["top_p"])
            if settings["temperature"] <= 0:
                tok = int(np.argmax(probs))
            else:
                tok = int(self._rng.choice(V, p=probs))
            self.ids[b, self.pos[b] + 1] = tok
            self.pos[b] += 1

    def _prefill(self, prompts, settings):
        B = len(prompts)
        Tp = max(len(p) for p in prompts)
        self._rng = np.random.default_rng(settings["seed"])
        inp = np.zeros((B, Tp), dtype=np.int64)  # padding past a prompt is never attended
        for b, p in enumerate(prompts):
            inp[b, :len(p)] = p
            self.ids[b, :len(p)] = p
        x = ref.encoder_forward(self._p["wte"], self._p["wpe"], inp)  # (B, Tp, C)
        lnf = self._blocks(x, np.zeros(B, dtype=np.int64))
        self.pos[:B] = [len(p) - 1 for p in prompts]
        self._choose(lnf[np.arange(B), self.pos[:B]], settings)

    def _step(self, B, settings):
        pos = self.pos[:B].copy()
        tok = self.ids[np.arange(B), pos]
        x = (self._p["wte"][tok] + self._p["wpe"][pos])[:, None, :]  # (B, 1, C)
        self._choose(self._blocks(x, pos)[:, 0], settings)

    def _fetch(self, B, width):
        return self.ids[:B, :width]


def make_decoder(mc: ModelConfig, params, device: str = "cpu", max_batch: int = 1,
                 max_len: int | None = None, dtype: str = "bf16", graphs: bool = True) -> Decoder:
    """A CPUDecoder (fp32) or a GPUDecoder (dtype bf16/fp32, decode steps as CUDA graphs)."""
    if device == "cpu":
        return CPUDecoder(mc, params, max_batch, max_len)
    if device == "cuda":
        from llmc.inference.gpu_decoder import GPUDecoder
        return GPUDecoder(mc, params, max_batch=max_batch, max_len=max_len, dtype=dtype,
                          graphs=graphs)
    raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
