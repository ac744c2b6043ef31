"""Token shards: the one on-disk format for tokenized text.

A shard is an Arrow IPC *file* (not a stream) holding one column `tokens` of uint16 in exactly one
record batch. One batch means the column is one contiguous buffer, so `open_shard` memory-maps
the file and hands out a NumPy view of that buffer: no copy, no read of pages never touched.
The schema carries the metadata (bytes keys and values):

    llmc.format = llmc-tokens   llmc.version = 1      llmc.tokenizer = gpt2
    llmc.vocab_size = 50257     llmc.num_tokens = N   llmc.split = train | val

`write_shard` is atomic: it writes `<path>.tmp-<pid>-<thread>` in the target's directory, fsyncs
it and renames it over the target, so a reader sees the old file, the new file, or no file, never
half a file, even if the writer dies mid-way. `open_shard` checks everything a trainer relies on
(magic, truncation, metadata, column, dtype, length, every id below the vocabulary) and raises
`ShardError` with "<path>: <problem>; <fix>".

Run the tests:  python -m pytest tests/test_shards.py -q
"""
from __future__ import annotations

import glob as globlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from llmc.training.durable import fsync_dir

FORMAT = "llmc-tokens"
VERSION = "1"
SPLITS = ("train", "val")
COLUMN = "tokens"
SUFFIX = ".arrow"
_MAGIC = b"ARROW1"
# Smallest possible Arrow IPC file: leading magic + padding, footer, footer length, trailing magic.
_MIN_SIZE = 8 + 4 + 6
_REWRITE = "rewrite it with llmc.data.shards.write_shard (or a data_tools CLI)"


class ShardError(ValueError):
    """A shard that cannot be written or read; the message is '<path>: <problem>; <fix>'."""

    def __init__(self, path, problem: str, fix: str = _REWRITE):
        super().__init__(f"{path}: {problem}; {fix}")
        self.path = path


@dataclass(frozen=True)
class Shard:
    """An opened shard: `tokens` is a read-only uint16 (N,) view of the memory-mapped file."""
    path: Path
    tokens: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def split(self) -> str:
        return self.meta["split"]


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _check_tokens(path: Path, tokens, vocab_size: int) -> np.ndarray:
    """Validate the ids to be written; return them as a contiguous uint16 (N,) array."""
    if not isinstance(tokens, np.ndarray):
        raise ShardError(path, f"tokens must be a NumPy array, got {type(tokens).__name__}",
                         "pass np.asarray(ids, dtype=np.uint16)")
    if tokens.ndim != 1:
        raise ShardError(path, f"tokens must be 1-D, got shape {tokens.shape}",
                         "flatten the documents into one sequence (tokens.reshape(-1))")
    if tokens.dtype.kind not in "iu":
        raise ShardError(path, f"tokens must have an integer dtype, got {tokens.dtype}",
                         "convert the ids to np.uint16")
    if tokens.size == 0:
        raise ShardError(path, "no tokens to write", "skip empty shards")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
        raise ShardError(path, f"token id {int(tokens[bad])} at index {bad} is outside "
                         f"[0, {vocab_size})", "tokenize with the shard's tokenizer and vocab_size")
    return np.ascontiguousarray(tokens, dtype=np.uint16)


