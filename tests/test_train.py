"""`python -m llmc.train` on the CPU: the demo learns, files are written, resume is bitwise,
and bad input ends with one clear line and a non-zero exit (no traceback).

Run: pytest tests/test_train.py          (the 30-step demo test is marked slow; ~1 min on 2 cores)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.train import main

# A very small model so each test takes seconds.
TINY = ["--device", "cpu", "--model", "d4", "--n-layer", "2", "--n-embd", "48", "--n-head", "2",
        "--batch-size", "2", "--seq-len", "32", "--val-steps", "2", "--sample-tokens", "8"]


def _losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_files_written(tmp_path, capsys):
    assert main(TINY + ["--max-steps", "3", "--out-dir", str(tmp_path)]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["n_layer"] == 2 and cfg["device"] == "cpu"
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert {"step", "loss", "lr", "grad_norm", "ms", "tokens_per_s"} <= set(steps[0])
    assert any("val_loss" in r for r in rows)
    assert (tmp_path / "ckpt_00000003" / "state.json").is_file()
    out = capsys.readouterr().out
    assert "step     3/3" in out and "sample at step 3" in out


def test_resume_is_bitwise(tmp_path):
    flags = TINY + ["--max-steps", "6", "--total-batch-size", "128", "--lr", "1e-3",
                    "--weight-decay", "0.1", "--warmup-steps", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(flags + ["--out-dir", str(a)]) == 0
    assert main(flags + ["--out-dir", str(b), "--checkpoint-every", "3", "--keep-checkpoints", "5"]) == 0
    # simulate a crash after step 3: drop the later checkpoint and resume from the newest left
    import shutil
    shutil.rmtree(b / "ckpt_00000006")
    assert main(flags + ["--out-dir", str(b), "--resume", "auto"]) == 0
    la, lb = _losses(a), _losses(b)
    assert sorted(lb) == list(range(6))
    for s in range(6):
        assert la[s] == lb[s], f"step {s}: {la[s]!r} != {lb[s]!r} after resume"


@pytest.mark.slow
def test_cpu_demo_loss_falls(tmp_path):
    """The Done-when check: 30 CPU steps on the bundled data take the loss well below ln(50257)."""
    assert main(["--device", "cpu", "--max-steps", "30", "--out-dir", str(tmp_path)]) == 0
    losses = _losses(tmp_path)
    assert losses[0] > 10.0
    assert losses[29] < 7.5, f"loss only fell to {losses[29]:.3f}"


def _run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("LLMC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llmc.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing_data", "corrupt_shard", "total_batch", "seq_len", "bad_resume"])
def test_bad_input_one_clear_line(tmp_path, case):
    args = TINY + ["--max-steps", "1", "--out-dir", str(tmp_path / "out")]
    if case == "missing_data":
        args += ["--train-data", str(tmp_path / "nope.arrow")]
        expect = "nope.arrow"
    elif case == "corrupt_shard":
        bad = tmp_path / "bad.arrow"
        bad.write_bytes(b"this is not an arrow file" * 10)
        args += ["--train-data", str(bad)]
        expect = "bad.arrow"
    elif case == "total_batch":
        args += ["--total-batch-size", "100"]
        expect = "--total-batch-size 100"
    elif case == "seq_len":
        args = [a if a != "32" else "2048" for a in args]
        expect = "--seq-len 2048"
    else:
        args += ["--resume", str(tmp_path / "missing_ckpt")]
        expect = "missing_ckpt"
    r = _run_cli(args, tmp_path)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert len(err) == 1 and expect in err[0], r.stderr


def test_hellaswag_scored_at_validation(tmp_path):
    from llmc.eval import save_examples
    from llmc.data.tokenizer import encode
    examples = [(encode("The cat sat on the"), [encode(" mat."), encode(" moon."), encode(" dog."),
                                                 encode(" idea.")], 0)] * 3
    path = save_examples(tmp_path / "hs.npz", examples)
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path / "o"), "--hellaswag", str(path)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    hs = [r for r in rows if "hellaswag_acc" in r]
    assert len(hs) == 1 and hs[0]["hellaswag_acc"] in (0.0, 1.0)  # 3 identical examples


def test_missing_hellaswag_file_fails_before_training(tmp_path):
    r = _run_cli(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path / "o"),
                         "--hellaswag", str(tmp_path / "none.npz")], tmp_path)
    assert r.returncode == 2 and "none.npz" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
