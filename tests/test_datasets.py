"""The bundled tiny-shakespeare (llmc/data/datasets.py): token counts as llm.c (32,768 val + 305,260
train = 338,028), the <|endoftext|> layout, decoding back to the text, reuse of a warm cache,
rebuilding of a damaged one, and a race of writers on a cold cache. Uses a tmp cache dir only.

Run:  python -m pytest tests/test_datasets.py -q
"""
import gzip
import threading

import numpy as np
import pytest

from llmc import assets

from llmc.data import datasets

from llmc.data import tokenizer
from llmc.data.shards import open_shard


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, datasets.tinyshakespeare(cache_dir=cache)


def asset_text():
    return gzip.decompress(assets.path("tinyshakespeare.txt.gz").read_bytes()).decode("utf-8")


def test_counts_and_splits(built):
    """32,768 validation tokens then 305,260 train tokens, both starting with <|endoftext|>."""
    cache, (train_path, val_path) = built
    assert train_path.parent.parent == cache and train_path.parent == val_path.parent
    val, train = open_shard(val_path), open_shard(train_path)
    assert (len(val), len(train)) == (32_768, 305_260)
    assert len(val) + len(train) == 338_028
    assert (val.split, train.split) == ("val", "train")
    assert val.tokens[0] == 50256
    full = np.concatenate([val.tokens, train.tokens])
    assert int(full.max()) < 50257
    assert train.tokens[0] == full[32_768]


def test_sections_decode_back_to_text(built):
    """The tokens between two <|endoftext|> decode to one blank-line section of the text."""
    _, (train_path, val_path) = built
    text = asset_text()
    sections = text.split("\n\n")
    full = np.concatenate([open_shard(val_path).tokens, open_shard(train_path).tokens])
    eot = np.flatnonzero(full == tokenizer.EOT)
    assert len(eot) == len(sections)
    assert tokenizer.decode(full[eot[0] + 1:eot[1]]) == sections[0] + "\n\n"
    assert tokenizer.decode(full[eot[-1] + 1:]) == sections[-1]
    joined = tokenizer.decode(full[full != tokenizer.EOT])
    assert joined == text


def test_reuses_valid_cache(built):
    """A second call returns the same paths and rewrites nothing."""
    cache, paths = built
    stats = [p.stat() for p in paths]
    assert datasets.tinyshakespeare(cache_dir=cache) == paths
    assert [(s.st_ino, s.st_mtime_ns) for s in stats] == \
           [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]


def test_env_var_picks_cache(tmp_path, monkeypatch):
    """$LLMC_CACHE_DIR is used when no cache_dir is passed, and damaged shards are rebuilt."""
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "envcache"))
    train_path, val_path = datasets.tinyshakespeare()
    assert str(train_path).startswith(str(tmp_path / "envcache"))
    raw = val_path.read_bytes()
    val_path.write_bytes(raw[: len(raw) // 2])  # a truncated copy
    train_path.unlink()
    assert datasets.tinyshakespeare() == (train_path, val_path)
    assert (len(open_shard(val_path)), len(open_shard(train_path))) == (32_768, 305_260)
    assert sorted(p.name for p in val_path.parent.iterdir()) == ["train.arrow", "val.arrow"]


def test_concurrent_cold_start(tmp_path):
    """Four writers racing on an empty cache all return valid, identical shards."""
    results, errors = [], []

    def work():
        try:
            results.append(datasets.tinyshakespeare(cache_dir=tmp_path))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    train_path, val_path = results[0]
    assert (len(open_shard(val_path)), len(open_shard(train_path))) == (32_768, 305_260)
    assert sorted(p.name for p in val_path.parent.iterdir()) == ["train.arrow", "val.arrow"]


def test_unwritable_cache_dir(tmp_path):
    """A cache path under a regular file gives an error naming LLMC_CACHE_DIR as the fix."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="set LLMC_CACHE_DIR or pass cache_dir="):
        datasets.tinyshakespeare(cache_dir=blocker / "cache")
