"""`python -m llmc.plot OUT_DIR [OUT_DIR ...] --out loss.png`: training curves of one or more runs.

Reads each run's `metrics.jsonl` (written by llmc.train) and draws four panels, every run in
its own colour and named by its directory (or --labels):
    loss            train loss (faint) with an exponential moving average (--smooth), and the
                    validation loss as markers, against tokens seen (steps x tokens per step,
                    which tokens/s x ms of a logged step gives; steps when that is missing)
    learning rate   per step
    throughput      tokens/s per step (the first step, which compiles, is left out)
    HellaSwag       acc_norm at each evaluation (the panel says so when no run has any)
Steps whose update the outlier guard skipped are marked with an x on the loss curve.

Needs matplotlib (`pip install 'llmc[plot]'`); without it the command says so and exits 2.
A missing or empty metrics.jsonl is one clear line and exit 2, as is any other bad input.

Run the tests:  python -m pytest tests/test_plot.py -q
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


class PlotError(ValueError):
    """Input that cannot be plotted; '<path>: <problem>; <fix>'."""


def read_run(out_dir) -> dict:
    """metrics.jsonl of a run -> {"steps": [...], "loss": [...], ..., "val": [(step, loss)], ...}."""
    out_dir = Path(out_dir)
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: not found; give the --out-dir of an llmc.train run")
    run = {"train": [], "val": [], "hellaswag": [], "skipped": [], "tokens_per_step": None}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(path.read_text().splitlines()):
                continue  # the last line of a run killed mid-write
            raise PlotError(f"{path}:{n}: not JSON; was the file edited?") from None
        if "loss" in row:
            run["train"].append(row)
            if row.get("skipped"):
                run["skipped"].append(row)
        if "val_loss" in row:
            run["val"].append((row["step"], row["val_loss"]))
        if "hellaswag_acc_norm" in row:
            run["hellaswag"].append((row["step"], row["hellaswag_acc_norm"]))
    if not run["train"]:
        raise PlotError(f"{path}: holds no training steps yet; plot it once the run has logged some")
    first = run["train"][0]
    if first.get("tokens_per_s") and first.get("ms"):
        run["tokens_per_step"] = round(first["tokens_per_s"] * first["ms"] / 1000)  # all ranks
    return run


def ema(values, smooth: float) -> list:
    """Exponential moving average with debiasing (TensorBoard's smoothing), NaNs skipped."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = smooth * avg + (1 - smooth) * v
            weight = smooth * weight + (1 - smooth)
        out.append(avg / weight if weight > 0 else math.nan)
    return out


def plot(out_dirs, out_path, labels=None, smooth: float = 0.9) -> Path:
    """Draw the runs' curves into out_path (PNG, SVG or PDF by its suffix); returns it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed; pip install 'llmc[plot]' (or matplotlib)") from None
    if not 0 <= smooth < 1:
        raise PlotError(f"--smooth must be in [0, 1), got {smooth}")
    labels = list(labels) if labels else [Path(d).resolve().name for d in out_dirs]
    if len(labels) != len(out_dirs):
        raise PlotError(f"--labels: {len(labels)} label(s) for {len(out_dirs)} run(s); give one per run")
    runs = [read_run(d) for d in out_dirs]
    by_tokens = all(r["tokens_per_step"] for r in runs)

    def x(run, step):  # x position of the end of step `step` (0-based)
        return (step + 1) * run["tokens_per_step"] if by_tokens else step + 1

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=90)
    (ax_loss, ax_lr), (ax_tps, ax_hs) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, label) in enumerate(zip(runs, labels)):
        c = colors[i % len(colors)]
        steps = [r["step"] for r in run["train"]]
        xs = [x(run, s) for s in steps]
        loss = [r["loss"] for r in run["train"]]
        ax_loss.plot(xs, loss, color=c, alpha=0.25, lw=0.8)
        ax_loss.plot(xs, ema(loss, smooth), color=c, lw=1.6, label=f"{label} train")
        if run["val"]:
            ax_loss.plot([x(run, s) for s, _ in run["val"]], [v for _, v in run["val"]], "o--",
                         color=c, ms=4, lw=0.8, label=f"{label} val")
        if run["skipped"]:
            ax_loss.plot([x(run, r["step"]) for r in run["skipped"]], [r["loss"] for r in run["skipped"]],
                         "x", color=c, ms=6, label=f"{label} skipped update")
        ax_lr.plot(xs, [r["lr"] for r in run["train"]], color=c, label=label)
        tps = [(xx, r["tokens_per_s"]) for xx, r in zip(xs, run["train"]) if "tokens_per_s" in r][1:]
        if tps:
            ax_tps.plot([a for a, _ in tps], [b for _, b in tps], color=c, lw=0.9, label=label)
        if run["hellaswag"]:
            ax_hs.plot([x(run, s) for s, _ in run["hellaswag"]], [a for _, a in run["hellaswag"]],
                       "o-", color=c, label=label)
    xlabel = "tokens" if by_tokens else "step"
    for ax, title in ((ax_loss, "loss"), (ax_lr, "learning rate"), (ax_tps, "tokens/s"),
                      (ax_hs, "HellaSwag acc_norm")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if any(r["hellaswag"] for r in runs):
        ax_hs.legend(fontsize=7)
    else:
        ax_hs.text(0.5, 0.5, "no HellaSwag evaluations\n(train with --hellaswag FILE)",
                   ha="center", va="center", transform=ax_hs.transAxes, fontsize=9, color="gray")
    ax_loss.legend(fontsize=7)
    ax_lr.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format=out_path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmc.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="--out-dir of llmc.train runs")
    p.add_argument("--out", default="loss.png", help="the picture to write (.png, .svg, .pdf)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend name per run [default: directory names]")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA weight of the smoothed train loss, in [0, 1)")
    args = p.parse_args(argv)
    if Path(args.out).suffix.lower() not in (".png", ".svg", ".pdf"):
        p.error(f"--out {args.out}: give a .png, .svg or .pdf file name")
    try:
        path = plot(args.out_dirs, args.out, args.labels, args.smooth)
    except (PlotError, OSError) as e:
        if os.environ.get("LLMC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
