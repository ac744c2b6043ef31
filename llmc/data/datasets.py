"""The bundled default dataset: tiny-shakespeare, tokenized into shards on first use.

`llmc/assets/tinyshakespeare.txt.gz` (Karpathy's 1.1 MB tiny-shakespeare) ships in the package,
so `python -m llmc.train` with no flags trains on real text without a network. The first call of
`tinyshakespeare()` tokenizes it exactly as llm.c's `dev/data/tinyshakespeare.py` does: split the
text on blank lines ("\\n\\n"), put `<|endoftext|>` (50256) before every section, give every
section but the last its "\\n\\n" back, encode with the GPT-2 tokenizer. The first 32,768 tokens are
the validation split, the rest (305,260) train: 338,028 in all.

Shards go to `<cache>/tinyshakespeare-<hash of the asset>/{train,val}.arrow`, where `<cache>` is
the `cache_dir` argument, else `$LLMC_CACHE_DIR`, else `~/.cache/llmc`. Later calls reuse shards
that open cleanly with the right split and size, and rebuild any that do not. Writes are atomic
(`write_shard`), so processes racing on a cold cache (one per GPU) each write identical bytes and
every reader sees a whole file.

Run the tests:  python -m pytest tests/test_datasets.py -q
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from llmc import assets

from llmc.data import tokenizer
from llmc.data.shards import ShardError, open_shard, write_shard

VAL_TOKENS = 32_768  # llm.c's tiny-shakespeare validation split: the first 32,768 tokens
ASSET = "tinyshakespeare.txt.gz"


def default_cache_dir(cache_dir=None) -> Path:
    """`cache_dir`, else $LLMC_CACHE_DIR, else ~/.cache/llmc (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LLMC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmc"


def _asset_bytes() -> bytes:
    return assets.path(ASSET).read_bytes()


def tokenize_sections(text: str) -> np.ndarray:
    """Text -> uint16 (N,) ids: each "\\n\\n"-separated section after an <|endoftext|>."""
    sections = text.split("\n\n")
    ids = []
    for i, section in enumerate(sections):
        ids.append(tokenizer.EOT)
        ids.extend(tokenizer.encode(section + "\n\n" if i != len(sections) - 1 else section))
    return np.asarray(ids, dtype=np.uint16)


def _usable(path: Path, split: str, num_tokens: int | None, first: int | None) -> bool:
    """True when `path` is a valid shard of `split` (with `num_tokens` ids and first id `first`)."""
    try:
        shard = open_shard(path)
    except ShardError:
        return False
    if shard.split != split or (first is not None and int(shard.tokens[0]) != first):
        return False
    return num_tokens is None or len(shard) == num_tokens


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{directory}: cannot create the dataset cache ({e.strerror}); set "
                      "LLMC_CACHE_DIR or pass cache_dir= to a writable directory") from e
    if not os.access(directory, os.W_OK):
        raise OSError(f"{directory}: the dataset cache is not writable; set LLMC_CACHE_DIR or "
                      "pass cache_dir= to a writable directory")


def tinyshakespeare(cache_dir=None) -> tuple:
    """(train_path, val_path) of the tokenized bundled tiny-shakespeare, built on first use."""
    raw = _asset_bytes()
    directory = default_cache_dir(cache_dir) / f"tinyshakespeare-{hashlib.sha256(raw).hexdigest()[:12]}"
    train_path, val_path = directory / "train.arrow", directory / "val.arrow"
    if (_usable(val_path, "val", VAL_TOKENS, tokenizer.EOT)
            and _usable(train_path, "train", None, None)):
        return train_path, val_path
    _make_dir(directory)
    ids = tokenize_sections(gzip.decompress(raw).decode("utf-8"))
    if ids.shape[0] <= VAL_TOKENS:
        raise ShardError(directory, f"the asset gave only {ids.shape[0]} tokens, not more than "
                         f"the {VAL_TOKENS} validation tokens", "reinstall llmc (damaged asset)")
    write_shard(val_path, ids[:VAL_TOKENS], split="val")
    write_shard(train_path, ids[VAL_TOKENS:], split="train")
    return train_path, val_path
