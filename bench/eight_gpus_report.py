"""The report of bench/eight_gpus.py: loss comparisons, the 10B-token projection, summary.md.

Pure functions of metrics.jsonl rows and of the summary dict that bench/eight_gpus.py fills in
part by part (and saves as summary.json), so they are tested on the CPU
(tests/test_eight_gpus.py) and several calls' summary.json can be merged into one report:

    python bench/eight_gpus.py --report A/summary.json B/summary.json --out DIR

Summary dict: {"meta": {...}, "parts": {name: {"status": ..., ...}}}; a part's status is "ok"
(ran, and met its criterion), "fail" (ran, criterion missed), "error" (a command failed or
timed out), "skipped: <why>" or "not run".
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

LLMC_C = {"tokens_per_s_per_gpu": 468_000, "step_ms": 140}  # llm.c, 8x H100, 524,288 tokens/step
TARGET_EFFICIENCY = 0.95
TOKENS_10B = 10e9
PARTS = ("data", "scaling", "seed", "resume", "reshard", "equiv", "kill")


def read_metrics(path) -> list:
    """metrics.jsonl -> list of dicts (a half-written last line is dropped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def losses(rows) -> dict:
    """{step: train loss}."""
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def val_losses(rows) -> dict:
    """{step: validation loss}."""
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def step_times(rows, warmup: int) -> dict:
    """Median and mean `ms` of the steps >= warmup (NVRTC and graph capture are in the first)."""
    ms = [r["ms"] for r in rows if "ms" in r and r["step"] >= warmup]
    if not ms:
        raise ValueError(f"no step at or after step {warmup} in the metrics")
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "timed_steps": len(ms)}


def compare(got: dict, want: dict, tol: float | None = None) -> dict:
    """Per-step losses `got` against `want` over the steps both hold.

    -> steps, bitwise (every loss identical), first_diff (first step that differs, or None),
    max_abs, max_rel, worst_step, missing (steps of `want` not in `got`), and ok: bitwise when
    tol is None, else max_rel <= tol; never ok when a step is missing.
    """
    common = sorted(set(got) & set(want))
    missing = sorted(set(want) - set(got))
    diffs = [(abs(got[s] - want[s]), abs(got[s] - want[s]) / max(abs(want[s]), 1e-30), s)
             for s in common]
    first = next((s for a, _, s in diffs if a != 0 or got[s] != want[s]), None)
    max_abs = max((a for a, _, _ in diffs), default=0.0)
    max_rel, worst = max(((r, s) for _, r, s in diffs), default=(0.0, None))
    bitwise = first is None and all(got[s] == want[s] for s in common)
    ok = bool(common) and not missing and (bitwise if tol is None else max_rel <= tol)
    return {"steps": len(common), "bitwise": bitwise, "first_diff": first, "max_abs": max_abs,
            "max_rel": max_rel, "worst_step": worst, "missing": missing[:10], "ok": ok}


