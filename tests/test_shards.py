"""Token shards (llmc/data/shards.py): round trip, zero-copy reads, atomic writes, and a clear
ShardError ("<path>: <problem>; <fix>") for every kind of bad file.

Bad files are forged with pyarrow directly (wrong metadata, column, dtype, counts) or by
cutting/overwriting bytes of a good shard.

Run:  python -m pytest tests/test_shards.py -q
"""
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from llmc.data import shards
from llmc.data.shards import ShardError, find_shards, open_shard, read_meta, write_shard

GOOD_META = {"llmc.format": "llmc-tokens", "llmc.version": "1", "llmc.tokenizer": "gpt2",
             "llmc.vocab_size": "50257", "llmc.split": "train"}


def forge(path, arrays, names=("tokens",), meta=GOOD_META, num_tokens="auto", batches=1):
    """Write an Arrow IPC file by hand, bypassing write_shard's checks."""
    meta = dict(meta)
    if num_tokens == "auto":
        num_tokens = str(len(arrays[0]) * batches)
    if num_tokens is not None:
        meta["llmc.num_tokens"] = num_tokens
    batch = pa.record_batch([pa.array(a) for a in arrays], names=list(names))
    schema = batch.schema.with_metadata({k.encode(): v.encode() for k, v in meta.items()})
    with ipc.new_file(str(path), schema) as w:
        for _ in range(batches):
            w.write_batch(batch.replace_schema_metadata(schema.metadata))
    return path


def no_tmp_files(directory):
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name] == []


def test_round_trip_and_metadata(tmp_path):
    """Written ids come back equal, as read-only uint16, with the metadata of DESIGN.md."""
    ids = np.random.default_rng(0).integers(0, 50257, size=10_001)
    path = write_shard(tmp_path / "a.arrow", ids, split="val")
    shard = open_shard(path)
    assert shard.tokens.dtype == np.uint16 and shard.tokens.shape == (10_001,)
    np.testing.assert_array_equal(shard.tokens, ids)
    assert shard.meta == {"format": "llmc-tokens", "version": "1", "tokenizer": "gpt2",
                          "vocab_size": 50257, "num_tokens": 10_001, "split": "val"}
    assert shard.split == "val" and len(shard) == 10_001 and shard.path == path
    assert not shard.tokens.flags.writeable
    assert read_meta(path) == shard.meta
    raw = ipc.open_file(str(path)).schema.metadata
    assert raw[b"llmc.num_tokens"] == b"10001" and raw[b"llmc.split"] == b"val"


def test_open_is_zero_copy_memory_map(tmp_path):
    """The array is a view of the mapped file: bytes changed on disk show through it."""
    path = write_shard(tmp_path / "a.arrow", np.full(4096, 7, dtype=np.uint16), split="train")
    shard = open_shard(path)
    assert not shard.tokens.flags.owndata
    raw = path.read_bytes()
    offset = raw.index(np.full(64, 7, dtype=np.uint16).tobytes())  # start of the column buffer
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, np.array([1234], dtype=np.uint16).tobytes(), offset)
    finally:
        os.close(fd)
    assert shard.tokens[0] == 1234  # a copy would still read 7


def test_write_accepts_wider_integer_ids_and_custom_vocab(tmp_path):
    """int64 ids are range-checked and stored as uint16; a smaller vocab is recorded and enforced."""
    path = write_shard(tmp_path / "a.arrow", np.arange(100, dtype=np.int64), "train",
                       tokenizer="toy", vocab_size=100)
    shard = open_shard(path, tokenizer="toy", vocab_size=100)
    assert shard.meta["vocab_size"] == 100 and shard.tokens[-1] == 99
    with pytest.raises(ShardError, match="tokenized with 'toy', expected 'gpt2'"):
        open_shard(path)


