"""`python -m llmc.plot`: curves of real (tiny) CPU runs overlaid in one PNG, the smoothing, and
one-line errors for missing runs, bad flags and a missing matplotlib.

Run: pytest tests/test_plot.py
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from llmc import plot  # noqa: E402
from llmc.train import main as train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--model", "d4", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
        "--batch-size", "2", "--seq-len", "16", "--val-steps", "1", "--sample-tokens", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    for name, lr in (("lr3e-3", "3e-3"), ("lr1e-3", "1e-3")):
        assert train(TINY + ["--max-steps", "6", "--val-every", "3", "--lr", lr,
                             "--out-dir", str(base / name)]) == 0
    return base / "lr3e-3", base / "lr1e-3"


def test_two_runs_overlaid(runs, tmp_path):
    out = plot.plot(list(runs), tmp_path / "curves.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    run = plot.read_run(runs[0])
    assert [r["step"] for r in run["train"]] == list(range(6))
    assert [s for s, _ in run["val"]] == [2, 5]
    assert run["tokens_per_step"] == 2 * 16


def test_cli_and_errors(runs, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmc.plot", *map(str, args)], capture_output=True,
                              text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    r = cli(*runs, "--out", tmp_path / "a.svg", "--labels", "fast", "slow")
    assert r.returncode == 0 and (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml"), r.stderr
    for args, expect in (((tmp_path / "none", "--out", tmp_path / "b.png"), "metrics.jsonl: not found"),
                         ((runs[0], "--labels", "x", "y", "--out", tmp_path / "c.png"), "2 label(s) for 1 run"),
                         ((runs[0], "--smooth", "1", "--out", tmp_path / "d.png"), "--smooth must be in [0, 1)")):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
    r = cli(runs[0], "--out", tmp_path / "e.jpg")
    assert r.returncode == 2 and "give a .png, .svg or .pdf" in r.stderr


def test_empty_and_killed_mid_write(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(plot.PlotError, match="holds no training steps"):
        plot.read_run(tmp_path)
    rows = [{"step": 0, "loss": 5.0, "lr": 1e-3}, {"step": 1, "loss": 4.0, "lr": 1e-3, "skipped": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "lo')
    run = plot.read_run(tmp_path)
    assert len(run["train"]) == 2 and [r["step"] for r in run["skipped"]] == [1]
    assert run["tokens_per_step"] is None  # no timing logged: the x axis is steps
    plot.plot([tmp_path], tmp_path / "p.png")


def test_ema_debiased():
    assert plot.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    out = plot.ema([1.0, math.nan, 3.0], 0.5)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == pytest.approx((0.25 + 1.5) / 0.75)


def test_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plot.PlotError, match="pip install 'llmc\\[plot\\]'"):
        plot.plot([tmp_path], tmp_path / "x.png")
