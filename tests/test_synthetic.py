"""data_tools.synthetic: shards the loader reads (sizes, split labels, ids), the distribution
(Zipf-like, the tied pairs, document starts), the same bytes for the same seed, the CLI and its
errors.

Run:  pytest tests/test_synthetic.py
"""
import json

import numpy as np
import pytest

from data_tools import synthetic
from llmc.data.loader import DataLoader
from llmc.data.shards import find_shards, open_shard, read_meta
from llmc.data.tokenizer import EOT


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    summary = synthetic.write_synthetic(out, tokens=250_000, val_tokens=10_000, shard_size=100_000,
                                        seed=3)
    return out, summary


def test_sizes_names_and_splits(shards):
    out, summary = shards
    names = sorted(p.name for p in out.glob("*.arrow"))
    assert names == ["synthetic_train_000001.arrow", "synthetic_train_000002.arrow",
                     "synthetic_train_000003.arrow", "synthetic_val_000000.arrow"]
    sizes = {p.name: len(open_shard(p)) for p in out.glob("*.arrow")}
    assert sizes == {"synthetic_val_000000.arrow": 10_000, "synthetic_train_000001.arrow": 100_000,
                     "synthetic_train_000002.arrow": 100_000, "synthetic_train_000003.arrow": 40_000}
    assert [read_meta(p)["split"] for p in find_shards(str(out / "*_val_*.arrow"))] == ["val"]
    assert {read_meta(p)["split"] for p in find_shards(str(out / "*_train_*.arrow"))} == {"train"}
    saved = json.loads((out / "synthetic_summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["train_tokens"] == 240_000 and saved["val_tokens"] == 10_000
    assert sum(s["tokens"] for s in saved["shards"]) == 250_000


def test_the_loader_reads_them(shards):
    out, _ = shards
    loader = DataLoader(str(out / "synthetic_train_*.arrow"), 4, 64, rank=1, world_size=2)
    assert loader.num_tokens == 240_000
    assert loader.rows_per_epoch == 2 * (99_999 // 64) + 39_999 // 64
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 64) and x.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert 0 <= x.min() and x.max() < synthetic.VOCAB


def test_distribution(shards):
    out, _ = shards
    ids = np.concatenate([open_shard(p).tokens for p in sorted(out.glob("*_train_*.arrow"))])
    counts = np.bincount(ids, minlength=synthetic.VOCAB)
    assert ids.max() < synthetic.VOCAB
    # Zipf-like: the most frequent id is far above uniform, most ids are rare
    assert counts.max() > 1000 * len(ids) / synthetic.VOCAB
    assert counts[EOT] == pytest.approx(len(ids) / synthetic.DOC_TOKENS, rel=0.2)
    # odd positions of a shard follow the id before them about half the time (plus chance)
    gen = synthetic.Generator(3)
    first = open_shard(out / "synthetic_train_000001.arrow").tokens.astype(np.int64)
    a, b = first[0::2], first[1::2]
    keep = (a != EOT) & (b != EOT)  # document starts overwrite ids after the pairs are tied
    tied = np.mean(b[keep] == gen.follow[a[keep]])
    assert 0.45 < tied < 0.6


def test_same_seed_same_bytes(tmp_path):
    a = synthetic.write_synthetic(tmp_path / "a", 30_000, 3_000, seed=7)
    b = synthetic.write_synthetic(tmp_path / "b", 30_000, 3_000, seed=7)
    c = synthetic.write_synthetic(tmp_path / "c", 30_000, 3_000, seed=8)
    assert a["shards"] == b["shards"]
    for s in a["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()
    assert not np.array_equal(open_shard(tmp_path / "a" / a["shards"][1]["file"]).tokens,
                              open_shard(tmp_path / "c" / c["shards"][1]["file"]).tokens)


@pytest.mark.parametrize("text, value", [("110M", 110_000_000), ("5k", 5_000), ("2.5G", 2_500_000_000),
                                         ("1e6", 1_000_000), ("1_000", 1000), ("3B", 3 * 10**9)])
def test_parse_count(text, value):
    assert synthetic.parse_count(text) == value


@pytest.mark.parametrize("text", ["abc", "0", "-5M", "1.5", "M", "nan"])
def test_parse_count_refuses(text):
    with pytest.raises(ValueError):
        synthetic.parse_count(text)


def test_cli(tmp_path, capsys):
    assert synthetic.main(["--tokens", "50K", "--val-tokens", "5K", "--out", str(tmp_path),
                           "--name", "mine"]) == 0
    assert "5,000 val + 45,000 train tokens" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("mine_*.arrow")) == [
        "mine_train_000001.arrow", "mine_val_000000.arrow"]


def test_cli_errors(tmp_path, capsys):
    assert synthetic.main(["--tokens", "5K", "--val-tokens", "5K", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--val-tokens 5,000 must be above 0 and below --tokens 5,000" in err[0]
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--tokens", "lots", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "'lots' is not a token count" in capsys.readouterr().err
