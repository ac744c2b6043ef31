"""data_tools.fineweb and its pieces: document sources, parallel sharding, resume, errors.

What is checked:
- the hub path's file selection (`hub_files`, `list_hub_files`) from a fake repository listing,
  and a whole hub run with a fake downloader, all without a network;
- local parquet (FineWeb's columns), jsonl (plain and .gz) and txt sources: the shards decode
  back to the documents joined by <|endoftext|>, first shard val, the rest train, every shard but
  the last exactly --shard-size tokens, summary counts right; 1 and 2 tokenizer processes agree;
- resume: a writer that dies after shard k, then a rerun, gives byte-identical shards and
  summary to an uninterrupted run, without rewriting (or re-reading) the finished ones;
- data_tools.tinyshakespeare: the bundled text gives llmc.data.datasets' shards, --source another text;
- the plain progress line (no tqdm): documents/s, tokens/s, shard, ETA;
- one-line errors with exit code 2 for a missing source, a parquet without `text`, an empty
  source, a malformed jsonl line, changed flags on resume, foreign shards in --out, --out '';
- long runs: tokenizer workers die with their parent (kill -9 and SIGTERM, no orphan holding
  the caller's pipes); a crash between the first shard and its progress record resumes; stale
  `*.tmp-<pid>` progress files are removed.

Run:  python -m pytest tests/test_data_tools.py -q
"""
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools import fineweb, sharder, sources
from data_tools.sharder import PrepareError, prepare
from data_tools.sources import HubSource, LocalSource, SourceError, hub_files, list_hub_files
from llmc.data.shards import open_shard
from llmc.data.tokenizer import EOT, decode, encode

ROOT = Path(__file__).resolve().parents[1]


def make_docs(n, seed=0):
    """n deterministic documents of varied length, with punctuation, digits and non-ASCII."""
    rng = np.random.default_rng(seed)
    words = ["the", "King", "said", "ça", "naïve", "2024", "—", "data", "tokens", "\n", "x" * 13,
             "Ünïcödé", "GPT-2", "  ", "shard", "!"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 120)))) for _ in range(n)]


