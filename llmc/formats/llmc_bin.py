"""llm.c model files (`gpt2_124M.bin`, `model_00005000.bin`), read and written.

Layout, as llm.c's train_gpt2.cu reads and writes it (little-endian):
    header  int32[256]: [0] magic 20240326, [1] version (3: fp32 weights, 5: bf16 weights),
            [2] max_seq_len (maxT), [3] vocab_size (V), [4] num_layers (L), [5] num_heads (NH),
            [6] channels (C), [7] padded_vocab_size (Vp); the rest zero
    weights the parameters in llm.c's order, which is exactly the llmc.model.params flat layout
            (wte (Vp, C) with its padded rows, wpe, then the per-layer tensors stacked over L)
So reading is a header check and one contiguous read; bf16 weights are widened to fp32 exactly
and written back rounded to nearest even (ml_dtypes).
"""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

from llmc.config import ConfigError, ModelConfig
from llmc.formats.modelfile import FormatError
from llmc.model.params import num_params

MAGIC = 20240326
HEADER_INTS = 256
VERSIONS = {3: np.dtype("<f4"), 5: np.dtype(ml_dtypes.bfloat16)}  # version -> weight dtype
VERSION_OF = {"fp32": 3, "bf16": 5}


def has_magic(path: Path) -> bool:
    """True when the file starts with llm.c's model magic number."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int(np.frombuffer(head, "<i4")[0]) == MAGIC


def read_header(path: Path) -> tuple:
    """(ModelConfig, version) from the header; FormatError for a wrong magic/version/size."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_INTS * 4)
    if len(raw) < HEADER_INTS * 4:
        raise FormatError(f"{path}: {len(raw)} bytes, shorter than llm.c's 1024-byte header; "
                          "the file is truncated or not an llm.c model file")
    h = np.frombuffer(raw, "<i4")
    if h[0] != MAGIC:
        raise FormatError(f"{path}: magic number {h[0]} is not llm.c's {MAGIC}; this is not an "
                          "llm.c model file (gpt2_124M.bin, model_<step>.bin)")
    version = int(h[1])
    if version not in VERSIONS:
        raise FormatError(f"{path}: llm.c model file version {version}; llmc reads versions 3 "
                          "(fp32) and 5 (bf16); re-export it from llm.c")
    maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
    try:
        mc = ModelConfig(n_layer=L, n_head=NH, n_embd=C, vocab_size=V, padded_vocab_size=Vp,
                         block_size=maxT)
        if V < 1 or maxT < 1:
            raise ConfigError(f"vocab_size={V}, max_seq_len={maxT}")
    except ConfigError as e:
        raise FormatError(f"{path}: header sizes are inconsistent (max_seq_len={maxT}, "
                          f"vocab_size={V}, num_layers={L}, num_heads={NH}, channels={C}, "
                          f"padded_vocab_size={Vp}: {str(e).split(';')[0]}); the file is corrupt") from e
    return mc, version


def read(path) -> tuple:
    """An llm.c .bin model file -> (ModelConfig, float32 (N,) flat)."""
    path = Path(path)
    mc, version = read_header(path)
    dtype = VERSIONS[version]
    n = num_params(mc)
    want = HEADER_INTS * 4 + n * dtype.itemsize
    size = path.stat().st_size
    if size != want:
        problem = "truncated" if size < want else "longer than its header says"
        raise FormatError(f"{path}: {size:,} bytes, but its header (L={mc.n_layer}, C={mc.n_embd}, "
                          f"Vp={mc.padded_vocab_size}, maxT={mc.block_size}, version {version}) "
                          f"needs {want:,}: the file is {problem}; copy or export it again")
    with open(path, "rb") as f:
        f.seek(HEADER_INTS * 4)
        flat = np.fromfile(f, dtype=dtype, count=n)
    if flat.size != n:
        raise FormatError(f"{path}: short read ({flat.size} of {n} weights); the file is truncated")
    return mc, flat.astype(np.float32)


def write(path, mc: ModelConfig, params: np.ndarray, dtype: str = "fp32") -> None:
    """Write an llm.c model file to `path` (not atomic: save_model gives it a temporary name)."""
    version = VERSION_OF[dtype]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = (MAGIC, version, mc.block_size, mc.vocab_size, mc.n_layer, mc.n_head,
                  mc.n_embd, mc.padded_vocab_size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        np.ascontiguousarray(params.astype(VERSIONS[version])).tofile(f)
