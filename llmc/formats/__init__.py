"""Model files in and out: Hugging Face GPT-2, llm.c .bin files and llmc checkpoints.

    from llmc.formats import load_model, save_model, ModelFile
    m = load_model("openai-community/gpt2")   # or a HF dir, a .safetensors, an llm.c .bin,
                                              # a ckpt_* directory, a training --out-dir
    m.config   # llmc.config.ModelConfig (block_size = the file's context)
    m.params   # float32 (N,), flat in the llmc.model.params layout (padded vocabulary rows zero)
    m.format   # "hf" | "llmc-bin" | "llmc-ckpt" ;  m.path: what was read
    save_model(m, "out/gpt2-hf", format="hf", dtype="bf16")       # or (config, params)

Modules, one format each: `hf` (config.json + model.safetensors, the transformers layout),
`llmc_bin` (llm.c's header + flat weights), `detect` (load_model: which format a path holds,
checkpoints, the hub). Every reader returns the same ModelFile; every failure is a FormatError
(a ValueError) whose message is one line naming the file, the problem and the fix.

Writing is atomic (llmc.training.durable.replaced_atomically): the file or directory is written under a
temporary name beside the target, fsynced, then renamed over it, so a failed export leaves no
partial output and an existing export is replaced only by a complete one.

CLI: python -m llmc.export MODEL --format hf|llmc-bin [--dtype fp32|bf16] --out PATH
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llmc.training.durable import replaced_atomically
from llmc.formats import hf, llmc_bin
from llmc.formats.detect import load_model
from llmc.formats.modelfile import FORMATS, FormatError, ModelFile
from llmc.model.params import num_params

__all__ = ["FORMATS", "FormatError", "ModelFile", "load_model", "save_model"]

WRITE_FORMATS = ("hf", "llmc-bin")
WRITE_DTYPES = ("fp32", "bf16")


def save_model(model, out_path, format: str = "hf", dtype: str = "fp32") -> Path:
    """Write a ModelFile or (ModelConfig, flat params) as `format` to `out_path`, atomically.

    hf: `out_path` is a directory (config.json + model.safetensors); an existing one is
    replaced only if it is empty or a model directory (holds config.json). llmc-bin: a file.
    Returns the path written.
    """
    if isinstance(model, ModelFile):
        mc, params = model.config, model.params
    else:
        mc, params = model
    params = np.asarray(params)
    if params.shape != (num_params(mc),) or not np.issubdtype(params.dtype, np.floating):
        raise ValueError(f"save_model: params must be a float (N,) = ({num_params(mc)},) buffer "
                         f"for {mc}, got {params.dtype} {params.shape}")
    params = params.astype(np.float32, copy=False)
    if format not in WRITE_FORMATS:
        raise ValueError(f"save_model: format must be one of {WRITE_FORMATS}, got {format!r}")
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"save_model: dtype must be one of {WRITE_DTYPES}, got {dtype!r}")
    out = Path(out_path).expanduser()
    if format == "hf":
        if out.exists() and not (out.is_dir() and (hf.is_hf_dir(out) or not any(out.iterdir()))):
            raise FormatError(f"{out}: exists and is not a model directory, so it is not "
                              "replaced; choose another --out or remove it")
        out.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(out, directory=True) as tmp:
            hf.write(tmp, mc, params, dtype)
    else:
        if out.is_dir():
            raise FormatError(f"{out}: is a directory; give a file name, e.g. {out / 'model.bin'}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(out) as tmp:
            llmc_bin.write(tmp, mc, params, dtype)
    return out
