"""bench/eight_gpus.py (issue #15's one command) without a GPU: the report's arithmetic (loss
comparisons, data sizes, the 10B-token projection, summary.md, merging calls), argument
validation, --dry-run's commands for 8 and 2 GPUs, the process supervisor (timeout, a killed
rank among real watchdogs), and the data/seed/resume parts end to end on the CPU.

Run:  pytest tests/test_eight_gpus.py
"""
import json
import math
import sys
import time

import pytest

from bench import eight_gpus, eight_gpus_report as report
from bench.processes import Runner, kill_one_rank
from llmc.launch import child_env
from tests.test_distributed import PROBE, free_port


# ---- the report's arithmetic --------------------------------------------------------------

def test_projection():
    p = report.project(140.0, 524_288, 8, 2.0)
    assert p["steps"] == math.ceil(1e10 / 524_288) == 19_074
    assert p["hours"] == pytest.approx(19_074 * 0.140 / 3600)
    assert p["gpu_hours"] == pytest.approx(8 * p["hours"])
    assert p["cost"] == pytest.approx(2.0 * 8 * 19_074 * 0.140 / 3600)  # about $11.87
    assert p["tokens_per_s"] == pytest.approx(524_288 / 0.140)
    assert report.project(100.0, 1000, 1, 0.0, tokens=1e6)["cost"] == 0
    for bad in [(0, 524_288, 8, 2.0), (140, 524_288, 0, 2.0), (140, 524_288, 8, -1.0)]:
        with pytest.raises(ValueError):
            report.project(*bad)


def test_hms():
    assert report.hms(0) == "0:00:00" and report.hms(3725.4) == "1:02:05"


def test_compare():
    a = {0: 10.0, 1: 9.5, 2: 9.0}
    same = report.compare(dict(a), a)
    assert same["bitwise"] and same["ok"] and same["steps"] == 3 and same["first_diff"] is None
    b = {0: 10.0, 1: 9.5 * (1 + 2e-6), 2: 9.0 * (1 - 5e-6)}
    c = report.compare(b, a)
    assert not c["bitwise"] and not c["ok"] and c["first_diff"] == 1
    assert c["worst_step"] == 2 and c["max_rel"] == pytest.approx(5e-6)
    assert report.compare(b, a, tol=1e-5)["ok"] and not report.compare(b, a, tol=1e-6)["ok"]
    short = report.compare({0: 10.0}, a, tol=1.0)
    assert not short["ok"] and short["missing"] == [1, 2]
    assert not report.compare({}, {}, tol=1.0)["ok"]


def test_step_times_and_losses():
    rows = [{"step": s, "loss": 10.0 - s, "ms": 1000.0 if s < 2 else 100.0 + s} for s in range(6)]
    rows.append({"step": 5, "val_loss": 4.5, "val_rows": 8})
    t = report.step_times(rows, warmup=2)
    assert t == {"median_ms": 103.5, "mean_ms": 103.5, "timed_steps": 4}
    assert report.losses(rows) == {s: 10.0 - s for s in range(6)}
    assert report.val_losses(rows) == {5: 4.5}
    with pytest.raises(ValueError):
        report.step_times(rows, warmup=6)


