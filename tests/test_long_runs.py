"""Long runs you can trust (issue #13), on the CPU path: preemption by signal, checksummed
checkpoints and the `--resume auto` walk-back, crashes at every point of a save and a prune,
the out-dir lock and the used-directory check, non-finite state, flag validation, end-of-run
work after the final checkpoint, split metadata, the outlier guard and the ETA.

Signals are sent to real `python -m llmc.train` subprocesses; crashes inside save/prune are
injected at every filesystem call in turn. The GPU twin of the SIGTERM test is
test_sigterm_resume_bitwise_gpu (marked gpu).

Run: pytest tests/test_long_runs.py        (about a minute on 2 cores; the signal tests are slow)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmc import checkpoint
from llmc.checkpoint import CheckpointError
from llmc.config import ConfigError, TrainConfig, resolve
from llmc.guard import OutlierDetector, OutlierGuard
from llmc.progress import Progress
from llmc.runlock import RunLock
from llmc.signals import PREEMPTED_EXIT
from llmc.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--model", "d4", "--n-layer", "2", "--n-embd", "48", "--n-head", "2",
        "--batch-size", "2", "--seq-len", "32", "--val-steps", "2", "--sample-tokens", "8"]
# what makes a resumed run's losses depend on saved state: accumulation, decay, warmup
TRAJ = TINY + ["--total-batch-size", "128", "--lr", "1e-3", "--weight-decay", "0.1", "--warmup-steps", "2"]


def _losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("LLMC_DEBUG", None)
    return env


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "llmc.train", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(r, expect):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and expect in err[0], r.stderr


def _steps_logged(out):
    m = Path(out) / "metrics.jsonl"
    return sum('"loss"' in l for l in m.read_text().splitlines()) if m.exists() else 0


def _signal_after(args, out, sig, steps, cmd=None):
    """Start a run, send `sig` once it wrote config.json (steps=0: during setup, before the first
    step) and `steps` step lines are in metrics.jsonl; -> (exit code, stdout, stderr)."""
    cmd = cmd or [sys.executable, "-m", "llmc.train", *args]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (_steps_logged(out) < steps or not (Path(out) / "config.json").exists()) \
                and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        p.send_signal(sig)
        out_s, err_s = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out_s, err_s


# ---- preemption ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig, steps", [(signal.SIGTERM, 0), (signal.SIGTERM, 3), (signal.SIGINT, 5)])
def test_signal_saves_and_resume_is_bitwise(tmp_path, sig, steps):
    flags = TRAJ + ["--max-steps", "10"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(flags + ["--out-dir", str(ref)]) == 0
    rc, _, err = _signal_after(flags + ["--out-dir", str(out)], out, sig, steps)
    assert rc == PREEMPTED_EXIT, err
    assert "Traceback" not in err
    saved = checkpoint.list_checkpoints(out)
    assert len(saved) == 1
    done = checkpoint.read_state(saved[0])["step"]
    assert done >= max(steps, 1)
    assert f"stopped by {signal.Signals(sig).name} after step {done} of 10; saved {saved[0]}" in err
    assert main(flags + ["--out-dir", str(out), "--resume", "auto"]) == 0
    assert _losses(out) == _losses(ref)  # bitwise, every step


@pytest.mark.slow
def test_sigterm_under_launch_every_rank_saves(tmp_path):
    args = [sys.executable, "-m", "llmc.launch", "--nproc-per-node", "2", "--module",
            "preempt_probe", "--", str(tmp_path), *TINY, "--max-steps", "200"]
    p = subprocess.Popen(args, env=dict(_env(), CUDA_VISIBLE_DEVICES="0,1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while min(_steps_logged(tmp_path / f"rank{r}") for r in (0, 1)) < 2 and time.monotonic() < deadline:
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
    r = _cli(flags + ["--out-dir", str(ref)])
    assert r.returncode == 0, r.stderr
    rc, _, err = _signal_after(flags + ["--out-dir", str(out)], out, signal.SIGTERM, 4)
    assert rc == PREEMPTED_EXIT, err
    r = _cli(flags + ["--out-dir", str(out), "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert _losses(out) == _losses(ref)


@pytest.mark.multigpu
def test_sigterm_under_launch_two_gpus(tmp_path):
    """Two GPU ranks: SIGTERM to the launcher, both ranks stop at the same step and save it
    (world size 2), the launcher exits 75, and a resumed launch ends with the same losses."""
    flags = ["--device", "cuda", "--model", "d4", "--n-layer", "2", "--batch-size", "4",
             "--seq-len", "64", "--max-steps", "12", "--lr", "1e-3", "--val-steps", "1",
             "--sample-tokens", "4"]
    launch = [sys.executable, "-m", "llmc.launch", "--nproc-per-node", "2", "--"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    r = subprocess.run(launch + flags + ["--out-dir", str(ref)], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rc, _, err = _signal_after(None, out, signal.SIGTERM, 4, cmd=launch + flags + ["--out-dir", str(out)])
    assert rc == PREEMPTED_EXIT, err
    saved = checkpoint.list_checkpoints(out)
    assert len(saved) == 1 and checkpoint.read_state(saved[0])["world_size"] == 2
    r = subprocess.run(launch + flags + ["--out-dir", str(out), "--resume", "auto"], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _losses(out) == _losses(ref)


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
    r = _cli(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path / "a"), "--resume", str(ck)])
    _one_line_error(r, "optim_rank0.npz: SHA-256 does not match")


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
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while _steps_logged(tmp_path) < 2 + 3 * attempt and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(float(rng.uniform(0, 0.15)))  # somewhere inside a step, a save or a prune
            p.kill()
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
        assert checkpoint.find_intact(tmp_path) is not None
    assert main(flags + ["--resume", "auto"]) == 0
    assert sorted(_losses(tmp_path)) == list(range(12))
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
    from llmc import trainer
    real = trainer.CPUBackend.params_for_checkpoint
    monkeypatch.setattr(trainer.CPUBackend, "params_for_checkpoint",
                        lambda self: real(self) * np.float32(np.nan))
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "step 2 not checkpointed: the weights has" in err and "no checkpoint was written" in err
    assert checkpoint.list_checkpoints(tmp_path) == [] and checkpoint.leftovers(tmp_path) == []


# ---- the out-dir: lock, used directory ----------------------------------------------------

def test_second_run_on_locked_out_dir_refuses(tmp_path):
    with RunLock(tmp_path):
        r = _cli(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path)])
    _one_line_error(r, f"in use by another run (PID {os.getpid()} on host ")
    assert not (tmp_path / "metrics.jsonl").exists()
    assert main(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path)]) == 0  # released: fine


@pytest.mark.slow
def test_two_racing_runs_one_wins(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "llmc.train", *TINY, "--max-steps", "5",
                               "--out-dir", str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "in use by another run" in loser or "holds another run" in loser
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000005"]
    assert sorted(_losses(tmp_path)) == list(range(5))


def test_fresh_run_in_used_out_dir(tmp_path):
    assert main(TINY + ["--max-steps", "3", "--out-dir", str(tmp_path)]) == 0
    r = _cli(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path)])
    _one_line_error(r, "holds another run (ckpt_00000003, metrics.jsonl); pass --resume auto")
    assert sorted(_losses(tmp_path)) == [0, 1, 2]  # the old run's metrics are untouched
    r = _cli(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path), "--overwrite", "--resume", "auto"])
    _one_line_error(r, "--overwrite deletes the run that --resume would continue")
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path), "--overwrite"]) == 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000002"]
    assert sorted(_losses(tmp_path)) == [0, 1]


def test_failed_start_does_not_block_the_next(tmp_path):
    r = _cli(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path), "--train-data", str(tmp_path / "typo.arrow")])
    _one_line_error(r, "typo.arrow")
    assert (tmp_path / "config.json").exists()  # written, but no step ran: not a run to protect
    assert main(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path)]) == 0


def test_start_cleans_leftovers(tmp_path, capsys):
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path)]) == 0
    (tmp_path / "ckpt_00000009.tmp").mkdir()
    (tmp_path / "ckpt_00000001").mkdir()  # a prune killed half-way (older llmc)
    (tmp_path / "ckpt_00000001" / "model.npy").write_bytes(b"x")
    assert main(TINY + ["--max-steps", "3", "--out-dir", str(tmp_path), "--resume", "auto"]) == 0
    assert "removed what an interrupted save left: ckpt_00000001, ckpt_00000009.tmp" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_00000002", "ckpt_00000003"]


def test_resume_at_max_steps_says_so(tmp_path, capsys):
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path), "--resume", "auto"]) == 0
    assert "at or past --max-steps 2: nothing to train" in capsys.readouterr().out


def test_resume_auto_in_empty_dir_says_so(tmp_path, capsys):
    assert main(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path), "--resume", "auto"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out


# ---- flags, end-of-run work, data ---------------------------------------------------------

@pytest.mark.parametrize("flag, value, expect", [
    ("eps", 0.0, "--eps must be a finite number > 0"), ("eps", float("nan"), "--eps"),
    ("weight_decay", float("inf"), "--weight-decay must be a finite number >= 0"),
    ("weight_decay", -0.1, "--weight-decay"), ("grad_clip", float("nan"), "--grad-clip"),
    ("beta1", 1.0, "--beta1 must be in [0, 1)"), ("beta2", -0.5, "--beta2"), ("beta2", float("nan"), "--beta2"),
    ("lr", float("nan"), "--lr must be a finite number > 0"), ("lr", float("inf"), "--lr"),
    ("lr_decay_frac", float("nan"), "--lr-decay-frac"), ("warmup_steps", -1, "--warmup-steps"),
    ("sample_tokens", 100000, "--sample-tokens 100000 is above the model's context"),
    ("hellaswag_limit", 0, "--hellaswag-limit must be >= 1"),
    ("skip_update_lossz", -1.0, "--skip-update-lossz"),
])
def test_bad_optimizer_and_schedule_flags(flag, value, expect):
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        resolve(TrainConfig(**{flag: value}), "cpu")


def test_end_of_run_work_comes_after_the_final_checkpoint(tmp_path, monkeypatch):
    from llmc import eval as llmc_eval
    from llmc.eval import save_examples
    from llmc.tokenizer import encode
    hs = save_examples(tmp_path / "hs.npz", [(encode("a b"), [encode(" c")] * 4, 0)])

    def broken(*a, **k):
        raise ValueError("hs.npz: token 60000 is not below the vocabulary")
    monkeypatch.setattr(llmc_eval, "hellaswag_eval", broken)
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path / "o"), "--hellaswag", str(hs)]) == 2
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "o")] == ["ckpt_00000002"]


def test_split_metadata_is_checked(tmp_path, capsys):
    from llmc.datasets import tinyshakespeare
    train, val = tinyshakespeare()
    r = _cli(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path / "a"), "--train-data", str(train),
                     "--val-data", str(train)])
    _one_line_error(r, "used for both --train-data and --val-data")
    assert main(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path / "b"), "--train-data", str(val),
                        "--val-data", str(train)]) == 0
    err = capsys.readouterr().err
    assert "--train-data: 1 of 1 shard(s) are labelled 'val', not 'train'" in err
    assert "--val-data: 1 of 1 shard(s) are labelled 'train', not 'val'" in err


def test_val_says_how_much_it_covers(tmp_path, capsys):
    assert main(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # tiny-shakespeare's 32,768 validation tokens hold 1023 rows of 33; 2 batches of 2 read 4
    assert "(2 batches: 4 of the split's 1023 rows (0%))" in out
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_rows"] for r in rows if "val_loss" in r] == [4]


# ---- outlier guard, progress --------------------------------------------------------------

def test_outlier_detector_matches_numpy():
    rng = np.random.default_rng(0)
    d = OutlierDetector(window=16)
    xs = rng.standard_normal(40) + 5
    for i, x in enumerate(xs):
        z = d.update(x)
        if i < 16:
            assert np.isnan(z)
        else:
            w = xs[i - 16:i]
            assert z == pytest.approx((x - w.mean()) / w.std(), rel=1e-12)
    assert d.update(float("nan")) != d.update(1e9) or True
    assert np.isnan(d.values).sum() == 0  # a NaN never joins the window


def test_guard_skips_the_update_on_cpu(tmp_path, monkeypatch):
    """A window of 2 and a tiny gradz limit (here steps 5 and 7 are skipped): skipped steps are
    logged, and a resume keeps making the same decisions (the windows are in the checkpoint)."""
    import llmc.train as train_mod
    monkeypatch.setattr(train_mod, "OutlierGuard", lambda lz, gz: OutlierGuard(lz, gz, window=2))
    flags = TRAJ + ["--max-steps", "8", "--skip-update-gradz", "0.01"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(flags + ["--out-dir", str(ref)]) == 0
    rows = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    skipped = [r["step"] for r in rows if r["skipped"]]
    assert 0 < len(skipped) < 8 and all(s >= 2 for s in skipped)
    assert all(rows[s]["gradz"] > 0.01 for s in skipped)
    assert all(r["gradz"] is None or r["gradz"] <= 0.01 for r in rows if not r["skipped"])
    assert main(flags + ["--out-dir", str(out), "--checkpoint-every", "4", "--keep-checkpoints", "3"]) == 0
    shutil.rmtree(out / "ckpt_00000008")  # as if the run had died after step 4
    assert main(flags + ["--out-dir", str(out), "--resume", "auto"]) == 0
    assert _losses(out) == _losses(ref)


@pytest.mark.gpu
def test_guard_skips_on_gpu(tmp_path, monkeypatch):
    """The GPU path's split update (norm, host decision, update or skip): a skipped step leaves
    the weights bitwise as they were; decisions survive a resume."""
    import llmc.train as train_mod
    from llmc import trainer
    monkeypatch.setattr(train_mod, "OutlierGuard", lambda lz, gz: OutlierGuard(lz, gz, window=2))
    seen = []
    real = trainer.GPUBackend.train_step

    def spy(self, loader, accum, lr, step, skip=None):
        before = self.model.params.get()
        out = real(self, loader, accum, lr, step, skip=skip)
        seen.append((step, np.array_equal(before, self.model.params.get())))
        return out
    monkeypatch.setattr(trainer.GPUBackend, "train_step", spy)
    flags = ["--device", "cuda", "--model", "d4", "--n-layer", "2", "--batch-size", "4",
             "--seq-len", "64", "--max-steps", "10", "--lr", "1e-3", "--val-steps", "1",
             "--sample-tokens", "4", "--skip-update-gradz", "0.01"]
    assert main(flags + ["--out-dir", str(tmp_path / "ref")]) == 0
    rows = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    skipped = {r["step"] for r in rows if r["skipped"]}
    assert skipped and {s for s, unchanged in seen if unchanged} == skipped


def test_guard_skip_keeps_weights():
    from llmc.trainer import CPUBackend
    cfg = resolve(TrainConfig(model="d4", n_layer=1, n_embd=32, n_head=2, batch_size=2, seq_len=16), "cpu")
    from llmc.data import DataLoader
    from llmc.datasets import tinyshakespeare
    from llmc.params import init_params
    be = CPUBackend(cfg, cfg.model_config())
    be.load_params(init_params(cfg.model_config(), 0))
    loader = DataLoader([tinyshakespeare()[0]], 2, 16)
    before = be.params_for_checkpoint()
    seen = []
    loss, norm = be.train_step(loader, 1, 1e-3, 0, skip=lambda l, n: seen.append((l, n)) or True)
    assert seen == [(loss, norm)] and norm > 0
    np.testing.assert_array_equal(be.params_for_checkpoint(), before)
    be.train_step(loader, 1, 1e-3, 1, skip=lambda l, n: False)
    assert not np.array_equal(be.params_for_checkpoint(), before)


def test_progress_eta_and_summary():
    now = [1000.0]
    p = Progress(total_steps=10, tokens_per_step=1000, start_step=2, clock=lambda: now[0])
    now[0] += 30
    p.step(30.0)  # the first step (compiles) is not used for the rate
    assert "ETA ?" in p.line()
    for _ in range(3):
        now[0] += 2
        p.step(2.0)
    line = p.line()
    assert "6.00k/10.00k tok (60%)" in line and "0:00:36 elapsed" in line and "ETA 0:00:08, done ~" in line
    assert p.summary().startswith("4 steps (2->6 of 10), 4.00k tokens in 0:00:36")


def test_step_line_has_eta(tmp_path, capsys):
    assert main(TINY + ["--max-steps", "3", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step     3/3 |" in out and "tok (100%)" in out and "ETA 0:00:00" in out
    assert "done: 3 steps (0->3 of 3)" in out


def test_impossible_size_is_one_line(tmp_path):
    args = list(TINY)
    args[args.index("--batch-size") + 1] = "1000000000"
    r = _cli(args + ["--max-steps", "1", "--out-dir", str(tmp_path)])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()  # one-line warnings (fewer rows than a batch), the error
    assert all(l.startswith("warning: DataLoader: the shards hold") for l in lines[:-1]), r.stderr
    assert lines[-1].startswith("error: out of host memory") and "--batch-size" in lines[-1]
