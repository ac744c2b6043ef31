"""Preemption (issue #13): SIGTERM and SIGINT, sent to real `python -m llmc.train` processes at
different moments (during setup, mid-run), end the run with a checkpoint and exit code 75, and
the resumed run finishes with bitwise the losses of an uninterrupted one; under llmc.launch
every rank saves and the launcher exits 75. The GPU twins carry the gpu/multigpu markers.

Run: pytest tests/test_preemption.py        (about 30 s on 2 cores; marked slow)
"""
import signal
import subprocess
import sys
import time

import pytest

from llmc.training import checkpoint
from llmc.training.signals import PREEMPTED_EXIT
from llmc.train import main
from tests.run_helpers import TINY, TRAJ, cli, env, losses, signal_after, steps_logged


# ---- preemption ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig, steps", [(signal.SIGTERM, 0), (signal.SIGTERM, 3), (signal.SIGINT, 5)])
def test_signal_saves_and_resume_is_bitwise(tmp_path, sig, steps):
    flags = TRAJ + ["--max-steps", "10"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(flags + ["--out-dir", str(ref)]) == 0
    rc, _, err = signal_after(flags + ["--out-dir", str(out)], out, sig, steps)
    assert rc == PREEMPTED_EXIT, err
    assert "Traceback" not in err
    saved = checkpoint.list_checkpoints(out)
    assert len(saved) == 1
    done = checkpoint.read_state(saved[0])["step"]
    assert done >= max(steps, 1)
    assert f"stopped by {signal.Signals(sig).name} after step {done} of 10; saved {saved[0]}" in err
    assert main(flags + ["--out-dir", str(out), "--resume", "auto"]) == 0
    assert losses(out) == losses(ref)  # bitwise, every step


@pytest.mark.slow
def test_sigterm_under_launch_every_rank_saves(tmp_path):
    args = [sys.executable, "-m", "llmc.launch", "--nproc-per-node", "2", "--module",
            "preempt_probe", "--", str(tmp_path), *TINY, "--max-steps", "200"]
    p = subprocess.Popen(args, env=dict(env(), CUDA_VISIBLE_DEVICES="0,1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while min(steps_logged(tmp_path / f"rank{r}") for r in (0, 1)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == PREEMPTED_EXIT, err
    assert "every rank stopped cleanly" in err and "SIGKILL" not in err
    for r in (0, 1):
        assert len(checkpoint.list_checkpoints(tmp_path / f"rank{r}")) == 1


@pytest.mark.gpu
def test_sigterm_resume_bitwise_gpu(tmp_path):
    """The CPU test's twin on one GPU: SIGTERM mid-run, resume, the same losses bit for bit."""
    flags = ["--device", "cuda", "--model", "d4", "--n-layer", "2", "--batch-size", "4",
             "--seq-len", "64", "--total-batch-size", "512", "--max-steps", "12", "--lr", "1e-3",
             "--weight-decay", "0.1", "--warmup-steps", "2", "--val-steps", "2", "--sample-tokens", "8"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    r = cli(flags + ["--out-dir", str(ref)])
    assert r.returncode == 0, r.stderr
    rc, _, err = signal_after(flags + ["--out-dir", str(out)], out, signal.SIGTERM, 4)
    assert rc == PREEMPTED_EXIT, err
    r = cli(flags + ["--out-dir", str(out), "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(ref)


@pytest.mark.multigpu
def test_sigterm_under_launch_two_gpus(tmp_path):
    """Two GPU ranks: SIGTERM to the launcher, both ranks stop at the same step and save it
    (world size 2), the launcher exits 75, and a resumed launch ends with the same losses."""
    flags = ["--device", "cuda", "--model", "d4", "--n-layer", "2", "--batch-size", "4",
             "--seq-len", "64", "--max-steps", "12", "--lr", "1e-3", "--val-steps", "1",
             "--sample-tokens", "4"]
    launch = [sys.executable, "-m", "llmc.launch", "--nproc-per-node", "2", "--"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    r = subprocess.run(launch + flags + ["--out-dir", str(ref)], env=env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rc, _, err = signal_after(None, out, signal.SIGTERM, 4, cmd=launch + flags + ["--out-dir", str(out)])
    assert rc == PREEMPTED_EXIT, err
    saved = checkpoint.list_checkpoints(out)
    assert len(saved) == 1 and checkpoint.read_state(saved[0])["world_size"] == 2
    r = subprocess.run(launch + flags + ["--out-dir", str(out), "--resume", "auto"], env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(ref)