def write_fineweb_parquet(path, texts, row_group_size=50):
    """A parquet file with FineWeb's columns."""
    n = len(texts)
    table = pa.table({
        "text": texts, "id": [f"<urn:uuid:{i}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.com/{i}" for i in range(n)],
        "date": ["2024-02-21T00:00:00Z"] * n, "file_path": ["s3://x/y.warc.gz"] * n,
        "language": ["en"] * n, "language_score": [0.9] * n,
        "token_count": [len(encode(t)) for t in texts]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def all_tokens(out, summary):
    return np.concatenate([np.asarray(open_shard(out / s["name"]).tokens) for s in summary["shards"]])


def check_shards(out, summary, texts, shard_size, prefix="fineweb"):
    """The shards hold exactly [EOT] + encode(doc) for every doc, cut at shard_size."""
    shards = summary["shards"]
    assert [s["split"] for s in shards] == ["val"] + ["train"] * (len(shards) - 1)
    assert shards[0]["name"] == f"{prefix}_val_000000.arrow"
    assert all(s["name"] == f"{prefix}_train_{i:06d}.arrow" for i, s in enumerate(shards) if i)
    for i, s in enumerate(shards):
        shard = open_shard(out / s["name"])
        assert shard.split == s["split"] and len(shard) == s["tokens"]
        assert s["documents"] == int(np.count_nonzero(shard.tokens == EOT))
        if i < len(shards) - 1:
            assert len(shard) == shard_size
    expected = [t for doc in texts for t in [EOT] + encode(doc)]
    assert all_tokens(out, summary).tolist() == expected
    assert decode(all_tokens(out, summary)) == "".join("<|endoftext|>" + d for d in texts)
    assert summary["tokens"] == len(expected) and summary["documents"] == len(texts)
    assert summary["val_tokens"] == shards[0]["tokens"]
    assert json.loads((out / f"{prefix}_summary.json").read_text()) == summary


def test_hub_file_selection_from_a_listing():
    """Only sample/<N>BT/*.parquet of the chosen sample, sorted; nothing else."""
    listing = ["README.md", "sample/10BT/001_00000.parquet", "sample/100BT/000_00000.parquet",
               "sample/10BT/000_00001.parquet", "sample/10BT/000_00000.parquet",
               "data/CC-MAIN-2024-10/000_00000.parquet", "sample/10BT/notes.json",
               "sample/10BTx/000.parquet"]
    assert hub_files(listing, "10BT") == ["sample/10BT/000_00000.parquet",
                                          "sample/10BT/000_00001.parquet",
                                          "sample/10BT/001_00000.parquet"]
    assert hub_files(listing, "100BT") == ["sample/100BT/000_00000.parquet"]
    with pytest.raises(SourceError, match="sample/350BT/: no parquet files"):
        hub_files(listing, "350BT")


def test_list_hub_files_asks_the_right_repository():
    """list_hub_files lists the dataset repo (repo_type=dataset) and filters the listing."""
    calls = []

    class FakeApi:
        def list_repo_files(self, repo_id, repo_type=None):
            calls.append((repo_id, repo_type))
            return ["sample/10BT/b.parquet", "sample/10BT/a.parquet", "x.parquet"]
    files = list_hub_files("fineweb-edu", "10BT", api=FakeApi())
    assert files == ["sample/10BT/a.parquet", "sample/10BT/b.parquet"]
    assert calls == [("HuggingFaceFW/fineweb-edu", "dataset")]

    class DownApi:
        def list_repo_files(self, repo_id, repo_type=None):
            raise ConnectionError("no route to host")
    with pytest.raises(SourceError, match="could not list.*no route to host"):
        list_hub_files("fineweb", "10BT", api=DownApi())


def test_missing_huggingface_hub_is_a_clear_error(monkeypatch):
    """Without huggingface_hub the hub path says to pip install llmc[data]."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(SourceError, match=r"pip install 'llmc\[data\]'"):
        list_hub_files("fineweb", "10BT")


def test_hub_run_with_a_fake_downloader(tmp_path):
    """HubSource downloads each file in order (repo, repo_type, local_dir) and shards them."""
    texts = make_docs(90, seed=1)
    local = {f"sample/10BT/00{i}_00000.parquet":
             write_fineweb_parquet(tmp_path / f"f{i}.parquet", texts[30 * i:30 * (i + 1)])
             for i in range(3)}
    requested = []

    def download(repo_id, filename, repo_type=None, local_dir=None):
        requested.append((repo_id, filename, repo_type, local_dir))
        return str(local[filename])
    names = hub_files(list(local)[::-1], "10BT")
    source = HubSource("fineweb", "10BT", names, download_dir=tmp_path / "dl", download=download)
    out = tmp_path / "out"
    summary = prepare(source, out, "fineweb", shard_size=500)
    check_shards(out, summary, texts, 500)
    assert [r[1] for r in requested] == names
    assert {(r[0], r[2], r[3]) for r in requested} == {
        ("HuggingFaceFW/fineweb", "dataset", str(tmp_path / "dl"))}


@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_source_round_trip(tmp_path, workers):
    """FineWeb-schema parquet -> shards that decode to the texts joined by <|endoftext|>."""
    texts = make_docs(300)
    src = write_fineweb_parquet(tmp_path / "part.parquet", texts)
    out = tmp_path / "out"
    rc = fineweb.main(["--source", str(src), "--out", str(out), "--shard-size", "2000",
                       "--workers", str(workers)])
    assert rc == 0
    summary = json.loads((out / "fineweb_summary.json").read_text())
    assert len(summary["shards"]) > 3
    check_shards(out, summary, texts, 2000)


def test_jsonl_and_txt_sources(tmp_path):
    """jsonl (plain and .gz, blank lines skipped) and txt (one document per file), in order."""
    texts = make_docs(40, seed=2)
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i})
                                         for i, t in enumerate(texts[:15])) + "\n\n")
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[15:30])
    for i, t in enumerate(texts[30:]):
        (d / f"c{i:02d}.txt").write_text(t, encoding="utf-8")
    (d / "ignored.csv").write_text("not a source")
    out = tmp_path / "out"
    summary = prepare(LocalSource(sources.resolve_paths([str(d)])), out, "mix", shard_size=700)
    check_shards(out, summary, texts, 700, prefix="mix")
    # a glob selects the same way
    paths = sources.resolve_paths([str(d / "*.jsonl*"), str(d / "c0*.txt")])
    assert [p.name for p in paths] == ["a.jsonl", "b.jsonl.gz"] + [f"c{i:02d}.txt" for i in range(10)]


class CountingSource(LocalSource):
    """A LocalSource that records which files it was asked to read, and from where."""

    def __init__(self, paths):
        super().__init__(paths)
        self.opened = []

    def documents(self, i, skip=0):
        self.opened.append((i, skip))
        return super().documents(i, skip)


def test_resume_after_a_failure_is_identical_and_keeps_finished_shards(tmp_path, monkeypatch):
    """Die after shard k; the rerun equals an uninterrupted run and does not redo shards < k."""
    texts = make_docs(240, seed=3)
    files = [write_fineweb_parquet(tmp_path / f"p{i}.parquet", texts[80 * i:80 * (i + 1)],
                                   row_group_size=16) for i in range(3)]
    full = tmp_path / "full"
    ref = prepare(LocalSource(files), full, "fineweb", shard_size=900)
    n_shards = len(ref["shards"])
    assert n_shards >= 6

    real_write, written = sharder.write_shard, []

    def dies_after(k):
        def write(path, tokens, split):
            if len(written) == k:
                raise RuntimeError("simulated crash")
            written.append(Path(path).name)
            return real_write(path, tokens, split)
        return write
    part = tmp_path / "part"
    starts = [rec["start"] for rec in json.loads((full / "fineweb_progress.json").read_text())["shards"]]
    k = next(i for i, (doc, offset) in enumerate(starts) if doc > 80 and offset > 0)  # mid-file 1
    assert k < n_shards - 1
    monkeypatch.setattr(sharder, "write_shard", dies_after(k))
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(LocalSource(files), part, "fineweb", shard_size=900)
    assert sorted(p.name for p in part.glob("*.arrow")) == sorted(written)
    assert not (part / "fineweb_summary.json").exists()
    mtimes = {name: (part / name).stat().st_mtime_ns for name in written}
    time.sleep(0.05)

    written.clear()
    monkeypatch.setattr(sharder, "write_shard", dies_after(10**9))
    source = CountingSource(files)
    summary = prepare(source, part, "fineweb", shard_size=900)
    assert summary == ref
    assert written == [s["name"] for s in ref["shards"][k:]]  # only the unfinished shards
    assert {name: (part / name).stat().st_mtime_ns for name in mtimes} == mtimes
    for s in ref["shards"]:
        assert (part / s["name"]).read_bytes() == (full / s["name"]).read_bytes()
    assert (part / "fineweb_summary.json").read_text() == (full / "fineweb_summary.json").read_text()
    # the stream restarted mid-document in file 1; file 0, already counted, was not opened
    assert source.opened[0] == (1, starts[k][0] - 80)

    # a third run finds the work complete and writes nothing
    written.clear()
    assert prepare(LocalSource(files), part, "fineweb", shard_size=900) == ref
    assert written == []


def test_a_damaged_finished_shard_is_redone(tmp_path):
    """A listed shard that no longer opens is rewritten, with everything after it."""
    texts = make_docs(100, seed=4)
    src = write_fineweb_parquet(tmp_path / "p.parquet", texts)
    out = tmp_path / "out"
    ref = prepare(LocalSource([src]), out, "fineweb", shard_size=800)
    good = {s["name"]: (out / s["name"]).read_bytes() for s in ref["shards"]}
    victim = out / ref["shards"][2]["name"]
    victim.write_bytes(victim.read_bytes()[:100])
    progress = json.loads((out / "fineweb_progress.json").read_text())
    progress["complete"] = False
    (out / "fineweb_progress.json").write_text(json.dumps(progress))
    assert prepare(LocalSource([src]), out, "fineweb", shard_size=800) == ref
    assert {n: (out / n).read_bytes() for n in good} == good


def test_changed_flags_on_resume_are_refused(tmp_path):
    """Resuming with another --shard-size (or source) is an error, and nothing is touched."""
    src = write_fineweb_parquet(tmp_path / "p.parquet", make_docs(50, seed=5))
    out = tmp_path / "out"
    prepare(LocalSource([src]), out, "fineweb", shard_size=500)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PrepareError, match="shard_size"):
        prepare(LocalSource([src]), out, "fineweb", shard_size=600)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_foreign_shards_without_progress_are_refused(tmp_path):
    """--out holding <prefix>_*.arrow but no progress file: refuse instead of overwriting."""
    src = write_fineweb_parquet(tmp_path / "p.parquet", make_docs(20, seed=6))
    out = tmp_path / "out"
    out.mkdir()
    (out / "fineweb_train_000001.arrow").write_bytes(b"precious")
    with pytest.raises(PrepareError, match="no fineweb_progress.json"):
        prepare(LocalSource([src]), out, "fineweb", shard_size=100)
    assert (out / "fineweb_train_000001.arrow").read_bytes() == b"precious"


def run_cli(*args):
    """python -m data_tools.fineweb ARGS -> (returncode, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "data_tools.fineweb", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


def test_cli_errors(tmp_path):
    """Missing source, parquet without text, empty source, malformed jsonl: one line, rc 2."""
    out = str(tmp_path / "out")
    assert_one_line_error(*run_cli("--source", str(tmp_path / "nope.parquet"), "--out", out),
                          "nope.parquet", "no such file")
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "bad.parquet")
    assert_one_line_error(*run_cli("--source", str(tmp_path / "bad.parquet"), "--out", out),
                          "bad.parquet", "no 'text' column", "content")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert_one_line_error(*run_cli("--source", str(tmp_path / "empty.jsonl"), "--out", out),
                          "no documents")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    assert_one_line_error(*run_cli("--source", str(tmp_path / "broken.jsonl"), "--out", out),
                          "broken.jsonl:2", "not valid JSON")
    (tmp_path / "notext.jsonl").write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    assert_one_line_error(*run_cli("--source", str(tmp_path / "notext.jsonl"), "--out", out),
                          "notext.jsonl:3", '"text"')
    assert not list(Path(out).glob("*.arrow"))


def test_parquet_skip_by_row_groups(tmp_path):
    """parquet_documents(skip=k) yields the documents from row k on and returns the row count."""
    texts = make_docs(37, seed=7)
    src = write_fineweb_parquet(tmp_path / "p.parquet", texts, row_group_size=8)
    for skip in (0, 5, 8, 16, 36, 37, 50):
        gen = sources.parquet_documents(src, skip, batch_size=3)
        got = []
        try:
            while True:
                got.append(next(gen))
        except StopIteration as stop:
            assert stop.value == 37
        assert got == texts[skip:]


def test_tinyshakespeare_tool(tmp_path):
    """The bundled text gives llmc.data.datasets' shards; --source does the same to another text."""
    from data_tools import tinyshakespeare as ts
    from llmc.data.datasets import tinyshakespeare
    out = tmp_path / "ts"
    assert ts.main(["--out", str(out)]) == 0
    train, val = tinyshakespeare(cache_dir=tmp_path / "cache")
    assert open_shard(out / "tinyshakespeare_val.arrow").tokens.tolist() == open_shard(val).tokens.tolist()
    assert open_shard(out / "tinyshakespeare_train.arrow").tokens.tolist() == open_shard(train).tokens.tolist()
    text = "First section.\n\nSecond one, longer.\n\nThird and last"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    assert ts.main(["--out", str(out), "--source", str(tmp_path / "book.txt"), "--val-tokens", "4"]) == 0
    ids = (open_shard(out / "book_val.arrow").tokens.tolist()
           + open_shard(out / "book_train.arrow").tokens.tolist())
    assert len(open_shard(out / "book_val.arrow")) == 4
    assert ids == ([EOT] + encode("First section.\n\n") + [EOT] + encode("Second one, longer.\n\n")
                   + [EOT] + encode("Third and last"))
    with pytest.raises(ts.TextError, match="not more than the 1000 validation tokens"):
        ts.write_text_shards(text, out, "short", val_tokens=1000)
    proc = subprocess.run([sys.executable, "-m", "data_tools.tinyshakespeare", "--out", str(out),
                           "--source", str(tmp_path / "missing.txt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "missing.txt", "no such file")


def test_plain_progress_line_without_tqdm(monkeypatch, capsys):
    """Without tqdm: a stderr line with documents/s, tokens/s, the shard and an ETA."""
    import io
    monkeypatch.setitem(sys.modules, "tqdm", None)
    log = io.StringIO()
    progress = sharder.Progress("fineweb", ("documents", 1000), 0, 0, log=log, interval=0.0)
    assert progress.bar is None
    time.sleep(0.01)
    progress.update(250, 100_000, shard=3)
    progress.close()
    line = log.getvalue().strip()
    assert line.startswith("fineweb: 250 docs (") and "/s)" in line and "M/s)" in line
    assert "shard 3" in line and "ETA 00:00:" in line  # 750 documents left at > 250 docs/s


# ---- long runs (issue #13): workers die with their parent, crash windows, bad --out ---------

def _children(pid):
    """PIDs whose parent is `pid` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_workers_die_with_their_parent(tmp_path, sig):
    import os
    import signal
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in make_docs(400, seed=5) * 40) + "\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.Popen([sys.executable, "-m", "data_tools.fineweb", "--source", str(src), "--out",
                          str(tmp_path / "out"), "--shard-size", "5000", "--workers", "2"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        workers = []
        while len(workers) < 2 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
            # spawn: a resource tracker plus the workers, all children of the main process
            workers = [c for c in _children(p.pid)
                       if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) >= 2, "the pool did not start"
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=60)  # returns only once no orphan holds the pipes
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), f"workers outlived the parent ({sig})"
    finally:
        if p.poll() is None:
            p.kill()
    if sig == "SIGTERM":
        assert p.returncode == 130 and "rerun the same command to resume" in err


def test_crash_after_the_first_shard_resumes(tmp_path, monkeypatch):
    texts = make_docs(60, seed=3)
    src = write_fineweb_parquet(tmp_path / "p.parquet", texts)
    ref = prepare(LocalSource([src]), tmp_path / "ref", "fineweb", shard_size=900)
    out = tmp_path / "out"
    real = sharder._write_json

    def die_on_first_shard_progress(path, obj):  # kill -9 between the shard and its progress
        if path.name.endswith("_progress.json") and obj["shards"]:
            raise KeyboardInterrupt
        return real(path, obj)
    monkeypatch.setattr(sharder, "_write_json", die_on_first_shard_progress)
    with pytest.raises(KeyboardInterrupt):
        prepare(LocalSource([src]), out, "fineweb", shard_size=900)
    monkeypatch.undo()
    assert (out / "fineweb_val_000000.arrow").exists()
    (out / "fineweb_progress.json.tmp-99999").write_text("{")  # a killed atomic write
    assert prepare(LocalSource([src]), out, "fineweb", shard_size=900) == ref
    assert not list(out.glob("*.tmp-*"))


def test_empty_out_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        fineweb.parse_args(["--source", "x.jsonl", "--out", ""])
    assert e.value.code == 2 and "--out '': give the output directory" in capsys.readouterr().err
