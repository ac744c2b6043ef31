"""Instruction-level profile of one llmc kernel: Nsight Compute's per-instruction SASS counters,
summed the ways that tell where a kernel's issue slots go.

    python bench/sass_profile.py --workload flash-forward [--batch-size 64] [--kernel REGEX]
        [--top 25] [--save CSV]
    python bench/sass_profile.py --csv CSV [--kernel-name NAME] [--top 25]   # a saved export

Runs the workload (one llmc op at GPT-2 124M's shape, NH=12, T=1024, C=768, bf16) in a child
process under `ncu --section SourceCounters --page source --print-source sass --csv`, profiling
the third launch of the first kernel whose name matches --kernel (the first two warm up), and
prints:
  - the kernel's warp instructions in all, and by opcode (SASS mnemonic, predicate and
    modifiers dropped), most first;
  - the code by execution count: instructions that run equally often form one group, so the
    loop body (run once per tile per warp), the per-block prologue and epilogue, and the rarer
    paths (a diagonal tile's mask) separate, each with its size and opcodes;
  - the instructions with the most warp-stall samples (where warps wait, and on what).
This is how docs/RESULTS.md ("fifth part") found the flash kernels' excess: descriptor
arithmetic per wgmma, index arithmetic per cp.async, a mask test on every tile.

Workloads: flash-forward, flash-backward (the sm90 kernels on Hopper, sm80 elsewhere, as the
model picks them), layernorm-forward, layernorm-backward, gelu-forward, classifier.

Needs the GPU machine's `ncu` (CUDA toolkit) with access to the performance counters; --csv reads
an export anywhere (the parsing and the report are tested on the CPU: tests/test_sass_profile.py).
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKLOADS = {  # name -> default kernel-name regex
    "flash-forward": "flash_attention_forward",
    "flash-backward": "flash_attention_backward_dkdv",
    "layernorm-forward": "fused_residual_layernorm_forward",
    "layernorm-backward": "layernorm_backward",
    "gelu-forward": "gelu_forward",
    "classifier": "fused_classifier",
}
_GUARD = re.compile(r"^@!?U?P[T0-9]+$")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python bench/sass_profile.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workload", choices=sorted(WORKLOADS), help="profile this op under ncu")
    src.add_argument("--csv", type=Path, help="report a saved `ncu ... --csv` source export")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--kernel", default=None,
                    help="regex of the kernel to profile (default: the workload's main kernel)")
    ap.add_argument("--kernel-name", default=None,
                    help="with --csv: which kernel of the export (default: the first)")
    ap.add_argument("--top", type=int, default=25, help="rows of the stall table")
    ap.add_argument("--save", type=Path, default=None, help="also keep ncu's CSV export here")
    ap.add_argument("--run-workload", default=None, help=argparse.SUPPRESS)  # the child
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.top < 0:
        ap.error("--top must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# the export and its report (no GPU)

def opcode(sass: str) -> str:
    """'@!P0 FFMA.FTZ R1, R2, R3, R4' -> 'FFMA' (the mnemonic without guard or modifiers)."""
    for word in sass.split():
        if not _GUARD.match(word):
            return word.split(".")[0]
    return "?"


def parse_source_csv(text: str) -> dict:
    """ncu's `--page source --print-source sass --csv` output -> {kernel name: [(address, sass,
    executed, stall samples)]}, in address order. Lines before each kernel's table (==PROF== and
    the like) are skipped; a kernel's table starts after its "Kernel Name" row."""
    kernels, name, header, tables = {}, None, None, 0
    for row in csv.reader(io.StringIO(text)):
        if not row or row[0].startswith("=="):
            continue
        if row[0] == "Kernel Name":
            name, header = row[1], None
            kernels[name] = []
            continue
        if "Source" in row and ("Address" in row or "# Address" in row):
            header = {col: i for i, col in enumerate(row)}
            tables += 1
            if name is None:
                name = "kernel"
                kernels[name] = []
            continue
        if header is None:
            continue
        ex = header.get("Instructions Executed")
        if ex is None or len(row) <= ex:
            continue
        try:
            executed = int(float(row[ex].replace(",", "")))
        except ValueError:
            continue
        st = header.get("Warp Stall Sampling (All Samples)")
        try:
            stalls = int(float(row[st].replace(",", ""))) if st is not None else 0
        except ValueError:
            stalls = 0
        addr = row[header.get("Address", header.get("# Address", 0))]
        kernels[name].append((addr, row[header["Source"]].strip(), executed, stalls))
    if not tables:
        raise ValueError("no SASS source table in the export: was it made with `--section "
                         "SourceCounters --page source --print-source sass --csv`?")
    return kernels


