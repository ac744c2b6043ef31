"""Data-parallel scaling: tokens/s of `python -m llmc.launch` on 1, 2 and 4 GPUs, ZeRO-1 on and off.

    python bench/scaling.py [--gpus 1,2,4] [--model d12] [--batch-size 64] [--seq-len 1024]
        [--steps 30] [--warmup 5] [--dtype bf16] [--zero 0,1] [--out DIR] [-- <more train flags>]

Each configuration is one real training run (`python -m llmc.launch --nproc-per-node W --
--model d12 --batch-size 64 --seq-len 1024 --total-batch-size 64*1024*W --zero Z ...`) on the
bundled tiny-shakespeare: B per GPU fixed, so W GPUs process W times the tokens per step (weak
scaling, no gradient accumulation, as llm.c's multi-GPU numbers). Read from its
<out>/metrics.jsonl: tokens/s = median of `tokens_per_s` over the steps after --warmup (NVRTC
compiles and cuBLAS heuristics happen in the first steps). Efficiency = tokens/s(W) /
(W * tokens/s(1 GPU)); the target is >= 95% at 2 and 4 GPUs with ZeRO-1. Memory per GPU is
the highest `memory.used` nvidia-smi reports for any of the run's GPUs while it runs (CUDA
context, CuPy pool, cuBLAS and NCCL buffers: what the run takes from the card), polled every
0.5 s. The 1-GPU run is the same command with --nproc-per-node 1 (no NCCL).

Prints a table and writes <out>/scaling.json (a failed configuration is listed under "failed"
and the others still run; exit 1 then). Needs as many GPUs as the largest --gpus entry; larger
entries are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.processes import split_passthrough  # noqa: E402


def parse_args(argv=None):
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python bench/scaling.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts, comma-separated")
    ap.add_argument("--zero", default="0,1", help="ZeRO stages to run for W > 1")
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--out", default=None, help="directory for the runs and scaling.json")
    args = ap.parse_args(argv)
    try:
        args.gpus = sorted({int(x) for x in args.gpus.split(",")})
        args.zero = sorted({int(x) for x in args.zero.split(",")})
    except ValueError:
        ap.error("--gpus and --zero take comma-separated integers, e.g. --gpus 1,2,4")
    if min(args.gpus) < 1 or not set(args.zero) <= {0, 1}:
        ap.error("--gpus entries must be >= 1 and --zero entries 0 or 1")
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must be more than --warmup {args.warmup}")
    args.extra = extra
    return args


def gpu_count() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


class MemoryPoll:
    """Highest nvidia-smi memory.used (MiB) per GPU index while running."""

    def __init__(self, period_s=0.5):
        self.peak, self.period_s = {}, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True)
            for line in out.stdout.splitlines():
                idx, used = (int(x) for x in line.split(","))
                self.peak[idx] = max(self.peak.get(idx, 0), used)
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one(args, world: int, zero: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "llmc.launch", "--nproc-per-node", str(world), "--",
           "--model", args.model, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--max-steps", str(args.steps), "--dtype", args.dtype, "--zero", str(zero),
           "--total-batch-size", str(args.batch_size * args.seq_len * world),
           "--val-steps", "1", "--sample-tokens", "1", "--log-every", "10",
           "--out-dir", str(out), *args.extra]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(world)))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    t0 = time.monotonic()
    with MemoryPoll() as mem:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "stdout.txt").write_text(r.stdout)
    (out / "stderr.txt").write_text(r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"run W={world} zero={zero} failed (exit {r.returncode}); see {out}/stderr.txt:\n"
                         + r.stderr[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row and row["step"] >= args.warmup]
    return {"gpus": world, "zero": zero, "tokens_per_s": statistics.median(tps),
            "step_ms": statistics.median(row["ms"] for row in rows
                                         if "ms" in row and row["step"] >= args.warmup),
            "mem_gb_per_gpu": max(mem.peak.get(i, 0) for i in range(world)) / 1024,
            "wall_s": time.monotonic() - t0}


def main(argv=None) -> int:
    args = parse_args(argv)
    have = gpu_count()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llmc_scaling_"))
    results, failed = [], []
    for world in args.gpus:
        if world > have:
            print(f"skipping {world} GPUs: only {have} on this machine", flush=True)
            continue
        for zero in (args.zero if world > 1 else [0]):
            try:
                res = run_one(args, world, zero, out / f"w{world}_zero{zero}")
            except SystemExit as e:  # one failed configuration leaves the others measured
                print(e, file=sys.stderr, flush=True)
                failed.append({"gpus": world, "zero": zero, "error": str(e)[:300]})
                continue
            results.append(res)
            print(f"W={world} zero={zero}: {res['tokens_per_s']:,.0f} tok/s, "
                  f"{res['mem_gb_per_gpu']:.1f} GB/GPU ({res['wall_s']:.0f} s)", flush=True)
    base = next((r["tokens_per_s"] for r in results if r["gpus"] == 1), None)
    for r in results:
        r["efficiency"] = r["tokens_per_s"] / (r["gpus"] * base) if base else None
    print(f"\n{args.model}, B={args.batch_size} per GPU, T={args.seq_len}, {args.dtype}, "
          f"median of steps {args.warmup}..{args.steps - 1}")
    print(f"{'GPUs':>4} {'ZeRO':>4} {'tokens/s':>12} {'per GPU':>10} {'step ms':>8} "
          f"{'efficiency':>10} {'GB/GPU':>7}")
    for r in results:
        eff = f"{100 * r['efficiency']:.1f}%" if r["efficiency"] is not None else "n/a"
        print(f"{r['gpus']:>4} {r['zero']:>4} {r['tokens_per_s']:>12,.0f} "
              f"{r['tokens_per_s'] / r['gpus']:>10,.0f} {r['step_ms']:>8.1f} {eff:>10} "
              f"{r['mem_gb_per_gpu']:>7.1f}")
    for f in failed:
        print(f"{f['gpus']:>4} {f['zero']:>4} failed: {f['error'].splitlines()[0]}")
    (out / "scaling.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                  "results": results, "failed": failed}, indent=1))
    print(f"\nwrote {out / 'scaling.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
