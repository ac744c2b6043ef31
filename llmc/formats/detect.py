"""`load_model`: read a model from whatever is pointed at, deciding the format from what is there.

Accepted, tried in this order:
    a directory with state.json + model.npy      an llmc checkpoint (ckpt_*/, llmc.training.checkpoint)
    a directory holding ckpt_* checkpoints       a training out_dir: the newest complete one
                                                 (a note on stderr names it; the config.json
                                                 there is the run's, not a model's)
    a directory with config.json                 a Hugging Face GPT-2 (llmc.formats.hf)
    a *.safetensors / config.json file           its Hugging Face directory
    state.json / model.npy                       its checkpoint directory
    a file starting with llm.c's magic, or *.bin an llm.c model file (llmc.formats.llmc_bin)
    a path that does not exist, shaped like      a Hugging Face hub id, fetched with
      "owner/name" or "name"                     huggingface_hub.snapshot_download (config.json
                                                 and model.safetensors only; cached by the hub)
Every failure is a FormatError whose message is one line: the path, the problem, the fix.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from llmc.training import checkpoint
from llmc.config import ConfigError, ModelConfig
from llmc.formats import hf, llmc_bin
from llmc.formats.modelfile import FormatError, ModelFile
from llmc.model.params import num_params

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_ACCEPTED = ("a Hugging Face GPT-2 directory (config.json + model.safetensors), an llm.c .bin "
             "model file, an llmc checkpoint directory (ckpt_*), a training --out-dir, or a "
             "Hugging Face hub id such as openai-community/gpt2")


def load_model(path_or_id) -> ModelFile:
    """Read a model from a path or hub id (see the module docstring) into a ModelFile."""
    spec = str(path_or_id)
    path = Path(spec).expanduser()
    if not path.exists():
        return _from_hub(spec)
    if path.is_dir():
        if (path / "state.json").is_file() and (path / "model.npy").is_file():
            return read_checkpoint(path)
        ckpts = [c for c in checkpoint.list_checkpoints(path) if (c / "model.npy").is_file()]
        if ckpts and not (path / hf.WEIGHTS).is_file():  # its config.json is the run's
            print(f"note: {path} is a training directory; reading its newest complete "
                  f"checkpoint, {ckpts[-1].name}", file=sys.stderr)
            return read_checkpoint(ckpts[-1])
        if (path / "metrics.jsonl").is_file() and not (path / hf.WEIGHTS).is_file():
            raise FormatError(f"{path}: a training directory with no complete checkpoint "
                              "(ckpt_*/ with state.json and model.npy); train until one is "
                              "saved, or give another model")
        if hf.is_hf_dir(path):
            return ModelFile(*hf.read(path), "hf", path)
        raise FormatError(f"{path}: no model here (no config.json, no state.json + model.npy, "
                          f"no complete ckpt_* inside); give {_ACCEPTED}")
    if path.suffix == ".safetensors" or path.name == hf.CONFIG:
        return ModelFile(*hf.read(path if path.suffix == ".safetensors" else path.parent),
                         "hf", path.parent)
    if path.name in ("state.json", "model.npy"):
        return read_checkpoint(path.parent)
    if path.name == "pytorch_model.bin":
        raise FormatError(f"{path}: PyTorch pickle weights are not read (only safetensors); "
                          "convert with transformers: GPT2LMHeadModel.from_pretrained(dir)"
                          ".save_pretrained(new_dir)")
    if path.suffix == ".bin" or llmc_bin.has_magic(path):
        return ModelFile(*llmc_bin.read(path), "llmc-bin", path)
    raise FormatError(f"{path}: not a model file llmc knows; give {_ACCEPTED}")


def read_checkpoint(directory: Path) -> ModelFile:
    """The weights of an llmc checkpoint directory (state.json's "model" gives the shape)."""
    directory = Path(directory)
    state_path = directory / "state.json"
    try:
        state = json.loads(state_path.read_text())
        L, NH, C, Vp, maxT = (int(x) for x in state["model"])
        mc = ModelConfig(n_layer=L, n_head=NH, n_embd=C, padded_vocab_size=Vp, block_size=maxT)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
            ConfigError) as e:
        raise FormatError(f"{state_path}: no usable model shape ({type(e).__name__}: {e}); "
                          "use another ckpt_* directory") from e
    try:
        params = np.load(directory / "model.npy")
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{directory / 'model.npy'}: unreadable ({msg}); use another ckpt_* "
                          "directory") from e
    if params.dtype != np.float32 or params.shape != (num_params(mc),):
        raise FormatError(f"{directory / 'model.npy'}: {params.dtype} {params.shape}, but "
                          f"state.json's model {state['model']} needs float32 ({num_params(mc)},); "
                          "the checkpoint is damaged, use another")
    return ModelFile(mc, params, "llmc-ckpt", directory)


def _from_hub(spec: str) -> ModelFile:
    """Fetch config.json + model.safetensors of hub id `spec` (or say why it cannot)."""
    if not _HUB_ID.match(spec) or spec.endswith((".bin", ".safetensors", ".npy", ".json")):
        raise FormatError(f"{spec}: no such file or directory; give {_ACCEPTED}")
    fix = "or download the model directory elsewhere and pass its path"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FormatError(f"{spec}: not a local path, and fetching it as a Hugging Face hub id "
                          "needs huggingface_hub: pip install 'llmc[data]' (or pip install "
                          f"huggingface_hub), {fix}") from e
    try:
        local = snapshot_download(repo_id=spec, allow_patterns=[hf.CONFIG, hf.WEIGHTS])
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated repo: one answer
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{spec}: not a local path, and fetching it from the Hugging Face hub "
                          f"failed ({type(e).__name__}: {msg}); check the id and the network, "
                          f"{fix}") from e
    return ModelFile(*hf.read(Path(local)), "hf", Path(local))
