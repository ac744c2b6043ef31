"""Hugging Face GPT-2 directories: `config.json` + `model.safetensors`, read and written.

The tensors are those of `transformers.GPT2LMHeadModel` (read with the `safetensors` package,
no torch). Two layouts exist on disk and both are read:
    save_pretrained:   transformer.wte.weight, transformer.h.0.attn.c_attn.weight, ...
                       (lm_head.weight omitted, or present and equal to wte: tied)
    older hub files:   wte.weight, h.0.attn.c_attn.weight, ... plus the h.N.attn.bias and
                       h.N.attn.masked_bias buffers, which are constants and are ignored
Writing produces the save_pretrained layout and a config.json that `from_pretrained` loads.

Differences from llmc's flat layout (llmc.model.params):
- GPT-2's linear layers are Conv1D modules whose weights are stored (in, out); llmc's are
  (out, in), so every matrix is transposed on the way in and out.
- wte is (V, C) = (50257, C); llmc pads it to (Vp, C) = (50304, C) with zero rows. Reading
  appends the zero rows, writing drops them.
- Per-layer tensors (h.N.*) are stacked over layers into one (L, ...) tensor.
Only models llmc computes exactly are accepted: model_type gpt2, vocab 50257 (the GPT-2
tokenizer), tanh GELU, LayerNorm epsilon 1e-5, MLP width 4C, scaled attention, tied head.
fp32, bf16 and fp16 tensors are read (widened to fp32 exactly); fp32 or bf16 are written
(bf16 through ml_dtypes, rounded to nearest even).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from llmc.config import ConfigError, ModelConfig
from llmc.formats.modelfile import FormatError
from llmc.model.params import num_params, views

CONFIG, WEIGHTS = "config.json", "model.safetensors"
GPT2_VOCAB = 50257
EPS = 1e-5
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
DTYPES = {"fp32": (np.dtype(np.float32), "float32"), "bf16": (np.dtype(ml_dtypes.bfloat16), "bfloat16")}
_READ_DTYPES = ("F32", "BF16", "F16")
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # older transformers' mask buffers

# llmc name -> (HF name inside block h.N, or at the top level; transpose?)
_LAYER = {"ln1w": ("ln_1.weight", False), "ln1b": ("ln_1.bias", False),
          "qkvw": ("attn.c_attn.weight", True), "qkvb": ("attn.c_attn.bias", False),
          "attprojw": ("attn.c_proj.weight", True), "attprojb": ("attn.c_proj.bias", False),
          "ln2w": ("ln_2.weight", False), "ln2b": ("ln_2.bias", False),
          "fcw": ("mlp.c_fc.weight", True), "fcb": ("mlp.c_fc.bias", False),
          "fcprojw": ("mlp.c_proj.weight", True), "fcprojb": ("mlp.c_proj.bias", False)}
_TOP = {"wte": "wte.weight", "wpe": "wpe.weight", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


# ----------------------------------------------------------------------------------------------
# config.json

def config_from_json(cfg: dict, where: Path) -> ModelConfig:
    """The ModelConfig of a GPT-2 config.json (missing keys take GPT2Config's defaults)."""
    def bad(problem, fix):
        return FormatError(f"{where}: {problem}; {fix}")
    mt = cfg.get("model_type")
    if mt != "gpt2":
        raise bad(f"model_type is {mt!r}, not 'gpt2'", "llmc reads GPT-2 models only")
    V = cfg.get("vocab_size", GPT2_VOCAB)
    if V != GPT2_VOCAB:
        raise bad(f"vocab_size is {V}, not GPT-2's {GPT2_VOCAB}",
                  "llmc uses the GPT-2 tokenizer, so it reads models with exactly its vocabulary")
    act = cfg.get("activation_function", "gelu_new")
    if act not in TANH_GELU:
        raise bad(f"activation_function is {act!r}, not the tanh GELU ('gelu_new') llmc computes",
                  "only GPT-2's own activation is supported")
    eps = cfg.get("layer_norm_epsilon", EPS)
    if eps != EPS:
        raise bad(f"layer_norm_epsilon is {eps}, not {EPS}", "llmc's LayerNorm uses 1e-5 only")
    L, NH, C = cfg.get("n_layer", 12), cfg.get("n_head", 12), cfg.get("n_embd", 768)
    maxT = cfg.get("n_positions", 1024)
    if cfg.get("n_inner") not in (None, 4 * C):
        raise bad(f"n_inner is {cfg['n_inner']}, not 4*n_embd = {4 * C}", "llmc's MLP is 4C wide")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise bad("attention scaling differs from GPT-2's 1/sqrt(head size)",
                  "set scale_attn_weights true and scale_attn_by_inverse_layer_idx false")
    if cfg.get("add_cross_attention", False):
        raise bad("add_cross_attention is true", "llmc reads decoder-only GPT-2 models")
    if cfg.get("tie_word_embeddings", True) is False:
        raise bad("tie_word_embeddings is false (separate LM head)",
                  "llmc's LM head is tied to wte; only tied GPT-2 models can be read")
    try:
        return ModelConfig(n_layer=L, n_head=NH, n_embd=C, vocab_size=GPT2_VOCAB, block_size=maxT)
    except (ConfigError, TypeError) as e:
        raise bad(f"impossible model shape ({str(e).split(';')[0]})", "the config.json is damaged") from e


def config_to_json(mc: ModelConfig, dtype: str) -> dict:
    """config.json for `mc` as GPT2LMHeadModel.save_pretrained writes it."""
    return {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "bos_token_id": GPT2_VOCAB - 1, "eos_token_id": GPT2_VOCAB - 1,
        "initializer_range": 0.02, "layer_norm_epsilon": EPS, "model_type": "gpt2",
        "n_ctx": mc.block_size, "n_embd": mc.n_embd, "n_head": mc.n_head, "n_inner": None,
        "n_layer": mc.n_layer, "n_positions": mc.block_size,
        "scale_attn_weights": True, "tie_word_embeddings": True,
        "torch_dtype": DTYPES[dtype][1], "vocab_size": mc.vocab_size,
    }


# ----------------------------------------------------------------------------------------------
# reading

def read(path) -> tuple:
    """A HF GPT-2 directory, or its model.safetensors -> (ModelConfig, float32 (N,) flat)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / WEIGHTS
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        raise FormatError(f"{directory}: no {CONFIG} beside the weights; a Hugging Face model "
                          f"directory needs both {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: unreadable JSON ({e}); download the model again") from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: not a JSON object; download the model again")
    mc = config_from_json(cfg, cfg_path)
    if not weights.is_file():
        other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.index.json")]
        hint = (f" (found {', '.join(sorted(other))}: convert with transformers, "
                "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(new_dir))" if other else "")
        raise FormatError(f"{weights}: missing; llmc reads single-file {WEIGHTS} weights{hint}")
    tensors = _read_tensors(weights)
    return mc, _to_flat(tensors, mc, weights)


def _read_tensors(weights: Path) -> dict:
    """name (prefix 'transformer.' removed) -> float32 array; every failure is a FormatError."""
    from safetensors import safe_open
    fix = "the file is truncated or corrupt; download or export it again"
    out = {}
    try:
        with safe_open(str(weights), framework="numpy") as f:
            for key in f.keys():
                name = key[len("transformer."):] if key.startswith("transformer.") else key
                if _IGNORED.match(name):
                    continue
                dtype = f.get_slice(key).get_dtype()
                if dtype not in _READ_DTYPES:
                    raise FormatError(f"{weights}: tensor {key} has dtype {dtype}; llmc reads "
                                      f"{', '.join(_READ_DTYPES)} weights only")
                out[name] = np.asarray(f.get_tensor(key)).astype(np.float32)
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, a bad header: all one answer
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{weights}: not a readable safetensors file ({msg}); {fix}") from e
    return out


def _to_flat(t: dict, mc: ModelConfig, weights: Path) -> np.ndarray:
    """HF tensors (prefix removed, float32) -> the llmc flat buffer; checks names and shapes."""
    V, L = mc.vocab_size, mc.n_layer
    flat = np.zeros(num_params(mc), dtype=np.float32)
    p = views(flat, mc)
    used = set()

    def take(name, shape, transpose=False):
        if name not in t:
            raise FormatError(f"{weights}: tensor {name} is missing; the file does not hold a "
                              f"complete GPT-2 with the shape in config.json")
        x = t[name]
        want = shape[::-1] if transpose else shape
        if x.shape != want:
            raise FormatError(f"{weights}: tensor {name} has shape {x.shape}, config.json "
                              f"implies {want}; the weights and config.json do not match")
        used.add(name)
        return x.T if transpose else x

    p["wte"][:V] = take(_TOP["wte"], (V, mc.n_embd))
    for key in ("wpe", "lnfw", "lnfb"):
        p[key][...] = take(_TOP[key], p[key].shape)
    for l in range(L):
        for key, (hf, transpose) in _LAYER.items():
            p[key][l] = take(f"h.{l}.{hf}", p[key].shape[1:], transpose)
    if "lm_head.weight" in t:
        used.add("lm_head.weight")
        if not np.array_equal(t["lm_head.weight"], p["wte"][:V]):
            raise FormatError(f"{weights}: lm_head.weight differs from wte (an untied LM head); "
                              "llmc's head is tied to wte, so this model cannot be read")
    extra = sorted(set(t) - used)
    if extra:
        raise FormatError(f"{weights}: unexpected tensor(s) {', '.join(extra[:3])}"
                          f"{' ...' if len(extra) > 3 else ''}; not a GPT2LMHeadModel with "
                          "the shape in config.json")
    return flat


# ----------------------------------------------------------------------------------------------
# writing

def write(directory, mc: ModelConfig, params: np.ndarray, dtype: str = "fp32") -> None:
    """Write config.json and model.safetensors into the existing `directory` (not atomic:
    llmc.formats.save_model gives it a temporary directory)."""
    from safetensors.numpy import save_file
    if mc.vocab_size != GPT2_VOCAB:
        raise FormatError(f"a Hugging Face GPT-2 has vocab_size {GPT2_VOCAB}, this model has "
                          f"{mc.vocab_size}; export it with --format llmc-bin instead")
    np_dtype = DTYPES[dtype][0]
    p = views(params, mc)
    hf = {"wte": p["wte"][:mc.vocab_size], "wpe": p["wpe"], "lnfw": p["lnfw"], "lnfb": p["lnfb"]}
    tensors = {f"transformer.{_TOP[k]}": v for k, v in hf.items()}
    for l in range(mc.n_layer):
        for key, (name, transpose) in _LAYER.items():
            x = p[key][l]
            tensors[f"transformer.h.{l}.{name}"] = x.T if transpose else x
    tensors = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()}
    directory = Path(directory)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config_to_json(mc, dtype), indent=2) + "\n")
