"""Shared by the long-run tests (test_preemption, test_checkpoint_integrity, test_long_runs):
tiny CPU training flags, running `python -m llmc.train` as a subprocess, reading its metrics,
and signalling it at a given step. Not a test module.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--model", "d4", "--n-layer", "2", "--n-embd", "48", "--n-head", "2",
        "--batch-size", "2", "--seq-len", "32", "--val-steps", "2", "--sample-tokens", "8"]
# what makes a resumed run's losses depend on saved state: accumulation, decay, warmup
TRAJ = TINY + ["--total-batch-size", "128", "--lr", "1e-3", "--weight-decay", "0.1", "--warmup-steps", "2"]


def losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("LLMC_DEBUG", None)
    return env


def cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "llmc.train", *args], env=env(),
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(r, expect):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and expect in err[0], r.stderr


def steps_logged(out):
    m = Path(out) / "metrics.jsonl"
    return sum('"loss"' in l for l in m.read_text().splitlines()) if m.exists() else 0


def signal_after(args, out, sig, steps, cmd=None):
    """Start a run, send `sig` once it wrote config.json (steps=0: during setup, before the first
    step) and `steps` step lines are in metrics.jsonl; -> (exit code, stdout, stderr)."""
    cmd = cmd or [sys.executable, "-m", "llmc.train", *args]
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (steps_logged(out) < steps or not (Path(out) / "config.json").exists()) \
                and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        p.send_signal(sig)
        out_s, err_s = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out_s, err_s
