"""Two GPUs: NCCL collectives, DataParallel/ZeRO-1 against one GPU, the watchdog, and training.

- every Dist collective (all-reduce sum/avg, reduce, broadcast, reduce-scatter, all-gather,
  grouped reduces on a side stream, a 0-d average, barrier, broadcast_object) in fp32 and bf16
  gives exactly the host sums (small integers: exact in bf16);
- DataParallel, zero 0 and 1, fp32 and bf16: 3 steps of a small GPT-2 with each rank's half of
  the batch equal one GPUModel + GPUAdamW on the whole batch (loss, grad norm, weights), every
  rank ends with the same weights, ZeRO-1 halves the optimizer memory;
- a rank that never reaches a collective: the other exits within LLMC_DIST_TIMEOUT naming it;
- `python -m llmc.launch --nproc-per-node 2 -- ...` for 10 steps equals `python -m llmc.train`
  on one GPU with twice the batch (same tokens per step): losses within 1e-5 (fp32) / 1e-2
  (bf16) relative, with --zero 0 and --zero 1.

Run (a machine with 2+ GPUs): python -m pytest -m multigpu tests/test_multigpu.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multigpu

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.update(extra)
    return env


def _launch(args, timeout=900, **env):
    return subprocess.run([sys.executable, "-m", "llmc.launch", *args], env=_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _probe(tmp_path, mode, **env):
    r = _launch(["--nproc-per-node", "2", "--module", "multigpu_probe", "--", str(tmp_path), mode], **env)
    return r, {k: json.loads((tmp_path / f"rank{k}.json").read_text())
               for k in range(2) if (tmp_path / f"rank{k}.json").exists()}


def test_collectives(tmp_path):
    r, got = _probe(tmp_path, "collectives")
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        assert got[rank]["checks"] and all(ok for _, ok in got[rank]["checks"]), got[rank]


def test_data_parallel_equals_one_gpu(tmp_path):
    r, got = _probe(tmp_path, "dataparallel")
    assert r.returncode == 0, r.stderr[-4000:]
    rep = got[0]
    print(json.dumps(rep, indent=1))
    assert rep["fp32 zero=1"]["optimizer_bytes"] * 2 <= rep["fp32 zero=0"]["optimizer_bytes"] + 4096


def test_hung_rank_is_named(tmp_path):
    r, _ = _probe(tmp_path, "hang", LLMC_DIST_TIMEOUT="15")
    assert r.returncode == 3, r.stderr[-4000:]
    assert "[rank 0] error: all_reduce (collective #2) has not completed" in r.stderr, r.stderr[-4000:]
    assert "rank 1 never issued it" in r.stderr


TRAIN = ["--model", "d6", "--seq-len", "256", "--max-steps", "10", "--total-batch-size", "2048",
         "--val-steps", "2", "--sample-tokens", "8"]


def _losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    """The single-GPU baselines, one per dtype, batch 8 = 2 ranks x 4."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path_factory.mktemp(f"one_{dtype}")
        r = subprocess.run([sys.executable, "-m", "llmc.train", *TRAIN, "--batch-size", "8",
                            "--dtype", dtype, "--out-dir", str(out)], env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        runs[dtype] = _losses(out)
    return runs


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_two_gpus_train_like_one(tmp_path, one_gpu, dtype, tol, zero):
    r = _launch(["--nproc-per-node", "2", "--", *TRAIN, "--batch-size", "4", "--dtype", dtype,
                 "--zero", str(zero), "--out-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-4000:]
    two, one = _losses(tmp_path), one_gpu[dtype]
    assert sorted(two) == sorted(one) == list(range(10))
    for step in range(10):
        rel = abs(two[step] - one[step]) / abs(one[step])
        assert rel <= tol, f"step {step}: 2 GPUs {two[step]} vs 1 GPU {one[step]} ({rel:.2e} > {tol})"
