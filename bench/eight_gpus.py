"""Issue #15 in one command: scaling to N GPUs, the seed configuration, resume, equivalence, a
killed rank; one summary.md ready for docs/RESULTS.md.

    python bench/eight_gpus.py --out $OUT [--gpus 8] [--work /tmp/llmc_eight_gpus]
        [--parts data,scaling,seed,resume,reshard,equiv,kill] [--price-per-gpu-hour 2.0]
        [--budget-s 560] [--dry-run] [-- <more flags for the seed-configuration runs>]
    python bench/eight_gpus.py --report A/summary.json B/summary.json --out DIR   # merge calls

N is the number of GPUs (default: every visible one; 2 or 4 run the same checks scaled down).
The parts, in this order, each under its own timeout; a failed part is reported and the next
one runs:
  data     synthetic shards (python -m data_tools.synthetic) holding --seed-steps steps of
           --total-batch-size tokens without repeating a row, plus the validation rows
  scaling  bench/scaling.py --gpus 1,2,4,..,N --zero 0,1 --steps 30 on that data: tokens/s, per
           GPU, efficiency, memory per GPU (target >= 95% of linear at N with ZeRO-1)
  seed     the seed configuration as a user runs it: python -m llmc.launch --nproc-per-node N --
           --model d12 --batch-size 64 --seq-len 1024 --total-batch-size 524288 --max-steps 200,
           validation and a checkpoint halfway and at the end; step time, tokens/s, and the wall
           time and cost of 10B tokens at --price-per-gpu-hour
  resume   the same command stopped by SIGTERM to the launcher after 40% of the steps (exit 75),
           then --resume auto: every loss bitwise equal to the uninterrupted run's
  reshard  the seed run's halfway checkpoint resumed on N/2 GPUs: resumed (losses compared), or
           refused with the fix named (the message is reported)
  equiv    N GPUs against 1 GPU with N x gradient accumulation, d6, T=256, B=4, 20 steps: losses
           within 1e-5 (fp32) and 1e-2 (bf16, as tests/test_multigpu.py), ZeRO from --equiv-zero
  kill     the seed configuration on N ranks started with llmc.launch's environment (so every
           rank's exit code is seen), LLMC_DIST_TIMEOUT=--kill-timeout-s; one rank gets SIGKILL
           after the first checkpoint: every other rank must exit 3 within the timeout, and the
           newest checkpoint must verify (checkpoint.find_intact)

Sized for one device call (< 10 min) on 8 H200s; --budget-s stops starting parts that would
not finish in time (they are marked "not run": run them with --parts in a second call and merge
the two summary.json with --report). --out receives, after every part: summary.md, summary.json,
log.txt (every command and the end of its output), seed_metrics.jsonl, resume_metrics.jsonl.
Data, runs and checkpoints (GBs) go to --work. --dry-run prints every command and runs nothing.
--device cpu runs the data, seed and resume parts on the CPU with one process (for the tests).

Run the tests:  python -m pytest tests/test_eight_gpus.py -q
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import eight_gpus_report as report  # noqa: E402
from bench.eight_gpus_report import PARTS  # noqa: E402
from bench.processes import Runner, kill_one_rank, split_passthrough, tail  # noqa: E402

EQUIV_TOL = {"fp32": 1e-5, "bf16": 1e-2}  # bf16: tests/test_multigpu.py's tolerance
MIN_S = {"data": 20, "scaling": 120, "seed": 60, "resume": 90, "reshard": 30, "equiv": 60,
         "kill": 80}  # a part is not started with less than this left of --budget-s
NEEDS_GPUS = ("scaling", "reshard", "equiv", "kill")


def parse_args(argv=None):
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python bench/eight_gpus.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="N [default: every visible GPU]")
    ap.add_argument("--out", default=None, help="summary.md, summary.json, log.txt go here")
    ap.add_argument("--work", default=None, help="data, runs, checkpoints [default: a temp dir]")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of " + ",".join(PARTS))
    ap.add_argument("--price-per-gpu-hour", type=float, default=2.0,
                    help="US$ per GPU-hour assumed for the 10B-token cost (stated in the summary)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no part once less than its minimum is left of this many seconds "
                         "(0: no budget)")
    ap.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    ap.add_argument("--report", nargs="+", default=None, metavar="SUMMARY_JSON",
                    help="merge these summary.json files into --out/summary.md, run nothing")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: data, seed and resume on the CPU with one process (tests)")
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch-size", type=int, default=64, help="B per GPU")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--total-batch-size", type=int, default=524288, help="tokens per step")
    ap.add_argument("--seed-steps", type=int, default=200)
    ap.add_argument("--val-steps", type=int, default=10, help="batches per validation")
    ap.add_argument("--stop-step", type=int, default=None,
                    help="resume part: SIGTERM once this many steps are logged [default: 40%%]")
    ap.add_argument("--scaling-steps", type=int, default=30)
    ap.add_argument("--equiv-steps", type=int, default=20)
    ap.add_argument("--equiv-zero", default="1", help="ZeRO stages of the N-GPU runs, e.g. 0,1")
    ap.add_argument("--kill-timeout-s", type=float, default=30.0, help="LLMC_DIST_TIMEOUT there")
    ap.add_argument("--kill-rank", type=int, default=None, help="[default: N // 2]")
    ap.add_argument("--kill-delay-s", type=float, default=2.0,
                    help="seconds after the first checkpoint appears before the SIGKILL")
    args = ap.parse_args(argv)
    args.extra = extra
    if args.report is not None:
        if args.out is None:
            ap.error("--report needs --out DIR (where summary.md goes)")
        missing = [p for p in args.report if not Path(p).is_file()]
        if missing:
            ap.error(f"--report: no such file {missing[0]}")
        return args
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"--parts: unknown part {unknown[0] if unknown else '(none given)'}; choose "
                 f"from {','.join(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    visible = _visible_gpus() if args.device == "cuda" else None
    if args.gpus is None:
        if args.device == "cpu":
            args.gpus = 1
        elif visible:
            args.gpus = visible
        elif args.dry_run:
            args.gpus = 8
        else:
            ap.error("cannot count the GPUs (no nvidia-smi, no CUDA_VISIBLE_DEVICES); give --gpus N")
    n = args.gpus
    if n < 1:
        ap.error(f"--gpus must be >= 1, got {n}")
    if args.device == "cpu" and n != 1:
        ap.error("--device cpu runs one process: --gpus 1")
    if args.device == "cuda" and not args.dry_run and visible is not None and n > visible:
        ap.error(f"--gpus {n}: only {visible} GPU(s) visible on this machine")
    for flag in ("batch_size", "seq_len", "total_batch_size", "scaling_steps", "equiv_steps",
                 "val_steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.total_batch_size % (args.batch_size * args.seq_len * n):
        ap.error(f"--total-batch-size {args.total_batch_size} is not a multiple of batch-size * "
                 f"seq-len * N = {args.batch_size * args.seq_len * n}")
    if args.seed_steps < 4:
        ap.error(f"--seed-steps must be >= 4 (a checkpoint halfway, a stop before it), got "
                 f"{args.seed_steps}")
    if args.stop_step is None:
        args.stop_step = max(1, int(args.seed_steps * 0.4))
    if not 1 <= args.stop_step <= args.seed_steps - 2:
        ap.error(f"--stop-step must be in [1, --seed-steps - 2 = {args.seed_steps - 2}], got "
                 f"{args.stop_step}")
    if not args.price_per_gpu_hour >= 0:
        ap.error(f"--price-per-gpu-hour must be >= 0, got {args.price_per_gpu_hour}")
    if not args.budget_s >= 0:
        ap.error(f"--budget-s must be >= 0, got {args.budget_s}")
    if not args.kill_timeout_s > 0 or not args.kill_delay_s >= 0:
        ap.error("--kill-timeout-s must be > 0 and --kill-delay-s >= 0")
    if args.kill_rank is None:
        args.kill_rank = n // 2
    if not 0 <= args.kill_rank < n:
        ap.error(f"--kill-rank must be in [0, {n}), got {args.kill_rank}")
    try:
        args.equiv_zero = sorted({int(z) for z in args.equiv_zero.split(",")})
    except ValueError:
        args.equiv_zero = [-1]
    if not set(args.equiv_zero) <= {0, 1}:
        ap.error("--equiv-zero takes 0, 1 or 0,1")
    return args


def _visible_gpus():
    from llmc.launch import visible_gpus
    return visible_gpus()


def scaling_gpus(n: int) -> list:
    """1, 2, 4, ... below n, then n: the GPU counts of the scaling table."""
    out, w = [], 1
    while w < n:
        out.append(w)
        w *= 2
    return out + [n]


def _nvidia_smi_name() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.splitlines()[0].strip() if r.returncode == 0 and r.stdout else "GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "GPU"


def _commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# ----------------------------------------------------------------------------------------------
# the parts

class Context:
    def __init__(self, args, runner: Runner):
        self.args, self.r = args, runner
        self.work = Path(args.work)
        self.n = args.gpus
        self.port = 29600
        self.py = sys.executable
        self.data_part = {}  # the data part's result, quoted under the seed configuration

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    def data_flags(self) -> list:
        if (self.data_dir / "synthetic_summary.json").is_file() or (
                self.r.dry and "data" in self.args.parts):
            return ["--train-data", str(self.data_dir / "synthetic_train_*.arrow"),
                    "--val-data", str(self.data_dir / "synthetic_val_*.arrow")]
        return []

    def launch(self, n: int) -> list:
        self.port += 1
        return [self.py, "-m", "llmc.launch", "--nproc-per-node", str(n), "--master-port",
                str(self.port), "--"]

    def seed_flags(self, out_dir, extra=()) -> list:
        a = self.args
        half = a.seed_steps // 2
        return ["--device", a.device, "--model", a.model, "--batch-size", str(a.batch_size),
                "--seq-len", str(a.seq_len), "--total-batch-size", str(a.total_batch_size),
                "--max-steps", str(a.seed_steps), "--val-every", str(half), "--val-steps",
                str(a.val_steps), "--checkpoint-every", str(half), "--sample-tokens", "16",
                "--log-every", "20", *self.data_flags(), *a.extra, "--out-dir", str(out_dir),
                *extra]

    def fresh(self, path: Path) -> Path:
        if path.exists() and not self.r.dry:
            shutil.rmtree(path)
        return path


def part_data(ctx: Context) -> dict:
    a = ctx.args
    train, val = report.data_sizes(a.seed_steps, a.total_batch_size, a.seq_len,
                                   a.val_steps * a.batch_size * ctx.n)
    summary_path = ctx.data_dir / "synthetic_summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("tokens") == train + val:
        ctx.r.say(f"reusing {ctx.data_dir} ({train + val:,} tokens)")
        res = {"rc": 0, "wall_s": 0.0, "reused": True}
    else:
        res = ctx.r.run([ctx.py, "-m", "data_tools.synthetic", "--tokens", str(train + val),
                         "--val-tokens", str(val), "--out", str(ctx.fresh(ctx.data_dir))], 300)
    if res.get("dry"):
        return {"status": "dry run"}
    if res["rc"] != 0:
        return {"status": "error", "error": res["err"], "wall_s": res["wall_s"]}
    s = json.loads(summary_path.read_text())
    have = report.rows_available([x["tokens"] for x in s["shards"] if x["split"] == "train"],
                                 a.seq_len)
    need = a.seed_steps * a.total_batch_size // a.seq_len
    return {"status": "ok" if have >= need else "fail", "wall_s": res["wall_s"],
            "train_tokens": s["train_tokens"], "val_tokens": s["val_tokens"],
            "rows_needed": need, "rows_available": have, "shards": len(s["shards"])}


def part_scaling(ctx: Context) -> dict:
    a = ctx.args
    gpus = scaling_gpus(ctx.n)
    out = ctx.fresh(ctx.work / "scaling")
    cmd = [ctx.py, "bench/scaling.py", "--gpus", ",".join(map(str, gpus)), "--zero", "0,1",
           "--model", a.model, "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
           "--steps", str(a.scaling_steps), "--warmup", "5", "--out", str(out)]
    data = ctx.data_flags()
    if data:
        cmd += ["--", *data]
    runs = 1 + 2 * (len(gpus) - 1)
    res = ctx.r.run(cmd, 150 * runs, note=f"{runs} runs")
    shown = "python " + ctx.r.show(cmd[1:]).replace(str(ctx.work), "$WORK")
    if res.get("dry"):
        return {"status": "dry run"}
    if not (out / "scaling.json").is_file():
        return {"status": "error", "error": res["err"], "wall_s": res["wall_s"], "command": shown}
    s = json.loads((out / "scaling.json").read_text())
    top = next((r for r in s["results"] if r["gpus"] == ctx.n and r["zero"] == (1 if ctx.n > 1 else 0)),
               None)
    ok = top is not None and top.get("efficiency") is not None and \
        top["efficiency"] >= report.TARGET_EFFICIENCY and not s.get("failed")
    return {"status": "ok" if ok else ("fail" if top else "error"), "wall_s": res["wall_s"],
            "results": s["results"], "failed": s.get("failed", []), "top": top,
            "steps": a.scaling_steps, "warmup": 5, "command": shown, "error": res["err"]}


def part_seed(ctx: Context) -> dict:
    a = ctx.args
    out = ctx.fresh(ctx.work / "seed")
    cmd = ctx.launch(ctx.n) + ctx.seed_flags(out)
    res = ctx.r.run(cmd, 420)
    shown = "python " + ctx.r.show(cmd[1:]).replace(str(ctx.work), "$WORK")
    if res.get("dry"):
        return {"status": "dry run"}
    if res["rc"] != 0 or not (out / "metrics.jsonl").is_file():
        return {"status": "error", "error": res["err"], "wall_s": res["wall_s"], "command": shown}
    from llmc.training import checkpoint
    rows = report.read_metrics(out / "metrics.jsonl")
    shutil.copy(out / "metrics.jsonl", Path(a.out) / "seed_metrics.jsonl")
    warmup = min(10, a.seed_steps // 4)
    times = report.step_times(rows, warmup)
    ckpts = checkpoint.list_checkpoints(out)
    verified = bool(ckpts)
    for c in ckpts:
        try:
            checkpoint.verify(c, ctx.n)
        except checkpoint.CheckpointError as e:
            verified = False
            ctx.r.say(f"  checkpoint {c.name}: {e}")
    loss = report.losses(rows)
    data = ctx.data_flags()
    p = {"wall_s": res["wall_s"], "command": shown, "gpus": ctx.n, "warmup": warmup,
         "data_part": ctx.data_part,
         "steps": a.seed_steps, "tokens_per_step": a.total_batch_size, **times,
         "first_loss": loss.get(0, float("nan")), "final_loss": loss.get(a.seed_steps - 1, float("nan")),
         "val_losses": {str(k): v for k, v in report.val_losses(rows).items()},
         "checkpoints": [c.name for c in ckpts], "verified": verified,
         "data": ("synthetic shards, no row repeated" if data else "tiny-shakespeare (rows repeat)"),
         "projection": report.project(times["mean_ms"], a.total_batch_size, ctx.n,
                                      a.price_per_gpu_hour)}
    p["status"] = "ok" if len(loss) == a.seed_steps and verified else "fail"
    return p


def part_resume(ctx: Context) -> dict:
    a = ctx.args
    seed_metrics = ctx.work / "seed" / "metrics.jsonl"
    if not ctx.r.dry and not seed_metrics.is_file():
        return {"status": "skipped: needs the seed part's run in --work"}
    out = ctx.fresh(ctx.work / "resume")
    cmd = ctx.launch(ctx.n) + ctx.seed_flags(out)
    first = ctx.r.run(cmd, 420, stop=(out / "metrics.jsonl", a.stop_step),
                      note=f"SIGTERM once {a.stop_step} steps are logged; exit 75 expected")
    from llmc.training import checkpoint
    stop_ckpt = None if first.get("dry") else (checkpoint.list_checkpoints(out) or [None])[-1]
    second = ctx.r.run(ctx.launch(ctx.n) + ctx.seed_flags(out, ["--resume", "auto"]), 420)
    if first.get("dry"):
        return {"status": "dry run"}
    wall = first["wall_s"] + second["wall_s"]
    if first["rc"] != 75 or second["rc"] != 0 or stop_ckpt is None:
        return {"status": "error", "wall_s": wall, "error": first["err"] + "\n" + second["err"],
                "detail": f"stop run exit {first['rc']} (75 expected), resume exit {second['rc']}"}
    shutil.copy(out / "metrics.jsonl", Path(a.out) / "resume_metrics.jsonl")
    want_rows, got_rows = report.read_metrics(seed_metrics), report.read_metrics(out / "metrics.jsonl")
    want, got = report.losses(want_rows), report.losses(got_rows)
    k = checkpoint.read_state(stop_ckpt)["step"]
    full = report.compare(got, want)
    p = {"wall_s": wall, "rc_stop": first["rc"], "rc_resume": second["rc"],
         "signalled_after": first["signalled_after"], "stop_checkpoint": stop_ckpt.name, **full,
         "before": report.compare({s: v for s, v in got.items() if s < k},
                                  {s: v for s, v in want.items() if s < k}),
         "after": report.compare({s: v for s, v in got.items() if s >= k},
                                 {s: v for s, v in want.items() if s >= k}),
         "val": report.compare(report.val_losses(got_rows), report.val_losses(want_rows))}
    p["status"] = "ok" if full["ok"] and full["steps"] == a.seed_steps else "fail"
    return p


def part_reshard(ctx: Context) -> dict:
    a = ctx.args
    half_n, half = ctx.n // 2, a.seed_steps // 2
    ckpt = ctx.work / "seed" / f"ckpt_{half:08d}"
    if not ctx.r.dry and not ckpt.is_dir():
        return {"status": "skipped: needs the seed part's run in --work"}
    out = ctx.fresh(ctx.work / "reshard")
    cmd = ctx.launch(half_n) + ctx.seed_flags(out, ["--resume", str(ckpt)])
    res = ctx.r.run(cmd, 300, note=f"{ctx.n}-GPU checkpoint on {half_n} GPU(s)")
    shown = "python " + ctx.r.show(cmd[1:]).replace(str(ctx.work), "$WORK")
    if res.get("dry"):
        return {"status": "dry run"}
    p = {"wall_s": res["wall_s"], "rc": res["rc"], "command": shown, "from_gpus": ctx.n,
         "gpus": half_n}
    errors = [line for line in res["err"].splitlines() if line.startswith("error:")]
    if res["rc"] == 2 and errors and "resume with" in errors[0]:
        return dict(p, status="ok", verdict="refused with the fix named", message=errors[0])
    if res["rc"] == 0:
        want = report.losses(report.read_metrics(ctx.work / "seed" / "metrics.jsonl"))
        got = report.losses(report.read_metrics(out / "metrics.jsonl"))
        c = report.compare(got, {s: v for s, v in want.items() if s >= half}, tol=1e-2)
        return dict(p, status="ok" if c["ok"] else "fail", losses=c,
                    verdict=f"resumed on {half_n} GPU(s) (ZeRO-1 state re-sharded)")
    return dict(p, status="error", verdict=f"exit {res['rc']}", error=res["err"],
                message=errors[0] if errors else "")


def part_equiv(ctx: Context) -> dict:
    a, n = ctx.args, ctx.n
    base = ["--device", "cuda", "--model", "d6", "--seq-len", "256", "--batch-size", "4",
            "--total-batch-size", str(4 * 256 * n), "--max-steps", str(a.equiv_steps),
            "--val-steps", "2", "--sample-tokens", "8"]
    root = ctx.fresh(ctx.work / "equiv")
    runs, wall, errors = [], 0.0, []
    for dtype in ("fp32", "bf16"):
        one_dir = root / f"one_{dtype}"
        one = ctx.r.run([ctx.py, "-m", "llmc.train", *base, "--dtype", dtype, "--out-dir", one_dir],
                        240, env={"CUDA_VISIBLE_DEVICES": "0"}, note=f"1 GPU, {n}x accumulation")
        wall += one["wall_s"]
        for zero in a.equiv_zero:
            many_dir = root / f"n{n}_{dtype}_zero{zero}"
            many = ctx.r.run(ctx.launch(n) + [*base, "--dtype", dtype, "--zero", str(zero),
                                              "--out-dir", many_dir], 240)
            wall += many["wall_s"]
            row = {"dtype": dtype, "zero": zero, "tol": EQUIV_TOL[dtype]}
            if one.get("dry"):
                continue
            if one["rc"] != 0 or many["rc"] != 0:
                errors.append((one["err"] if one["rc"] else many["err"])[-1500:])
                runs.append(dict(row, error=f"exit {one['rc']} (1 GPU) / {many['rc']} ({n} GPUs)"))
                continue
            c = report.compare(report.losses(report.read_metrics(many_dir / "metrics.jsonl")),
                               report.losses(report.read_metrics(one_dir / "metrics.jsonl")),
                               tol=EQUIV_TOL[dtype])
            runs.append(dict(row, **c))
    if ctx.r.dry:
        return {"status": "dry run"}
    ok = runs and all(r.get("ok") and r["steps"] == a.equiv_steps for r in runs)
    status = "ok" if ok else ("error" if errors else "fail")
    return {"status": status, "wall_s": wall, "runs": runs, "error": "\n".join(errors)}


def part_kill(ctx: Context) -> dict:
    a, n = ctx.args, ctx.n
    out = ctx.fresh(ctx.work / "kill")
    logs = ctx.fresh(ctx.work / "kill_logs")
    steps = 20 * a.seed_steps
    flags = ctx.seed_flags(out)
    flags[flags.index("--max-steps") + 1] = str(steps)
    flags[flags.index("--checkpoint-every") + 1] = "10"
    cmd = [ctx.py, "-m", "llmc.train", *flags]
    ctx.port += 1
    ns = types.SimpleNamespace(nproc_per_node=n, node_rank=0, nnodes=1, master_port=ctx.port,
                               master_addr="127.0.0.1", rendezvous=None)
    extra = {"LLMC_DIST_TIMEOUT": f"{a.kill_timeout_s:g}"}
    ctx.r.say(f"$ {ctx.r.show(cmd, extra)}    # x{n} ranks (RANK=0..{n - 1}, llmc.launch's "
              f"environment, port {ctx.port}); SIGKILL rank {a.kill_rank} {a.kill_delay_s:g} s "
              "after the first checkpoint")
    if ctx.r.dry:
        return {"status": "dry run"}
    from llmc.launch import child_env
    from llmc.training import checkpoint
    limit = a.kill_timeout_s * 1.1 + 5
    t0 = time.monotonic()
    got = kill_one_rank(cmd, [child_env(ns, r, dict(ctx.r.env, **extra)) for r in range(n)], logs,
                        ready=lambda: checkpoint.list_checkpoints(out), victim=a.kill_rank,
                        delay_s=a.kill_delay_s, wait_s=limit + 30,
                        start_timeout_s=max(30.0, min(300.0, ctx.r.deadline - t0 - limit - 30)))
    if got["error"]:
        return {"status": "error", "wall_s": time.monotonic() - t0, "detail": got["error"],
                "error": tail(logs / "rank0.err", 2000)}
    first_ckpt = got["ready"][0].name
    ranks = [{"rank": r, "rc": rc, "exit_s": t} for r, (rc, t) in enumerate(zip(got["rc"], got["exit_s"]))]
    others = [x for x in ranks if x["rank"] != a.kill_rank]
    all_three = all(x["rc"] == 3 and x["exit_s"] <= limit for x in others)
    try:
        newest = checkpoint.find_intact(out, n)
    except checkpoint.CheckpointError as e:
        newest, ctx_err = None, str(e)
    else:
        ctx_err = ""
    msg = next((line for r in others for line in tail(logs / f"rank{r['rank']}.err", 20000)
                .splitlines() if "error:" in line), "")
    p = {"wall_s": time.monotonic() - t0, "gpus": n, "killed": a.kill_rank,
         "timeout_s": a.kill_timeout_s, "limit_s": limit, "kill_after_s": a.kill_delay_s,
         "checkpoint_before_kill": first_ckpt, "ranks": ranks, "all_three": all_three,
         "newest_intact": newest.name if newest else None,
         "leftovers": [x.name for x in checkpoint.leftovers(out)], "message": msg or ctx_err}
    p["status"] = "ok" if all_three and newest is not None else "fail"
    ctx.r.say(f"  kill: ranks {ranks}; newest intact {p['newest_intact']}")
    return p


PART_FNS = {"data": part_data, "scaling": part_scaling, "seed": part_seed, "resume": part_resume,
            "reshard": part_reshard, "equiv": part_equiv, "kill": part_kill}


def _save(summary: dict, out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text(report.render(summary))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llmc_eight_gpus_"))
    out.mkdir(parents=True, exist_ok=True)
    if args.report is not None:
        summary = report.merge(json.loads(Path(p).read_text()) for p in args.report)
        _save(summary, out)
        print(report.render(summary))
        return 0
    args.out = str(out)
    args.work = args.work or (str(Path(tempfile.gettempdir()) / "llmc_eight_gpus"))
    runner = Runner(args.work, None if args.dry_run else out / "log.txt", args.dry_run)
    ctx = Context(args, runner)
    t_start = time.monotonic()
    if args.budget_s:
        runner.deadline = t_start + args.budget_s
    summary = {"meta": {"gpus": args.gpus, "gpu_name": "dry run" if args.dry_run else
                        (_nvidia_smi_name() if args.device == "cuda" else "CPU"),
                        "commit": _commit(), "date": datetime.datetime.now().isoformat(timespec="minutes"),
                        "price_per_gpu_hour": args.price_per_gpu_hour,
                        "command": "python bench/eight_gpus.py " + shlex.join(
                            sys.argv[1:] if argv is None else list(argv))},
               "parts": {name: {"status": "not run"} for name in PARTS}}
    runner.say(f"bench/eight_gpus.py: N={args.gpus} ({summary['meta']['gpu_name']}), parts "
               f"{','.join(args.parts)}, work {args.work}, out {out}")
    for name in args.parts:
        if name in NEEDS_GPUS and (args.device == "cpu" or args.gpus < 2):
            summary["parts"][name] = {"status": "skipped: needs 2+ GPUs"}
            continue
        left = args.budget_s - (time.monotonic() - t_start) if args.budget_s else float("inf")
        if left < MIN_S[name] and not args.dry_run:
            summary["parts"][name] = {"status": f"not run: {left:.0f} s of --budget-s left, "
                                                f"the part needs {MIN_S[name]} s or more"}
            continue
        runner.say(f"\n== {name}")
        t0 = time.monotonic()
        try:
            part = PART_FNS[name](ctx)
            if name == "data":
                ctx.data_part = part
        except Exception as e:  # a bug or a surprise in one part must not cost the others
            import traceback
            part = {"status": "error", "error": traceback.format_exc()[-3000:]}
            runner.say(f"  {name}: {type(e).__name__}: {e}")
        part.setdefault("wall_s", time.monotonic() - t0)
        summary["parts"][name] = part
        runner.say(f"== {name}: {part['status']} ({time.monotonic() - t0:.0f} s)")
        if not args.dry_run:
            _save(summary, out)
    if args.dry_run:
        return 0
    _save(summary, out)
    runner.say(f"\nwrote {out / 'summary.md'} ({time.monotonic() - t_start:.0f} s in all)")
    bad = [n for n in args.parts if summary["parts"][n]["status"] in ("fail", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