def test_data_sizes_never_repeat_a_row():
    steps, tps, T = 200, 524_288, 1024
    train, val = report.data_sizes(steps, tps, T, val_rows=10 * 64 * 8)
    shard = 100_000_000
    sizes = [shard] * (train // shard) + ([train % shard] if train % shard else [])
    assert report.rows_available(sizes, T) >= steps * tps // T
    assert train < steps * tps * 1.01
    assert (val - 1) // T == 10 * 64 * 8
    assert report.rows_available([T, T + 1, 3 * T + 1], T) == 1 + 3


def test_merge_keeps_what_ran():
    a = {"meta": {"gpus": 8}, "parts": {"seed": {"status": "ok", "x": 1}, "kill": {"status": "not run"}}}
    b = {"meta": {"date": "d"}, "parts": {"seed": {"status": "not run"}, "kill": {"status": "ok", "y": 2}}}
    m = report.merge([a, b])
    assert m["meta"] == {"gpus": 8, "date": "d"}
    assert m["parts"]["seed"] == {"status": "ok", "x": 1} and m["parts"]["kill"]["y"] == 2


def _full_summary():
    proj = report.project(142.0, 524_288, 8, 2.0)
    cmp_ok = report.compare({0: 1.0}, {0: 1.0})
    return {"meta": {"gpus": 8, "gpu_name": "NVIDIA H200", "commit": "abc123", "date": "2026-12-01",
                     "command": "python bench/eight_gpus.py --out OUT"},
            "parts": {
                "data": {"status": "ok", "wall_s": 4, "train_tokens": 105_000_000,
                         "val_tokens": 5_242_881, "rows_needed": 102_400, "rows_available": 102_538},
                "scaling": {"status": "ok", "wall_s": 200, "steps": 30, "warmup": 5,
                            "command": "python bench/scaling.py --gpus 1,2,4,8",
                            "results": [{"gpus": 1, "zero": 0, "tokens_per_s": 500_000, "step_ms": 131,
                                         "mem_gb_per_gpu": 22.8, "efficiency": 1.0},
                                        {"gpus": 8, "zero": 1, "tokens_per_s": 3_840_000, "step_ms": 136,
                                         "mem_gb_per_gpu": 22.1, "efficiency": 0.96}],
                            "failed": [{"gpus": 8, "zero": 0, "error": "boom"}],
                            "top": {"gpus": 8, "zero": 1, "tokens_per_s": 3_840_000, "efficiency": 0.96}},
                "seed": {"status": "ok", "wall_s": 60, "command": "python -m llmc.launch ...", "gpus": 8,
                         "warmup": 10, "steps": 200, "tokens_per_step": 524_288, "median_ms": 141.0,
                         "mean_ms": 142.0, "timed_steps": 190, "first_loss": 10.9, "final_loss": 6.1,
                         "val_losses": {"99": 6.5, "199": 6.0},
                         "checkpoints": ["ckpt_00000100", "ckpt_00000200"], "verified": True,
                         "data_part": {"train_tokens": 105_000_000, "val_tokens": 5_242_881,
                                       "rows_needed": 102_400, "rows_available": 102_538},
                         "projection": proj},
                "resume": {"status": "ok", "wall_s": 80, "rc_stop": 75, "rc_resume": 0,
                           "signalled_after": 80, "stop_checkpoint": "ckpt_00000081", **cmp_ok,
                           "steps": 200, "before": cmp_ok, "after": cmp_ok, "val": cmp_ok},
                "reshard": {"status": "ok", "wall_s": 15, "rc": 2, "command": "python -m llmc.launch ...",
                            "from_gpus": 8, "gpus": 4, "verdict": "refused with the fix named",
                            "message": "error: ... resume with --nproc-per-node/world size 8"},
                "equiv": {"status": "fail", "wall_s": 60, "runs": [
                    {"dtype": "fp32", "zero": 1, "tol": 1e-5, "steps": 20, "max_rel": 3e-7,
                     "worst_step": 12, "ok": True},
                    {"dtype": "bf16", "zero": 1, "tol": 1e-2, "steps": 20, "max_rel": 2e-2,
                     "worst_step": 19, "ok": False}]},
                "kill": {"status": "ok", "wall_s": 70, "gpus": 8, "killed": 4, "timeout_s": 30,
                         "limit_s": 38, "kill_after_s": 2, "checkpoint_before_kill": "ckpt_00000010",
                         "ranks": [{"rank": r, "rc": -9 if r == 4 else 3, "exit_s": 31.0 + r / 10}
                                   for r in range(8)],
                         "all_three": True, "newest_intact": "ckpt_00000020", "leftovers": [],
                         "message": "[rank 0] error: rank 4 stopped responding"}}}


def test_render_holds_every_table():
    md = report.render(_full_summary())
    assert md.startswith("# Issue #15 on 8× NVIDIA H200")
    assert "| 8 | 1 | 3,840,000 | 480,000 | 136.0 | 96.0% | 22.1 |" in md
    assert "| 8 | 0 | failed |" in md
    assert "At 8 GPUs with ZeRO-1: 96.0% of linear (target ≥ 95%)" in md
    assert "| step time at 524,288 tokens (median / mean of steps 10..199) | 141.0 / 142.0 ms | 140 ms |" in md
    assert "$2.00 per GPU-hour (assumed: `--price-per-gpu-hour`)" in md
    assert "| 10B | 19,074 | 0:45:09 | 6.0 | $12.04 |" in md
    assert "102,538 rows for the 102,400 the run takes" in md
    assert "- all 200 steps: bitwise equal" in md
    assert "exit 2, refused with the fix named" in md and "world size 8" in md
    assert "| bf16 | 1 | 20 | 2.00e-02 | 19 | 0.01 | **FAIL** |" in md
    assert "| 4 | SIGKILL (killed) |" in md and "| 0 | 3 | 31.0 |" in md
    assert "exited with code 3 within 38 s" in md and ": yes" in md
    assert "| equiv | **FAIL** | 60 |" in md


def test_render_of_parts_not_run():
    md = report.render({"meta": {"gpus": 2}, "parts": {"seed": {"status": "error", "error": "Traceback x"},
                                                      "kill": {"status": "skipped: needs 2+ GPUs"}}})
    assert "| scaling | not run | 0 |" in md and "## A killed rank (skipped: needs 2+ GPUs)" in md
    assert "Traceback x" in md and "(needs the seed part)" not in md.split("## 10B")[0]


# ---- arguments and --dry-run --------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "8", "--parts", "seed,bogus"], "unknown part bogus"),
    (["--gpus", "8", "--price-per-gpu-hour", "-1"], "--price-per-gpu-hour must be >= 0"),
    (["--gpus", "8", "--total-batch-size", "100000"], "is not a multiple of batch-size * seq-len * N"),
    (["--gpus", "8", "--seed-steps", "3"], "--seed-steps must be >= 4"),
    (["--gpus", "8", "--stop-step", "199"], "--stop-step must be in [1, --seed-steps - 2 = 198]"),
    (["--gpus", "8", "--kill-rank", "8"], "--kill-rank must be in [0, 8)"),
    (["--gpus", "8", "--equiv-zero", "2"], "--equiv-zero takes 0, 1 or 0,1"),
    (["--gpus", "8", "--kill-timeout-s", "0"], "--kill-timeout-s must be > 0"),
    (["--device", "cpu", "--gpus", "2"], "--device cpu runs one process"),
    (["--report", "x.json"], "--report needs --out"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        eight_gpus.parse_args(["--dry-run", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_more_gpus_than_visible(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(SystemExit):
        eight_gpus.parse_args(["--gpus", "4"])
    assert "--gpus 4: only 2 GPU(s) visible" in capsys.readouterr().err
    assert eight_gpus.parse_args([]).gpus == 2


def test_scaling_gpus():
    assert eight_gpus.scaling_gpus(8) == [1, 2, 4, 8]
    assert eight_gpus.scaling_gpus(2) == [1, 2]
    assert eight_gpus.scaling_gpus(6) == [1, 2, 4, 6]
    assert eight_gpus.scaling_gpus(1) == [1]


def _dry(tmp_path, capsys, *argv):
    work = tmp_path / "work"
    assert eight_gpus.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(work), *argv]) == 0
    assert not work.exists()  # nothing ran
    return [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]


def test_dry_run_on_eight(tmp_path, capsys):
    cmds = _dry(tmp_path, capsys, "--gpus", "8")
    w = str(tmp_path / "work")
    assert len(cmds) == 1 + 1 + 1 + 2 + 1 + 4 + 1
    assert "-m data_tools.synthetic --tokens 110103557 --val-tokens 5242881" in cmds[0]
    assert "bench/scaling.py --gpus 1,2,4,8 --zero 0,1 --model d12 --batch-size 64 --seq-len 1024 " \
           "--steps 30" in cmds[1] and f"--train-data '{w}/data/synthetic_train_*.arrow'" in cmds[1]
    seed = ("--nproc-per-node 8 --master-port 29601 -- --device cuda --model d12 --batch-size 64 "
            "--seq-len 1024 --total-batch-size 524288 --max-steps 200 --val-every 100 --val-steps 10 "
            "--checkpoint-every 100")
    assert seed in cmds[2] and cmds[2].endswith(f"--out-dir {w}/seed")
    assert "SIGTERM once 80 steps are logged" in cmds[3] and cmds[4].endswith("--resume auto")
    assert "--nproc-per-node 4" in cmds[5] and f"--resume {w}/seed/ckpt_00000100" in cmds[5]
    assert cmds[6].startswith("CUDA_VISIBLE_DEVICES=0 ") and "llmc.train" in cmds[6]
    assert "--total-batch-size 8192 --max-steps 20" in cmds[6] and "--dtype fp32" in cmds[6]
    assert "--nproc-per-node 8" in cmds[7] and "--dtype fp32 --zero 1" in cmds[7]
    assert "--dtype bf16 --zero 1" in cmds[9]
    assert cmds[10].startswith("LLMC_DIST_TIMEOUT=30 ") and "--checkpoint-every 10" in cmds[10]
    assert "x8 ranks" in cmds[10] and "SIGKILL rank 4" in cmds[10]


def test_dry_run_on_two(tmp_path, capsys):
    cmds = _dry(tmp_path, capsys, "--gpus", "2", "--parts", "scaling,reshard,equiv,kill",
                "--equiv-zero", "0,1", "--", "--weight-decay", "0.1")
    assert "--gpus 1,2 --zero 0,1" in cmds[0] and "--train-data" not in cmds[0]  # no data part
    assert "--nproc-per-node 1" in cmds[1] and "--weight-decay 0.1" in cmds[1]
    assert "--total-batch-size 2048" in cmds[2]
    assert sum("--zero 0 --out-dir" in c for c in cmds) == 2 == sum("--zero 1 --out-dir" in c for c in cmds)
    assert "x2 ranks" in cmds[-1] and "SIGKILL rank 1" in cmds[-1]


# ---- the process supervisor ---------------------------------------------------------------

def test_runner_timeout_stops_the_tree(tmp_path):
    r = Runner(tmp_path, tmp_path / "log.txt")
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    t0 = time.monotonic()
    res = r.run([sys.executable, "-c", code], timeout=1.0)
    assert res["timed_out"] and res["rc"] is None and time.monotonic() - t0 < 30
    assert "TIMED OUT" in (tmp_path / "log.txt").read_text()


def test_killed_rank_among_watchdogs(tmp_path):
    """Three CPU ranks meet and run llmc's watchdog (tests/dist_probe.py); rank 1 gets SIGKILL:
    the others must exit 3 within the 2 s timeout (plus a heartbeat)."""
    import types
    ns = types.SimpleNamespace(nproc_per_node=3, node_rank=0, nnodes=1, master_port=free_port(),
                               master_addr="127.0.0.1", rendezvous=None)
    envs = [child_env(ns, r, {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROBE.parents[1])})
            for r in range(3)]
    got = kill_one_rank([sys.executable, PROBE, tmp_path, "2", "watch"], envs, tmp_path / "logs",
                        ready=lambda: all((tmp_path / f"rank{r}.json").exists() for r in range(3)),
                        victim=1, delay_s=0.3, wait_s=30)
    assert got["error"] is None, got
    assert got["rc"][1] == -9 and got["rc"][0] == got["rc"][2] == 3, got
    assert max(got["exit_s"][0], got["exit_s"][2]) < 2 * 1.1 + 5
    assert "rank 1 stopped responding" in (tmp_path / "logs" / "rank0.err").read_text()


# ---- data, seed and resume on the CPU -----------------------------------------------------

TINY = ["--device", "cpu", "--model", "d4", "--batch-size", "2", "--seq-len", "32",
        "--total-batch-size", "128", "--seed-steps", "8", "--val-steps", "2", "--",
        "--n-layer", "2", "--n-embd", "48", "--n-head", "2", "--lr", "1e-3", "--weight-decay", "0.1",
        "--warmup-steps", "2"]


def test_seed_and_resume_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    rc = eight_gpus.main(["--out", str(out), "--work", str(tmp_path / "work"), *TINY])
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert rc == 0, {k: v.get("error") for k, v in parts.items()}
    assert parts["data"]["status"] == "ok" and parts["data"]["rows_available"] >= 32
    seed = parts["seed"]
    assert seed["status"] == "ok" and seed["checkpoints"] == ["ckpt_00000004", "ckpt_00000008"]
    assert seed["projection"]["price_per_gpu_hour"] == 2.0 and seed["projection"]["gpus"] == 1
    res = parts["resume"]
    assert res["status"] == "ok" and res["rc_stop"] == 75 and res["rc_resume"] == 0
    assert res["bitwise"] and res["steps"] == 8 and res["after"]["steps"] >= 1
    for name in ("scaling", "reshard", "equiv", "kill"):
        assert parts[name]["status"] == "skipped: needs 2+ GPUs"
    md = (out / "summary.md").read_text()
    assert "- all 8 steps: bitwise equal" in md
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "resume_metrics.jsonl",
                                                     "seed_metrics.jsonl", "summary.json", "summary.md"]
    # a second call's summary merged with --report
    other = {"meta": {}, "parts": {"kill": {"status": "skipped: elsewhere"}}}
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert eight_gpus.main(["--report", str(out / "summary.json"), str(tmp_path / "b.json"),
                            "--out", str(tmp_path / "merged")]) == 0
    merged = (tmp_path / "merged" / "summary.md").read_text()
    assert "- all 8 steps: bitwise equal" in merged and "skipped: elsewhere" in merged