def rows_available(shard_tokens, T: int) -> int:
    """Rows of T+1 tokens the loader takes from shards of these sizes (llmc.data.loader)."""
    return sum((n - 1) // T for n in shard_tokens if n > T)


def data_sizes(steps: int, tokens_per_step: int, T: int, val_rows: int,
               shard_size: int = 100_000_000) -> tuple:
    """(train, val) token counts so that `steps` steps never repeat a row and validation has
    `val_rows` rows: each shard loses its tail of < T+1 tokens, so one row per shard is added."""
    rows = -(-steps * tokens_per_step // T)
    train = rows * T + 1
    train += (-(-train // shard_size) + 1) * (T + 1)
    return train, val_rows * T + 1


def project(step_ms: float, tokens_per_step: int, gpus: int, price_per_gpu_hour: float,
            tokens: float = TOKENS_10B) -> dict:
    """Wall time and cost of `tokens` at this step time: steps, hours, GPU-hours, dollars."""
    if step_ms <= 0 or tokens_per_step <= 0 or gpus < 1 or price_per_gpu_hour < 0:
        raise ValueError("step_ms and tokens_per_step must be > 0, gpus >= 1, price >= 0")
    steps = math.ceil(tokens / tokens_per_step)
    hours = steps * step_ms / 1000 / 3600
    return {"tokens": tokens, "steps": steps, "hours": hours, "gpu_hours": hours * gpus,
            "cost": hours * gpus * price_per_gpu_hour, "price_per_gpu_hour": price_per_gpu_hour,
            "tokens_per_s": tokens_per_step / (step_ms / 1000), "gpus": gpus}


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def merge(summaries) -> dict:
    """Later summaries' parts replace earlier ones unless they were not run there."""
    out = {"meta": {}, "parts": {}}
    for s in summaries:
        out["meta"].update(s.get("meta", {}))
        for name, part in s.get("parts", {}).items():
            if part.get("status") != "not run" or name not in out["parts"]:
                out["parts"][name] = part
    return out


# ----------------------------------------------------------------------------------------------
# summary.md

def _status(part) -> str:
    st = part.get("status", "not run")
    return {"ok": "**pass**", "fail": "**FAIL**", "error": "**ERROR**"}.get(st, st)


def _scaling(p) -> list:
    out = [f"`{p.get('command', 'bench/scaling.py')}`: d12, B=64 per GPU, T=1024, bf16, median "
           f"of steps {p.get('warmup', 5)}..{p.get('steps', 30) - 1}; efficiency = tokens/s / "
           "(GPUs × the 1-GPU tokens/s).", "",
           "| GPUs | ZeRO | tokens/s | per GPU | step ms | efficiency | GB per GPU |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in p.get("results", []):
        eff = f"{100 * r['efficiency']:.1f}%" if r.get("efficiency") is not None else "n/a"
        out.append(f"| {r['gpus']} | {r['zero']} | {r['tokens_per_s']:,.0f} | "
                   f"{r['tokens_per_s'] / r['gpus']:,.0f} | {r['step_ms']:.1f} | {eff} | "
                   f"{r['mem_gb_per_gpu']:.1f} |")
    for f in p.get("failed", []):
        out.append(f"| {f['gpus']} | {f['zero']} | failed | | | | |")
    top = p.get("top")
    if top:
        out += ["", f"At {top['gpus']} GPUs with ZeRO-1: {100 * top['efficiency']:.1f}% of linear "
                f"(target ≥ {100 * TARGET_EFFICIENCY:.0f}%), {top['tokens_per_s'] / top['gpus']:,.0f} "
                f"tokens/s per GPU (llm.c on 8× H100: {LLMC_C['tokens_per_s_per_gpu']:,})."]
    return out


def _seed(p, meta) -> list:
    out = [f"`{p.get('command', '')}`", ""]
    if "median_ms" not in p:
        return out
    tps = p["tokens_per_step"] / (p["mean_ms"] / 1000)
    out += ["| | llmc | llm.c (8× H100) |", "| --- | --- | --- |",
            f"| step time at {p['tokens_per_step']:,} tokens (median / mean of steps "
            f"{p['warmup']}..{p['steps'] - 1}) | {p['median_ms']:.1f} / {p['mean_ms']:.1f} ms | "
            f"{LLMC_C['step_ms']} ms |",
            f"| tokens/s (mean step) | {tps:,.0f} | {LLMC_C['tokens_per_s_per_gpu'] * 8:,} |",
            f"| tokens/s per GPU | {tps / p['gpus']:,.0f} | {LLMC_C['tokens_per_s_per_gpu']:,} |",
            f"| wall time of the run ({p['steps']} steps, validation, checkpoints, start-up) | "
            f"{p['wall_s']:.0f} s | |", ""]
    d = p.get("data_part") or {}
    data = (f"synthetic shards (data_tools.synthetic): {d['train_tokens']:,} train tokens, "
            f"{d['rows_available']:,} rows for the {d['rows_needed']:,} the run takes (no row "
            f"repeats), {d['val_tokens']:,} validation tokens" if "rows_needed" in d
            else p.get("data", ""))
    out.append(f"Train loss {p['first_loss']:.4f} at step 0 → {p['final_loss']:.4f} at step "
               f"{p['steps'] - 1}; validation " + ", ".join(
                   f"{v:.4f} (step {s})" for s, v in sorted(p.get("val_losses", {}).items(),
                                                           key=lambda kv: int(kv[0]))) +
               f"; checkpoints {', '.join(p.get('checkpoints', []))} "
               f"({'verified' if p.get('verified') else 'NOT verified'}: every file's SHA-256); "
               f"data: {data}.")
    return out


def _projection(p, meta) -> list:
    pr = p.get("projection")
    if not pr:
        return ["(needs the seed part)"]
    return [f"From the seed configuration's mean step time ({p['mean_ms']:.1f} ms per "
            f"{p['tokens_per_step']:,} tokens on {pr['gpus']} GPUs), at "
            f"${pr['price_per_gpu_hour']:.2f} per GPU-hour (assumed: `--price-per-gpu-hour`):", "",
            "| tokens | steps | wall time | GPU-hours | cost |", "| --- | --- | --- | --- | --- |",
            f"| {pr['tokens'] / 1e9:.0f}B | {pr['steps']:,} | {hms(pr['hours'] * 3600)} | "
            f"{pr['gpu_hours']:.1f} | ${pr['cost']:,.2f} |", "",
            "Training steps only: validation, checkpoints (~1 s per GB hashed) and start-up add "
            f"to it (the {p['steps']}-step run's wall time above shows how much)."]


def _resume(p) -> list:
    if "bitwise" not in p:
        return [p.get("detail", "")]
    out = [f"Same command, stopped by SIGTERM to the launcher once {p['signalled_after']} steps "
           f"were logged (exit {p['rc_stop']}, checkpoint {p.get('stop_checkpoint')}), then "
           "`--resume auto` "
           f"(exit {p['rc_resume']}); its metrics.jsonl against the uninterrupted run's:", "",
           f"- all {p['steps']} steps: {'bitwise equal' if p['bitwise'] else 'NOT bitwise equal'}"
           + ("" if p["bitwise"] else f" (first difference at step {p['first_diff']}, max |Δ| "
                                      f"{p['max_abs']:.3g})")]
    for key, label in (("before", "before the stop (same start: run-to-run determinism)"),
                       ("after", "after the resume")):
        c = p.get(key)
        if c:
            out.append(f"- {label}: {c['steps']} steps, "
                       + ("bitwise equal" if c["bitwise"] else
                          f"first difference at step {c['first_diff']}, max |Δ| {c['max_abs']:.3g}"))
    v = p.get("val")
    if v:
        out.append(f"- validation losses: {v['steps']} compared, "
                   + ("bitwise equal" if v["bitwise"] else f"max |Δ| {v['max_abs']:.3g}"))
    return out


def _reshard(p) -> list:
    if "verdict" not in p:
        return [p.get("detail", "")]
    out = [f"`{p.get('command', '')}`: exit {p['rc']}, {p['verdict']}."]
    if p.get("message"):
        out += ["", "```", p["message"], "```"]
    if p.get("losses"):
        c = p["losses"]
        out.append(f"Losses after the resume against the {p['from_gpus']}-GPU run: {c['steps']} "
                   f"steps, max relative difference {c['max_rel']:.2e}.")
    return out


def _equiv(p, meta) -> list:
    n = meta.get("gpus", "N")
    out = [f"d6, T=256, B=4 per GPU, 20 steps: `llmc.launch --nproc-per-node {n}` against "
           f"`llmc.train` on one GPU with {n}× gradient accumulation (same tokens per step); "
           "relative difference of the train loss per step.", "",
           "| dtype | ZeRO | steps | max rel. diff | at step | tolerance | |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in p.get("runs", []):
        if "max_rel" not in r:
            out.append(f"| {r['dtype']} | {r['zero']} | | | | {r['tol']:g} | **ERROR** "
                       f"{r.get('error', '')} |")
            continue
        out.append(f"| {r['dtype']} | {r['zero']} | {r['steps']} | {r['max_rel']:.2e} | "
                   f"{r['worst_step']} | {r['tol']:g} | {'pass' if r['ok'] else '**FAIL**'} |")
    return out


def _kill(p) -> list:
    if "ranks" not in p:
        return [p.get("detail", "")]
    out = [f"{p['gpus']} ranks of the seed configuration (each started with llmc.launch's "
           f"environment, so that every exit code is seen), LLMC_DIST_TIMEOUT={p['timeout_s']:g}; "
           f"rank {p['killed']} got SIGKILL {p['kill_after_s']:.1f} s after checkpoint "
           f"{p.get('checkpoint_before_kill')} appeared:", "",
           "| rank | exit code | seconds after the kill |", "| --- | --- | --- |"]
    for r in p["ranks"]:
        code = "SIGKILL (killed)" if r["rank"] == p["killed"] else r["rc"]
        sec = f"{r['exit_s']:.1f}" if r.get("exit_s") is not None else "still running"
        out.append(f"| {r['rank']} | {code} | {sec} |")
    out += ["", f"Every other rank exited with code 3 within {p['limit_s']:.0f} s (timeout + "
                f"one heartbeat + 5 s): {'yes' if p['all_three'] else '**NO**'}. Newest intact "
                f"checkpoint (checkpoint.find_intact, SHA-256 of every file): "
                f"{p.get('newest_intact') or 'none'}; leftovers of a cut save: "
                f"{', '.join(p.get('leftovers', [])) or 'none'}."]
    if p.get("message"):
        out += ["", "```", p["message"], "```"]
    return out


def render(summary: dict) -> str:
    """summary.md: every part's table or verdict, ready to paste into docs/RESULTS.md."""
    meta, parts = summary.get("meta", {}), summary.get("parts", {})
    n = meta.get("gpus", "?")
    lines = [f"# Issue #15 on {n}× {meta.get('gpu_name', 'GPU')}", "",
             f"`{meta.get('command', 'python bench/eight_gpus.py')}` — commit "
             f"{meta.get('commit', '?')}, {meta.get('date', '')}", "",
             "| part | result | wall s |", "| --- | --- | --- |"]
    for name in PARTS:
        p = parts.get(name, {"status": "not run"})
        lines.append(f"| {name} | {_status(p)} | {p.get('wall_s', 0):.0f} |")
    seed = parts.get("seed", {})
    sections = [
        ("Scaling", lambda p: _scaling(p), "scaling"),
        ("Seed configuration through the launcher", lambda p: _seed(p, meta), "seed"),
        ("10B tokens: wall time and cost", lambda p: _projection(seed, meta), "seed"),
        ("Resume on the same GPUs (--resume auto)", _resume, "resume"),
        ("Resume on half the GPUs", _reshard, "reshard"),
        (f"{n} GPUs against 1 GPU with {n}× gradient accumulation", lambda p: _equiv(p, meta), "equiv"),
        ("A killed rank", _kill, "kill"),
    ]
    for title, fn, key in sections:
        p = parts.get(key, {"status": "not run"})
        lines += ["", f"## {title} ({_status(p)})", ""]
        if p.get("status") in ("not run",) or str(p.get("status", "")).startswith("skipped"):
            lines.append(str(p.get("status")))
            continue
        lines += fn(p)
        if p.get("status") == "error" and p.get("error"):
            lines += ["", "```", p["error"][-1500:], "```"]
    return "\n".join(lines) + "\n"
