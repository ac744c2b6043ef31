"""A/B of the flash attention kernels between kernel trees, in one process: bitwise, then timed.

    python bench/flash_ab.py REV_OR_DIR [REV_OR_DIR ...] [--impls sm90,sm80] [--sizes 64,16]
        [--rounds 3] [--no-cudnn] [--json OUT]

"work" is this checkout's kernels/; each argument is another tree: a directory holding the
kernel sources (common.cuh and the .cu files), or a git revision of this repository, whose
kernels/ is extracted to a temporary directory (`git archive REV kernels`). Every tree is
compiled under its own module cache (llmc.kernels' source directory and both caches swapped).

1. Bitwise: out, lse and dqkv of every tree against work's, forward and backward of each
   implementation, at (B, T) = (2, 1024), (3, 1000), (3, 333), (2, 65), (1, 17) (NH=12, HS=64).
   A change meant to keep the arithmetic must print "bitwise: all equal".
2. Timing: for each B (T=1024) and implementation, forward, backward and forward + backward of
   every tree and of PyTorch's SDPA cuDNN backend (sm90 rows; "sm90:<variant>" names a forward
   variant of llmc.ops.flash_attention.SM90_VARIANTS), timed in alternation
   (bench.timing.alternate: every round runs each of them in turn, starting one further along),
   medians of --rounds rounds, and each tree's ratio to cuDNN. Training GPT-2 holds an H200 at its
   power limit and its clock moves while it warms: only alternated medians compare.

Exit status 1 when any tree's outputs differ from work's (the timings are still printed), 2 on
a tree that cannot be found. Needs a CUDA GPU (sm90 rows: compute capability 9.0) and, for the
cuDNN rows, PyTorch. Tests of the CPU parts: tests/test_flash_ab.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e import int_list  # noqa: E402  (the comma lists of bench/e2e.py)

SHAPES = ((2, 1024), (3, 1000), (3, 333), (2, 65), (1, 17))
NH, HS = 12, 64


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python bench/flash_ab.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="kernel directories or git revisions")
    ap.add_argument("--impls", default="sm90,sm80",
                    help="comma list of sm90, sm90:<variant> and sm80 (default sm90,sm80; sm90 "
                         "needs a 9.0 device)")
    ap.add_argument("--sizes", type=int_list, default=[64, 16], help="batch sizes to time")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds per timing")
    ap.add_argument("--cudnn", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.impls = args.impls.split(",")
    bad = [i for i in args.impls if i != "sm80" and i.partition(":")[0] != "sm90"]
    if bad:
        ap.error(f"--impls: {bad} are not implementations (sm90, sm90:<variant>, sm80)")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if min(args.sizes) < 1:
        ap.error(f"--sizes: batch sizes must be >= 1, got {args.sizes}")
    return args


def resolve_tree(spec: str, workdir: Path) -> Path:
    """A kernel directory for `spec`: itself when it holds common.cuh, else git revision `spec`
    of this repository extracted under workdir. ValueError names both readings when neither
    works."""
    path = Path(spec)
    if (path / "common.cuh").is_file():
        return path.resolve()
    if path.is_dir() and (path / "kernels" / "common.cuh").is_file():
        return (path / "kernels").resolve()
    dest = workdir / spec.replace("/", "_").replace("~", "-").replace("^", "-")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", spec, "kernels"],
                             capture_output=True)
    if archive.returncode != 0:
        raise ValueError(f"{spec!r} is neither a directory of kernel sources (no common.cuh) "
                         f"nor a git revision of {ROOT}: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return (dest / "kernels").resolve()


def names_for(specs: list) -> list:
    """Column names: each spec as given, made unique ("work" is taken)."""
    out, seen = [], {"work"}
    for s in specs:
        name, k = s, 2
        while name in seen:
            name, k = f"{s}#{k}", k + 1
        seen.add(name)
        out.append(name)
    return out


def report(rows: list, bitwise: list) -> str:
    """rows: {"B", "impl", "tree", "fwd", "bwd", "fb"} medians (ms); bitwise: (impl, tree, B, T,
    [out, lse, dqkv equal]). The text summary: the bitwise verdict and one line per tree and
    configuration, with its ratio to the cuDNN row timed beside it (same B and implementation)."""
    lines = []
    diffs = [b for b in bitwise if not all(b[4])]
    lines.append("bitwise: all equal" if not diffs else
                 "bitwise: DIFFERENT in " + "; ".join(
                     f"{impl} {tree} B={B} T={T} (out, lse, dqkv equal: {eq})"
                     for impl, tree, B, T, eq in diffs))
    cudnn = {(r["B"], r["impl"]): r for r in rows if r["tree"] == "cudnn"}
    for r in rows:
        text = (f"B={r['B']:<3d} {r['impl']} {r['tree']:14s} fwd {r['fwd']:.4f}  "
                f"bwd {r['bwd']:.4f}  fwd+bwd {r['fb']:.4f} ms")
        c = cudnn.get((r["B"], r["impl"]))
        if c is not None and r["tree"] != "cudnn":
            text += f"   / cuDNN: fwd {r['fwd'] / c['fwd']:.3f}  fwd+bwd {r['fb'] / c['fb']:.3f}"
        lines.append(text)
    return "\n".join(lines) + "\n"


class Trees:
    """Switches llmc's flash kernels between kernel trees: each keeps its own compiled modules."""

    def __init__(self, dirs: dict):
        import llmc.kernels as kernels
        from llmc.ops import flash_attention as fa
        self.kernels, self.fa, self.dirs = kernels, fa, dirs
        self.caches = {name: ({}, {}) for name in dirs}

    def use(self, name: str):
        self.kernels._modules, self.fa._kernels = self.caches[name]
        self.kernels.kernel_dir = lambda d=self.dirs[name]: d


