"""Checkpoint integrity (issue #13): damage of every kind (random bytes, zeros, truncation,
bit flips, a broken state.json) is one error naming the file and `--resume auto` walks back to
the newest intact checkpoint; a crash injected at every filesystem call of a save, a prune and
a re-save, and real kill -9's, never leave a loadable broken checkpoint or a leaked directory;
non-finite state is never written; steps past 99,999,999 are found.

Run: pytest tests/test_checkpoint_integrity.py
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmc.training import checkpoint
from llmc.training.checkpoint import CheckpointError
from llmc.train import main
from tests.run_helpers import TINY, cli, env, losses, one_line_error, steps_logged


# ---- checkpoints: damage, walk-back, crashes -----------------------------------------------

def _save(out, step, seed=0, keep=5):
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(1000).astype(np.float32)
    optim = {"m": rng.standard_normal(1000).astype(np.float32), "v": rng.random(1000).astype(np.float32)}
    return checkpoint.save(out, step, params=params, optim=optim, state={}, keep=keep)


def _flip(path, offset=-100):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x10
    path.write_bytes(bytes(b))


DAMAGE = {
    "model_random": (lambda p: (p / "model.npy").write_bytes(os.urandom((p / "model.npy").stat().st_size)), "model.npy: SHA-256"),
    "model_zeros": (lambda p: (p / "model.npy").write_bytes(bytes((p / "model.npy").stat().st_size)), "model.npy: SHA-256"),
    "model_truncated": (lambda p: os.truncate(p / "model.npy", 50), "model.npy: 50 bytes"),
    "optim_truncated": (lambda p: os.truncate(p / "optim_rank0.npz", 300), "optim_rank0.npz: 300 bytes"),
    "optim_bitflip": (lambda p: _flip(p / "optim_rank0.npz"), "optim_rank0.npz: SHA-256"),
    "state_no_step": (lambda p: (p / "state.json").write_text(json.dumps(
        {k: v for k, v in json.loads((p / "state.json").read_text()).items() if k != "step"})), "'step' is None"),
    "state_list": (lambda p: (p / "state.json").write_text("[1, 2]"), "not a JSON object"),
    "state_garbage": (lambda p: (p / "state.json").write_bytes(b"\xff\x00{"), "unreadable JSON"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_named_and_auto_walks_back(tmp_path, kind):
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2, seed=1)
    damage, expect = DAMAGE[kind]
    damage(bad)
    with pytest.raises(CheckpointError, match=expect.replace("(", r"\(")):
        checkpoint.load(bad)
    skipped = []
    assert checkpoint.resolve_resume("auto", tmp_path, report=skipped.append) == good
    assert len(skipped) == 1 and "ckpt_00000002" in skipped[0] and expect in skipped[0]


def test_no_intact_checkpoint_refuses_to_start_over(tmp_path):
    p = _save(tmp_path, 3)
    os.truncate(p / "model.npy", 10)
    with pytest.raises(CheckpointError, match="none of its 1 checkpoint"):
        checkpoint.resolve_resume("auto", tmp_path)


def test_cli_resume_auto_skips_damaged(tmp_path, capsys):
    flags = TINY + ["--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "3",
                    "--out-dir", str(tmp_path)]
    assert main(flags) == 0
    os.truncate(tmp_path / "ckpt_00000004" / "optim_rank0.npz", 1000)
    capsys.readouterr()
    assert main(flags[:-2] + ["--max-steps", "5", "--out-dir", str(tmp_path), "--resume", "auto"]) == 0
    cap = capsys.readouterr()
    assert "skipping ckpt_00000004" in cap.err and "optim_rank0.npz: 1,000 bytes" in cap.err
    assert "resumed from" in cap.out and "ckpt_00000002 at step 2" in cap.out


def test_cli_damaged_explicit_resume_one_line(tmp_path):
    assert main(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path / "a")]) == 0
    ck = tmp_path / "a" / "ckpt_00000001"
    _flip(ck / "optim_rank0.npz")
    r = cli(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path / "a"), "--resume", str(ck)])
    one_line_error(r, "optim_rank0.npz: SHA-256 does not match")


class _Crash(BaseException):
    """Stands for kill -9: nothing after it runs, no except clause catches it."""


@pytest.mark.parametrize("op", ["save", "save_with_prune", "resave"])
def test_crash_at_every_point_of_save_and_prune(tmp_path, monkeypatch, op):
    """Kill the save at its k-th filesystem call for every k: never a loadable broken
    checkpoint, the newest intact one is found, and the next start cleans every leftover."""
    targets = [(os, "rename"), (os, "fsync"), (shutil, "rmtree"), (checkpoint, "sha256_file"),
               (checkpoint, "_write_array"), (Path, "mkdir"), (Path, "write_text")]
    k = 0
    while True:
        out = tmp_path / f"k{k}"
        _save(out, 1, keep=1)
        if op == "save_with_prune":
            _save(out, 2, keep=5)
        calls = [0]

        def wrap(fn):
            def crashing(*a, **kw):
                calls[0] += 1
                if calls[0] == k + 1:
                    raise _Crash()
                return fn(*a, **kw)
            return crashing
        with monkeypatch.context() as m:
            for owner, name in targets:
                m.setattr(owner, name, wrap(getattr(owner, name)))
            try:
                _save(out, 1 if op == "resave" else 3, seed=7, keep=1)
                finished = True
            except _Crash:
                finished = False
        checkpoint.clean(out)  # what the next run does first, under the lock
        assert checkpoint.leftovers(out) == []
        found = checkpoint.find_intact(out)
        assert found is not None, f"crash at call {k + 1}: no intact checkpoint left"
        checkpoint.load(found)
        assert all(p.name.startswith("ckpt_") and ".tmp" not in p.name and ".old" not in p.name
                   for p in out.iterdir())
        if finished:
            break
        k += 1
    assert k > 8  # the loop really crashed the save at many points


@pytest.mark.slow
def test_real_kill9_during_saves_then_resume(tmp_path):
    """kill -9 at random moments of a run that saves and prunes every step; after each kill a
    resume continues from an intact checkpoint, and the finished run leaves nothing behind."""
    rng = np.random.default_rng(13)
    flags = TINY + ["--max-steps", "12", "--checkpoint-every", "1", "--keep-checkpoints", "1",
                    "--out-dir", str(tmp_path)]
    for attempt in range(3):
        cmd = [sys.executable, "-m", "llmc.train", *flags] + (["--resume", "auto"] if attempt else [])
        p = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while steps_logged(tmp_path) < 2 + 3 * attempt and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(float(rng.uniform(0, 0.15)))  # somewhere inside a step, a save or a prune
            p.kill()
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
        assert checkpoint.find_intact(tmp_path) is not None
    assert main(flags + ["--resume", "auto"]) == 0
    assert sorted(losses(tmp_path)) == list(range(12))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000012"]
    assert checkpoint.leftovers(tmp_path) == []


def test_step_past_eight_digits(tmp_path):
    _save(tmp_path, 99_999_999)
    _save(tmp_path, 123_456_789)
    assert checkpoint.find_intact(tmp_path).name == "ckpt_123456789"


def test_nonfinite_state_is_never_written(tmp_path):
    params = np.ones(10, np.float32)
    params[3] = np.nan
    with pytest.raises(CheckpointError, match="the weights has 1 non-finite"):
        checkpoint.save(tmp_path, 1, params=params, optim={}, state={})
    with pytest.raises(CheckpointError, match="optimizer state 'v' has 2 non-finite"):
        checkpoint.save(tmp_path, 1, params=np.ones(10, np.float32),
                        optim={"v": np.array([np.inf, 1, -np.inf], np.float32)}, state={})
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_to_checkpoint_nan_weights(tmp_path, monkeypatch, capsys):
    from llmc.training import trainer
    real = trainer.CPUBackend.params_for_checkpoint
    monkeypatch.setattr(trainer.CPUBackend, "params_for_checkpoint",
                        lambda self: real(self) * np.float32(np.nan))
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "step 2 not checkpointed: the weights has" in err and "no checkpoint was written" in err
    assert checkpoint.list_checkpoints(tmp_path) == [] and checkpoint.leftovers(tmp_path) == []