@pytest.mark.parametrize("tokens, match", [
    (np.array([1, 2, 50257]), r"token id 50257 at index 2 is outside \[0, 50257\)"),
    (np.array([-1, 2]), r"token id -1 at index 0 is outside"),
    (np.array([1.0, 2.0]), "integer dtype, got float64"),
    (np.zeros((2, 3), dtype=np.uint16), r"1-D, got shape \(2, 3\)"),
    (np.array([], dtype=np.uint16), "no tokens to write"),
    ([1, 2, 3], "must be a NumPy array, got list"),
])
def test_write_rejects_bad_tokens(tmp_path, tokens, match):
    """Bad ids, dtypes and shapes are refused before anything touches the disk."""
    with pytest.raises(ShardError, match=match):
        write_shard(tmp_path / "a.arrow", tokens, "train")
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_bad_arguments(tmp_path):
    """Split, suffix and directory are checked with a fix in the message."""
    ids = np.arange(10, dtype=np.uint16)
    with pytest.raises(ShardError, match="split must be one of"):
        write_shard(tmp_path / "a.arrow", ids, "test")
    with pytest.raises(ShardError, match="must end in .arrow; name it a.arrow"):
        write_shard(tmp_path / "a.bin", ids, "train")
    with pytest.raises(ShardError, match="does not exist; create it first"):
        write_shard(tmp_path / "missing" / "a.arrow", ids, "train")
    with pytest.raises(ShardError, match="does not fit uint16"):
        write_shard(tmp_path / "a.arrow", ids, "train", vocab_size=70000)


def test_atomic_write_leaves_no_temp_and_keeps_old_file_when_writer_fails(tmp_path, monkeypatch):
    """A writer that dies before the rename leaves the previous shard intact and no temp file."""
    path = write_shard(tmp_path / "a.arrow", np.arange(50, dtype=np.uint16), "train")
    assert no_tmp_files(tmp_path)
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(shards.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        write_shard(path, np.arange(5000, dtype=np.uint16), "train")
    with pytest.raises(OSError, match="simulated"):
        write_shard(tmp_path / "new.arrow", np.arange(5000, dtype=np.uint16), "train")
    assert path.read_bytes() == before
    assert not (tmp_path / "new.arrow").exists()
    assert no_tmp_files(tmp_path)
    np.testing.assert_array_equal(open_shard(path).tokens, np.arange(50))


def test_atomic_write_when_batch_write_raises(tmp_path, monkeypatch):
    """An exception inside the Arrow writer (mid-file) never leaves a half file at the target."""
    class Boom(Exception):
        pass

    def boom(self, batch):
        raise Boom("writer crashed")
    monkeypatch.setattr(ipc.RecordBatchFileWriter, "write_batch", boom)
    with pytest.raises(Boom):
        write_shard(tmp_path / "a.arrow", np.arange(50, dtype=np.uint16), "train")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_content(tmp_path):
    """Writing the same path twice leaves the second content."""
    path = write_shard(tmp_path / "a.arrow", np.arange(50, dtype=np.uint16), "train")
    write_shard(path, np.arange(7, dtype=np.uint16), "val")
    shard = open_shard(path)
    assert len(shard) == 7 and shard.split == "val" and no_tmp_files(tmp_path)


def _good(tmp_path, n=1000):
    return write_shard(tmp_path / "good.arrow", np.arange(n, dtype=np.uint16) % 50257, "train")


def test_not_arrow_and_missing_and_empty(tmp_path):
    """Plain text, a missing path, a directory and a 0-byte file each get their own message."""
    text = tmp_path / "t.arrow"
    text.write_text("hello world, not arrow at all")
    with pytest.raises(ShardError, match=r"t.arrow: not an Arrow IPC file \(wrong magic"):
        open_shard(text)
    with pytest.raises(ShardError, match="file does not exist"):
        open_shard(tmp_path / "nope.arrow")
    with pytest.raises(ShardError, match="not a regular file"):
        open_shard(tmp_path)
    empty = tmp_path / "e.arrow"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match=r"empty file \(0 bytes\)"):
        open_shard(empty)


@pytest.mark.parametrize("keep", [0.5, 0.99, 8])
def test_truncated(tmp_path, keep):
    """A cut-off copy is reported as truncated, whatever the cut point."""
    path = _good(tmp_path)
    raw = path.read_bytes()
    cut = int(len(raw) * keep) if keep < 1 else keep
    path.write_bytes(raw[:cut])
    with pytest.raises(ShardError, match=r"good.arrow: truncated file .*interrupted"):
        open_shard(path)


def test_corrupt_footer(tmp_path):
    """Both magics intact but garbage in between: a corrupt-file error, not an Arrow traceback."""
    path = _good(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-10:-6] = b"\xff\xff\xff\x7f"  # footer length points far outside the file
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="corrupt Arrow file"):
        open_shard(path)