def _cudnn(B: int, T: int):
    """(forward, forward + backward) callables of SDPA's cuDNN backend, or None."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, k, v = (torch.randn(B, NH, T, HS, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        dy = torch.randn(B, NH, T, HS, device="cuda", dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def both():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(y, (q, k, v), dy)
        fwd()
        both()
        return fwd, both
    except Exception as e:  # noqa: BLE001 - no torch, no cuDNN backend: the column is left out
        print(f"cuDNN not timed: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import cupy
    from bench.timing import alternate, device_randn
    from llmc.ops import BF16
    from llmc.ops import flash_attention as fa
    if (any(i.startswith("sm90") for i in args.impls)
            and cupy.cuda.Device().compute_capability != "90"):
        print("--impls sm90 needs a compute capability 9.0 device", file=sys.stderr)
        return 2
    C = NH * HS
    with tempfile.TemporaryDirectory(prefix="flash_ab_") as tmp:
        try:
            dirs = {"work": Path(fa.kernels.kernel_dir()).resolve()}
            dirs.update(zip(names_for(args.trees),
                            (resolve_tree(s, Path(tmp)) for s in args.trees)))
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        trees = Trees(dirs)

        def run(qkv, dout, impl):
            B, T, _ = qkv.shape
            out = cupy.empty((B, T, C), BF16)
            lse = cupy.empty((B, NH, T), np.float32)
            dqkv = cupy.empty((B, T, 3 * C), BF16)
            scratch = {k: cupy.empty(s, d) for k, (s, d) in
                       fa.flash_scratch_shapes(B, T, C, NH).items()}
            fa.flash_attention_forward(out, lse, qkv, NH, impl=impl)
            fa.flash_attention_backward(dqkv, dout, qkv, out, lse, NH, scratch, impl=impl)
            cupy.cuda.Device().synchronize()
            return out, lse, dqkv

        def bits(a):
            return a.view(cupy.uint16) if a.itemsize == 2 else a.view(cupy.uint32)

        bitwise = []
        for impl in args.impls:
            for B, T in SHAPES:
                qkv = device_randn((B, T, 3 * C), BF16, seed=T)
                dout = device_randn((B, T, C), BF16, seed=T + 1)
                trees.use("work")
                ref = run(qkv, dout, impl)
                for name in dirs:
                    if name != "work":
                        trees.use(name)
                        got = run(qkv, dout, impl)
                        bitwise.append((impl, name, B, T, [bool(cupy.array_equal(bits(x), bits(y)))
                                                           for x, y in zip(ref, got)]))
        rows = []
        for B in args.sizes:
            T = 1024
            qkv = device_randn((B, T, 3 * C), BF16, seed=1)
            dout = device_randn((B, T, C), BF16, seed=2)
            out = cupy.empty((B, T, C), BF16)
            lse = cupy.empty((B, NH, T), np.float32)
            dqkv = cupy.empty((B, T, 3 * C), BF16)
            scratch = {k: cupy.empty(s, d) for k, (s, d) in
                       fa.flash_scratch_shapes(B, T, C, NH).items()}
            peer = _cudnn(B, T) if args.cudnn else None
            for impl in args.impls:
                def make(name, part):
                    def fwd():
                        fa.flash_attention_forward(out, lse, qkv, NH, impl=impl)

                    def bwd():
                        fa.flash_attention_backward(dqkv, dout, qkv, out, lse, NH, scratch,
                                                    impl=impl)

                    def fn():
                        trees.use(name)  # host-side: a few attribute writes
                        if part in ("fwd", "fb"):
                            fwd()
                        if part in ("bwd", "fb"):
                            bwd()
                    return fn
                for name in dirs:  # compile, and leave out/lse for the backward
                    make(name, "fb")()
                fns = {(name, part): make(name, part) for name in dirs
                       for part in ("fwd", "bwd", "fb")}
                if peer is not None and impl.startswith("sm90"):
                    fns[("cudnn", "fwd")], fns[("cudnn", "fb")] = peer
                med = alternate(fns, rounds=args.rounds)
                for name in list(dirs) + (["cudnn"] if ("cudnn", "fwd") in fns else []):
                    fwd_ms, fb_ms = med[(name, "fwd")], med[(name, "fb")]
                    bwd_ms = med[(name, "bwd")] if (name, "bwd") in med else fb_ms - fwd_ms
                    rows.append({"B": B, "impl": impl, "tree": name, "fwd": fwd_ms,
                                 "bwd": bwd_ms, "fb": fb_ms})
    text = report(rows, bitwise)
    print(text, end="")
    if args.json is not None:
        args.json.write_text(json.dumps({"trees": {k: str(v) for k, v in dirs.items()},
                                         "rows": rows, "bitwise": bitwise}, indent=1))
    return 0 if all(all(b[4]) for b in bitwise) else 1


if __name__ == "__main__":
    sys.exit(main())
