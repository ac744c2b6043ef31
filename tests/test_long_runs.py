"""Long runs you can trust (issue #13), the rest: the out-dir lock and the used-directory
check, flag validation, end-of-run work after the final checkpoint, split metadata, validation
coverage, the outlier guard (CPU, GPU, resume), the ETA on the step line, impossible sizes.
Preemption and checkpoint integrity have their own files (test_preemption.py,
test_checkpoint_integrity.py).

Run: pytest tests/test_long_runs.py
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmc.training import checkpoint
from llmc.config import ConfigError, TrainConfig, resolve
from llmc.training.guard import OutlierDetector, OutlierGuard
from llmc.training.progress import Progress
from llmc.training.runlock import RunLock
from llmc.train import main
from tests.run_helpers import TINY, TRAJ, cli, env, losses, one_line_error


# ---- the out-dir: lock, used directory ----------------------------------------------------

def test_second_run_on_locked_out_dir_refuses(tmp_path):
    with RunLock(tmp_path):
        r = cli(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path)])
    one_line_error(r, f"in use by another run (PID {os.getpid()} on host ")
    assert not (tmp_path / "metrics.jsonl").exists()
    assert main(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path)]) == 0  # released: fine


@pytest.mark.slow
def test_two_racing_runs_one_wins(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "llmc.train", *TINY, "--max-steps", "5",
                               "--out-dir", str(tmp_path)], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "in use by another run" in loser or "holds another run" in loser
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000005"]
    assert sorted(losses(tmp_path)) == list(range(5))


def test_fresh_run_in_used_out_dir(tmp_path):
    assert main(TINY + ["--max-steps", "3", "--out-dir", str(tmp_path)]) == 0
    r = cli(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path)])
    one_line_error(r, "holds another run (ckpt_00000003, metrics.jsonl); pass --resume auto")
    assert sorted(losses(tmp_path)) == [0, 1, 2]  # the old run's metrics are untouched
    r = cli(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path), "--overwrite", "--resume", "auto"])
    one_line_error(r, "--overwrite deletes the run that --resume would continue")
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path), "--overwrite"]) == 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000002"]
    assert sorted(losses(tmp_path)) == [0, 1]


def test_failed_start_does_not_block_the_next(tmp_path):
    r = cli(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path), "--train-data", str(tmp_path / "typo.arrow")])
    one_line_error(r, "typo.arrow")
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
    from llmc.data.tokenizer import encode
    hs = save_examples(tmp_path / "hs.npz", [(encode("a b"), [encode(" c")] * 4, 0)])

    def broken(*a, **k):
        raise ValueError("hs.npz: token 60000 is not below the vocabulary")
    monkeypatch.setattr(llmc_eval, "hellaswag_eval", broken)
    assert main(TINY + ["--max-steps", "2", "--out-dir", str(tmp_path / "o"), "--hellaswag", str(hs)]) == 2
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "o")] == ["ckpt_00000002"]


def test_split_metadata_is_checked(tmp_path, capsys):
    from llmc.data.datasets import tinyshakespeare
    train, val = tinyshakespeare()
    r = cli(TINY + ["--max-steps", "1", "--out-dir", str(tmp_path / "a"), "--train-data", str(train),
                     "--val-data", str(train)])
    one_line_error(r, "used for both --train-data and --val-data")
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
    assert losses(out) == losses(ref)


@pytest.mark.gpu
def test_guard_skips_on_gpu(tmp_path, monkeypatch):
    """The GPU path's split update (norm, host decision, update or skip): a skipped step leaves
    the weights bitwise as they were; decisions survive a resume."""
    import llmc.train as train_mod
    from llmc.training import trainer
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
    from llmc.training.trainer import CPUBackend
    cfg = resolve(TrainConfig(model="d4", n_layer=1, n_embd=32, n_head=2, batch_size=2, seq_len=16), "cpu")
    from llmc.data.loader import DataLoader
    from llmc.data.datasets import tinyshakespeare
    from llmc.model.params import init_params
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
    r = cli(args + ["--max-steps", "1", "--out-dir", str(tmp_path)])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()  # one-line warnings (fewer rows than a batch), the error
    assert all(l.startswith("warning: DataLoader: the shards hold") for l in lines[:-1]), r.stderr
    assert lines[-1].startswith("error: out of host memory") and "--batch-size" in lines[-1]