@pytest.mark.parametrize("key, value, match", [
    ("llmc.format", None, "metadata key llmc.format is missing"),
    ("llmc.format", "other", "llmc.format is 'other', expected 'llmc-tokens'"),
    ("llmc.version", "2", "llmc.version is '2', this llmc reads version 1"),
    ("llmc.tokenizer", None, "metadata key llmc.tokenizer is missing"),
    ("llmc.tokenizer", "llama", "tokenized with 'llama', expected 'gpt2'"),
    ("llmc.vocab_size", "32000", "llmc.vocab_size is 32000, expected 50257"),
    ("llmc.vocab_size", "big", "llmc.vocab_size is 'big', not an integer"),
    ("llmc.split", "test", "llmc.split is 'test', expected one of"),
    ("llmc.split", None, "metadata key llmc.split is missing"),
])
def test_bad_metadata(tmp_path, key, value, match):
    """Every metadata key is required and checked."""
    meta = dict(GOOD_META)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    path = forge(tmp_path / "m.arrow", [np.arange(10, dtype=np.uint16)], meta=meta)
    with pytest.raises(ShardError, match=match):
        open_shard(path)
    with pytest.raises(ShardError, match=match):
        read_meta(path)


def test_no_metadata_at_all(tmp_path):
    """A plain Arrow file of uint16 is not taken for a shard."""
    path = forge(tmp_path / "m.arrow", [np.arange(10, dtype=np.uint16)], meta={}, num_tokens=None)
    with pytest.raises(ShardError, match="llmc.format is missing .not an llmc shard."):
        open_shard(path)


def test_wrong_column_dtype_count_batches(tmp_path):
    """Column name, column type, count mismatch, several batches, empty, out-of-vocab ids."""
    ids = np.arange(10, dtype=np.uint16)
    cases = [
        (forge(tmp_path / "a.arrow", [ids], names=("ids",)), r"columns are \['ids'\]"),
        (forge(tmp_path / "b.arrow", [ids, ids], names=("tokens", "x")), "columns are"),
        (forge(tmp_path / "c.arrow", [ids.astype(np.int32)]), "has type int32, expected uint16"),
        (forge(tmp_path / "d.arrow", [ids], num_tokens="11"),
         "holds 10 tokens but llmc.num_tokens says 11"),
        (forge(tmp_path / "e.arrow", [ids], batches=2), "2 record batches, expected exactly 1"),
        (forge(tmp_path / "f.arrow", [np.array([], dtype=np.uint16)]), "holds no tokens"),
        (forge(tmp_path / "g.arrow", [np.array([5, 60000, 50257], dtype=np.uint16)]),
         r"token id 60000 is >= the vocab size 50257 \(first bad id 60000 at index 1\)"),
    ]
    for path, match in cases:
        with pytest.raises(ShardError, match=match) as info:
            open_shard(path)
        assert str(info.value).startswith(str(path) + ": ")
        assert isinstance(info.value, ValueError)


def test_find_shards(tmp_path):
    """File, directory (sorted *.arrow, temp files ignored), glob, split filter, and errors."""
    ids = np.arange(10, dtype=np.uint16)
    for name, split in [("b_train.arrow", "train"), ("a_train.arrow", "train"),
                        ("c_val.arrow", "val")]:
        write_shard(tmp_path / name, ids, split)
    (tmp_path / "d.arrow.tmp-1-2").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    names = lambda ps: [p.name for p in ps]  # noqa: E731
    assert names(find_shards(tmp_path)) == ["a_train.arrow", "b_train.arrow", "c_val.arrow"]
    assert names(find_shards(str(tmp_path), split="train")) == ["a_train.arrow", "b_train.arrow"]
    assert names(find_shards(tmp_path / "c_val.arrow")) == ["c_val.arrow"]
    assert names(find_shards(str(tmp_path / "*_train.arrow"))) == ["a_train.arrow", "b_train.arrow"]
    assert names(find_shards(str(tmp_path / "*.arrow"), split="val")) == ["c_val.arrow"]
    with pytest.raises(ShardError, match=r"_train.arrow: none of the 1 shard\(s\) has split 'val'"):
        find_shards(tmp_path / "a_train.arrow", split="val")
    with pytest.raises(ShardError, match=r"zzz\*.arrow: the glob matches no files"):
        find_shards(str(tmp_path / "zzz*.arrow"))
    with pytest.raises(ShardError, match="missing: no such file or directory"):
        find_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"no \*.arrow files in directory"):
        find_shards(tmp_path / "empty")
    with pytest.raises(ShardError, match="split must be one of"):
        find_shards(tmp_path, split="test")
