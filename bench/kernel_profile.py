"""Kernel-level profile of llmc training steps: every kernel's GPU time and the idle gaps between
kernels, from CUPTI (through torch.profiler, which records the kernels of every library in the
process, CuPy's and cuBLASLt's included).

    python bench/kernel_profile.py [--model d12] [--batch-size 16] [--seq-len 1024] [--steps 5]
        [--no-graphs] [--fp8] [--out FILE]

Builds bench/e2e.py's llmc runner (GPUModel + GPUAdamW, random tokens, graphs by default),
runs 4 warm-up steps, times 10 steps without the profiler (wall ms/step, tokens/s), then
profiles --steps steps and prints, per step: the wall time, the sum of kernel times, the sum of
the gaps between consecutive kernels (by size), the kernel pairs with the most gap time between
them, and every kernel name with its time and launches per step, slowest first. The difference
between the wall time and the kernel time is what fusing kernels cannot win back: launch gaps
inside the graph, and the step boundary (the sync that reads the loss, the host's next launches;
CUPTI's own overhead inflates the latter under the profiler). The card's mean SM clock and power
over the timed and over the profiled steps close the report (--card, bench/power.py): at the
power limit the clock moves between the two, and with it every kernel's time.

Needs a CUDA GPU and PyTorch (the profiler only; nothing of llmc's training uses it).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python bench/kernel_profile.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--card", action=argparse.BooleanOptionalAction, default=True,
                    help="the SM clock and power (nvidia-smi) of the timed and profiled steps")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def gap_bucket(us: float) -> str:
    for limit, name in ((1, "<1us"), (2, "1-2us"), (4, "2-4us"), (10, "4-10us"),
                        (100, "10-100us")):
        if us < limit:
            return name
    return ">100us"


def report(kernels, steps: int, wall_s: float, tokens_per_step: int, title: str) -> str:
    """kernels: [(start_us, end_us, name)] of every GPU activity over `steps` steps; wall_s the
    unprofiled seconds per step. Returns the report text (module docstring)."""
    kernels = sorted(kernels)
    per_name = collections.defaultdict(lambda: [0.0, 0])
    for start, end, name in kernels:
        per_name[name][0] += end - start
        per_name[name][1] += 1
    gaps = [(s1 - e0, n0, n1) for (_, e0, n0), (s1, _, n1) in zip(kernels, kernels[1:])]
    busy = sum(t for t, _ in per_name.values())
    lines = [f"{title}: wall {wall_s * 1e3:.3f} ms/step ({tokens_per_step / wall_s:,.0f} tokens/s); "
             f"kernel time {busy / steps / 1e3:.3f} ms/step, {len(kernels) // steps} launches/step; "
             f"gaps between kernels {sum(g for g, _, _ in gaps) / steps / 1e3:.3f} ms/step"]
    buckets = collections.Counter()
    for g, _, _ in gaps:
        buckets[gap_bucket(g)] += g
    order = ["<1us", "1-2us", "2-4us", "4-10us", "10-100us", ">100us"]
    lines.append("gap time by gap size (us/step): " + ", ".join(
        f"{k} {buckets[k] / steps:.0f}" for k in order if k in buckets))
    pairs = collections.defaultdict(lambda: [0.0, 0])
    for g, a, b in gaps:
        pairs[(a[:48], b[:48])][0] += g
        pairs[(a[:48], b[:48])][1] += 1
    lines.append("kernel pairs with the most gap time (us/step, times/step):")
    for (a, b), (g, c) in sorted(pairs.items(), key=lambda kv: -kv[1][0])[:15]:
        lines.append(f"  {g / steps:8.1f} {c / steps:5.1f}  {a} -> {b}")
    lines.append("kernels (us/step, launches/step):")
    for name, (t, c) in sorted(per_name.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {t / steps:9.1f} {c / steps:6.1f}  {name[:140]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # noqa: F401  (CUPTI through its profiler)
    from torch.profiler import ProfilerActivity, profile
    from bench.e2e import LlmcRunner
    from llmc.config import model_config
    mc = model_config(args.model)
    runner = LlmcRunner(mc, args.batch_size, args.seq_len, graphs=args.graphs, fp8=args.fp8)
    for _ in range(4):
        runner.step()
    import cupy
    from bench.power import PowerSampler, describe
    sampler = PowerSampler.start(cupy.cuda.Device().pci_bus_id) if args.card else None
    try:
        m0, t0 = time.monotonic(), time.perf_counter()
        for _ in range(10):
            runner.step()
        wall = (time.perf_counter() - t0) / 10
        m1 = time.monotonic()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                runner.step()
        m2 = time.monotonic()
        cards = ("" if sampler is None else
                 f"card: timed steps {describe(sampler.window(m0, m1)) or 'no samples'}; "
                 f"profiled steps {describe(sampler.window(m1, m2)) or 'no samples'}\n")
    finally:
        if sampler is not None:
            sampler.stop()
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type.name == "CUDA"]
    title = (f"llmc {args.model} B={args.batch_size} T={args.seq_len} graphs={args.graphs}"
             + (" fp8" if args.fp8 else ""))
    text = report(kernels, args.steps, wall, args.batch_size * args.seq_len, title) + cards
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