def write_shard(path, tokens: np.ndarray, split: str, tokenizer: str = "gpt2",
                vocab_size: int = 50257) -> Path:
    """Atomically write `tokens` (N,) integer ids < vocab_size as a shard at `path`; return it."""
    path = Path(path).expanduser()
    if split not in SPLITS:
        raise ShardError(path, f"split must be one of {SPLITS}, got {split!r}",
                         "pass split='train' or split='val'")
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ShardError(path, f"tokenizer must be a non-empty name, got {tokenizer!r}",
                         "pass tokenizer='gpt2'")
    if not 1 <= int(vocab_size) <= 65536:
        raise ShardError(path, f"vocab_size {vocab_size} does not fit uint16 ids",
                         "shards hold vocabularies of at most 65536 tokens")
    if path.suffix != SUFFIX:
        raise ShardError(path, f"shard files must end in {SUFFIX}",
                         f"name it {path.with_suffix(SUFFIX).name}")
    if not path.parent.is_dir():
        raise ShardError(path, f"directory {path.parent} does not exist", "create it first")
    ids = _check_tokens(path, tokens, int(vocab_size))
    meta = {
        b"llmc.format": FORMAT.encode(), b"llmc.version": VERSION.encode(),
        b"llmc.tokenizer": tokenizer.encode(), b"llmc.vocab_size": str(int(vocab_size)).encode(),
        b"llmc.num_tokens": str(ids.shape[0]).encode(), b"llmc.split": split.encode(),
    }
    schema = pa.schema([pa.field(COLUMN, pa.uint16(), nullable=False)], metadata=meta)
    batch = pa.record_batch([pa.array(ids, type=pa.uint16())], schema=schema)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            with ipc.new_file(f, schema) as writer:
                writer.write_batch(batch)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def _check_file(path: Path) -> None:
    """Existence, size and both Arrow magics, before Arrow sees the file."""
    if not path.exists():
        raise ShardError(path, "file does not exist", "check the path (or run a data_tools CLI)")
    if not path.is_file():
        raise ShardError(path, "not a regular file", "pass a shard file, a directory or a glob")
    size = path.stat().st_size
    if size == 0:
        raise ShardError(path, "empty file (0 bytes)", _REWRITE)
    with open(path, "rb") as f:
        head = f.read(len(_MAGIC))
        if head != _MAGIC:
            raise ShardError(path, f"not an Arrow IPC file (wrong magic {head!r}, expected "
                             f"{_MAGIC!r})", _REWRITE)
        f.seek(max(0, size - len(_MAGIC)))
        tail = f.read(len(_MAGIC))
    if size < _MIN_SIZE or tail != _MAGIC:
        raise ShardError(path, f"truncated file ({size} bytes, no Arrow footer)",
                         "the copy or the writer was interrupted; " + _REWRITE)


def _parse_meta(path: Path, schema: pa.Schema, tokenizer: str, vocab_size: int) -> dict:
    """Schema metadata -> {"format", "version", "tokenizer", "vocab_size", "num_tokens", "split"}."""
    raw = schema.metadata or {}
    meta = {}
    for key in ("format", "version", "tokenizer", "vocab_size", "num_tokens", "split"):
        value = raw.get(f"llmc.{key}".encode())
        if value is None:
            raise ShardError(path, f"metadata key llmc.{key} is missing (not an llmc shard)",
                             _REWRITE)
        meta[key] = value.decode("utf-8", errors="replace")
    if meta["format"] != FORMAT:
        raise ShardError(path, f"llmc.format is {meta['format']!r}, expected {FORMAT!r}", _REWRITE)
    if meta["version"] != VERSION:
        raise ShardError(path, f"llmc.version is {meta['version']!r}, this llmc reads version "
                         f"{VERSION}", "rewrite the shard with this llmc or upgrade llmc")
    if meta["tokenizer"] != tokenizer:
        raise ShardError(path, f"tokenized with {meta['tokenizer']!r}, expected {tokenizer!r}",
                         f"re-tokenize the text with the {tokenizer} tokenizer")
    for key in ("vocab_size", "num_tokens"):
        try:
            meta[key] = int(meta[key])
        except ValueError:
            raise ShardError(path, f"llmc.{key} is {meta[key]!r}, not an integer",
                             _REWRITE) from None
    if meta["vocab_size"] != vocab_size:
        raise ShardError(path, f"llmc.vocab_size is {meta['vocab_size']}, expected {vocab_size}",
                         f"re-tokenize with the {tokenizer} tokenizer ({vocab_size} tokens)")
    if meta["split"] not in SPLITS:
        raise ShardError(path, f"llmc.split is {meta['split']!r}, expected one of {SPLITS}",
                         _REWRITE)
    return meta


