"""fp8 training quality against bf16: the validation loss of the same run with and without --fp8.

    python bench/fp8_quality.py [--steps 300] [--model d12] [--batch-size 16] [--out DIR]
        [--tolerance 0.01] [--json OUT]

Two `python -m llmc.train` runs on the bundled tiny-shakespeare, one after the other, identical
but for --fp8: d12, B=16, T=1024, lr 6e-4 with 20 warm-up steps and cosine decay, weight decay
0.1, seed 1337 (so the same initial weights and the same data order), validation every 25
steps. Prints a markdown table of the validation losses, their relative difference
(fp8 - bf16) / bf16, the fp8 run's scale statistics at each validation (largest amax in the
histories, smallest and largest scale, count of non-finite entries) and both runs' median
tokens/s. Exit status 1 when any validation differs by more than --tolerance or any scale
statistic is not finite; 2 when a run fails.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(out: Path, args, fp8: bool) -> list:
    cmd = [sys.executable, "-m", "llmc.train", "--model", args.model, "--batch-size",
           str(args.batch_size), "--seq-len", "1024", "--max-steps", str(args.steps), "--lr",
           "6e-4", "--warmup-steps", "20", "--lr-schedule", "cosine", "--weight-decay", "0.1",
           "--val-every", "25", "--seed", "1337", "--log-every", "25", "--out-dir", str(out),
           "--overwrite"] + (["--fp8"] if fp8 else [])
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        print(f"{'fp8' if fp8 else 'bf16'} run failed with exit code {proc.returncode}",
              file=sys.stderr)
        sys.exit(2)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/fp8_quality.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=Path("out/fp8_quality"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = {"bf16": run(args.out / "bf16", args, False), "fp8": run(args.out / "fp8", args, True)}
    val = {k: {r["step"]: r["val_loss"] for r in v if "val_loss" in r} for k, v in rows.items()}
    scales = {r["step"]: r for r in rows["fp8"] if "fp8_amax_max" in r}
    tps = {k: statistics.median([r["tokens_per_s"] for r in v if "tokens_per_s" in r][5:] or [0])
           for k, v in rows.items()}
    failures = []
    print(f"\n{args.model} B={args.batch_size} T=1024, {args.steps} steps, tiny-shakespeare\n")
    print("| step | val loss bf16 | val loss fp8 | rel diff | fp8 max amax | fp8 scale min | "
          "fp8 scale max | non-finite |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for step in sorted(val["bf16"]):
        b, f = val["bf16"][step], val["fp8"].get(step, float("nan"))
        rel = (f - b) / b
        s = scales.get(step, {})
        print(f"| {step} | {b:.4f} | {f:.4f} | {100 * rel:+.2f}% | "
              f"{s.get('fp8_amax_max', float('nan')):.4g} | "
              f"{s.get('fp8_scale_min', float('nan')):.4g} | "
              f"{s.get('fp8_scale_max', float('nan')):.4g} | {s.get('fp8_nonfinite', '?')} |")
        if not abs(rel) <= args.tolerance:
            failures.append(f"step {step}: fp8 val loss {f:.4f} vs bf16 {b:.4f} ({100 * rel:+.2f}%)")
        values = [s.get(k, float("nan")) for k in ("fp8_amax_max", "fp8_scale_min",
                                                    "fp8_scale_max")]
        if not all(math.isfinite(v) for v in values) or s.get("fp8_nonfinite", 1) != 0:
            failures.append(f"step {step}: fp8 scale statistics not finite: {s}")
    print(f"\nmedian tokens/s: bf16 {tps['bf16']:,.0f}, fp8 {tps['fp8']:,.0f} "
          f"(x{tps['fp8'] / max(tps['bf16'], 1):.3f})")
    if args.json is not None:
        args.json.write_text(json.dumps({"val": val, "scales": scales, "tokens_per_s": tps,
                                         "failures": failures}, indent=2))
    for f in failures:
        print("FAIL " + f, file=sys.stderr)
    print("PASS" if not failures else f"FAIL ({len(failures)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