def report(name: str, rows: list, top: int = 25) -> str:
    """The text summary of one kernel's rows (see the module docstring)."""
    total = sum(r[2] for r in rows)
    stalls = sum(r[3] for r in rows)
    lines = [f"{name}: {total:,} warp instructions executed, {len(rows)} in the code, "
             f"{stalls:,} stall samples"]
    if total == 0:
        return "\n".join(lines)
    by_op = collections.Counter()
    for _, sass, n, _ in rows:
        by_op[opcode(sass)] += n
    lines.append("by opcode (warp instructions, share):")
    for op, n in by_op.most_common():
        if n / total < 0.005:
            break
        lines.append(f"  {op:12s} {n:14,} {100 * n / total:5.1f}%")
    groups = collections.defaultdict(collections.Counter)
    for _, sass, n, _ in rows:
        if n:
            groups[n][opcode(sass)] += 1
    lines.append("code by execution count (each instruction of a group runs that many times):")
    ranked = sorted(groups.items(), key=lambda kv: -kv[0] * sum(kv[1].values()))
    for count, ops in ranked:
        size = sum(ops.values())
        share = 100 * count * size / total
        if share < 1.0:
            continue
        top_ops = ", ".join(f"{op} {k}" for op, k in ops.most_common(6))
        lines.append(f"  x{count:<12,} {size:5d} instructions {share:5.1f}%  {top_ops}")
    if top and stalls:
        lines.append(f"most stall samples ({top}):")
        for addr, sass, n, s in sorted(rows, key=lambda r: -r[3])[:top]:
            lines.append(f"  {100 * s / stalls:5.1f}%  x{n:<10,} {addr}  {sass}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the workload (child process, under ncu)

def run_workload(name: str, B: int) -> None:
    """Three launches of the workload's op at (B, T=1024, C=768, NH=12), bf16."""
    import cupy
    import numpy as np
    from bench.timing import device_randn
    from llmc.ops import BF16
    T, C, NH = 1024, 768, 12
    if name.startswith("flash"):
        from llmc.ops import flash_attention as fa
        qkv = device_randn((B, T, 3 * C), BF16, seed=1)
        out = cupy.empty((B, T, C), BF16)
        lse = cupy.empty((B, NH, T), np.float32)
        if name == "flash-forward":
            calls = [lambda: fa.flash_attention_forward(out, lse, qkv, NH)] * 3
        else:
            dout = device_randn((B, T, C), BF16, seed=2)
            dqkv = cupy.empty((B, T, 3 * C), BF16)
            scratch = {k: cupy.empty(s, d) for k, (s, d) in
                       fa.flash_scratch_shapes(B, T, C, NH).items()}
            fa.flash_attention_forward(out, lse, qkv, NH)
            calls = [lambda: fa.flash_attention_backward(dqkv, dout, qkv, out, lse, NH,
                                                         scratch)] * 3
    elif name.startswith("layernorm"):
        from llmc.ops import layernorm as ln
        x = device_randn((B, T, C), BF16, seed=1)
        r = device_randn((B, T, C), BF16, seed=2)
        w, b = device_randn((C,), BF16, seed=3), device_randn((C,), BF16, seed=4)
        out, res = cupy.empty((B, T, C), BF16), cupy.empty((B, T, C), BF16)
        mean, rstd = cupy.empty((B, T), np.float32), cupy.empty((B, T), np.float32)
        fwd = lambda: ln.fused_residual_layernorm_forward(res, out, mean, rstd, x, r, w, b)  # noqa: E731
        if name == "layernorm-forward":
            calls = [fwd] * 3
        else:
            fwd()
            dinp = cupy.zeros((B, T, C), BF16)
            dw, db = cupy.zeros(C, BF16), cupy.zeros(C, BF16)
            scratch = cupy.empty(ln.layernorm_backward_scratch_size(B * T, C), cupy.uint8)
            calls = [lambda: ln.layernorm_backward(dinp, dw, db, x, res, w, mean, rstd,
                                                   scratch)] * 3
    elif name == "gelu-forward":
        from llmc.ops import gelu
        x = device_randn((B * T, 4 * C), BF16, seed=1)
        y = cupy.empty_like(x)
        calls = [lambda: gelu.gelu_forward(y, x)] * 3
    elif name == "classifier":
        from llmc.ops import classifier
        Vp, V = 50304, 50257
        logits = device_randn((B * T, Vp), BF16, seed=1)
        losses = cupy.empty(B * T, np.float32)
        targets = cupy.asarray(np.random.default_rng(0).integers(0, V, B * T).astype(np.int32))
        calls = [lambda: classifier.fused_classifier(logits, losses, targets, V, 1.0 / (B * T),
                                                     write_dlogits=False)] * 3
    else:
        raise ValueError(f"workload: expected one of {sorted(WORKLOADS)}, got {name!r}")
    for call in calls:
        call()
    cupy.cuda.Device().synchronize()


def profile(args) -> str:
    """ncu's CSV export of the workload's kernel (third launch)."""
    ncu = shutil.which("ncu") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/ncu")),
                                      None)
    if ncu is None:
        raise SystemExit("sass_profile: `ncu` (Nsight Compute) is not on PATH nor in "
                         "/usr/local/cuda*/bin: install the CUDA toolkit's Nsight Compute, or "
                         "report a saved export with --csv")
    kernel = args.kernel or WORKLOADS[args.workload]
    cmd = [ncu, "--kernel-name", f"regex:{kernel}", "--launch-skip", "2", "--launch-count", "1",
           "--section", "SourceCounters", "--page", "source", "--print-source", "sass", "--csv",
           sys.executable, str(Path(__file__).resolve()), "--workload", args.workload,
           "--run-workload", args.workload, "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout
    if "ERR_NVGPUCTRPERM" in text + proc.stderr:
        raise SystemExit("sass_profile: ncu has no access to the GPU's performance counters "
                         "(ERR_NVGPUCTRPERM): run as root or allow profiling for all users "
                         "(NVreg_RestrictProfilingToAdminUsers=0)")
    if proc.returncode != 0 or "Kernel Name" not in text:
        tail = (proc.stderr or text)[-2000:]
        raise SystemExit(f"sass_profile: ncu found no kernel matching {kernel!r} or failed "
                         f"(exit {proc.returncode}):\n{tail}")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_workload:
        run_workload(args.run_workload, args.batch_size)
        return 0
    text = args.csv.read_text() if args.csv else profile(args)
    if args.save:
        args.save.write_text(text)
    kernels = parse_source_csv(text)
    name = args.kernel_name or next(iter(kernels))
    if name not in kernels:
        print(f"--kernel-name {name!r}: the export has {sorted(kernels)}", file=sys.stderr)
        return 2
    print(report(name, kernels[name], args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