def _open_reader(path: Path):
    """(memory map, ipc reader) of a file whose magics are already checked."""
    source = pa.memory_map(str(path), "r")
    try:
        return source, ipc.open_file(source)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        source.close()
        raise ShardError(path, f"corrupt Arrow file ({e})", _REWRITE) from None


def read_meta(path, tokenizer: str = "gpt2", vocab_size: int = 50257) -> dict:
    """The validated metadata of a shard, reading only its footer (cheap)."""
    path = Path(path).expanduser()
    _check_file(path)
    source, reader = _open_reader(path)
    try:
        return _parse_meta(path, reader.schema, tokenizer, vocab_size)
    finally:
        source.close()


def open_shard(path, tokenizer: str = "gpt2", vocab_size: int = 50257) -> Shard:
    """Memory-map and validate a shard; `Shard.tokens` is a zero-copy uint16 (N,) view."""
    path = Path(path).expanduser()
    _check_file(path)
    source, reader = _open_reader(path)
    meta = _parse_meta(path, reader.schema, tokenizer, vocab_size)
    schema = reader.schema
    if schema.names != [COLUMN]:
        raise ShardError(path, f"columns are {schema.names}, expected exactly [{COLUMN!r}]",
                         _REWRITE)
    if schema.field(0).type != pa.uint16():
        raise ShardError(path, f"column {COLUMN!r} has type {schema.field(0).type}, expected "
                         "uint16", _REWRITE)
    if reader.num_record_batches != 1:
        raise ShardError(path, f"{reader.num_record_batches} record batches, expected exactly 1 "
                         "(needed for zero-copy reads)", _REWRITE)
    try:
        column = reader.get_batch(0).column(0)
        if column.null_count:
            raise ShardError(path, f"{column.null_count} null tokens", _REWRITE)
        tokens = column.to_numpy(zero_copy_only=True)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise ShardError(path, f"corrupt record batch ({e})", _REWRITE) from None
    if tokens.shape[0] != meta["num_tokens"]:
        raise ShardError(path, f"holds {tokens.shape[0]} tokens but llmc.num_tokens says "
                         f"{meta['num_tokens']}", _REWRITE)
    if tokens.shape[0] == 0:
        raise ShardError(path, "holds no tokens", "delete it or write a non-empty shard")
    top = int(tokens.max())
    if top >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ShardError(path, f"token id {top} is >= the vocab size {vocab_size} (first bad id "
                         f"{int(tokens[bad])} at index {bad})",
                         f"re-tokenize with the {tokenizer} tokenizer")
    return Shard(path=path, tokens=tokens, meta=meta)


def find_shards(spec, split: str | None = None) -> list:
    """A file, a directory (its *.arrow, sorted) or a glob -> shard paths, filtered by split."""
    if split is not None and split not in SPLITS:
        raise ShardError(spec, f"split must be one of {SPLITS} or None, got {split!r}",
                         "pass split='train', split='val' or no split")
    text = os.path.expanduser(str(spec))
    path = Path(text)
    if path.is_file():
        paths = [path]
    elif path.is_dir():
        paths = sorted(p for p in path.glob("*" + SUFFIX) if p.is_file())
        where = f"no *{SUFFIX} files in directory {path}"
    elif globlib.has_magic(text):
        paths = sorted(Path(p) for p in globlib.glob(text) if Path(p).is_file())
        where = "the glob matches no files"
    else:
        raise ShardError(spec, "no such file or directory",
                         "pass a shard file, a directory of *.arrow shards or a glob")
    if not paths:
        raise ShardError(spec, where, "check the path, or prepare data with a data_tools CLI")
    if split is not None:
        kept = [p for p in paths if read_meta(p)["split"] == split]
        if not kept:
            raise ShardError(spec, f"none of the {len(paths)} shard(s) has split {split!r}",
                             f"point at {split} shards or write them with split={split!r}")
        paths = kept
    return paths
