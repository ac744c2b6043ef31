"""The kernel loader: kernels/*.cu -> NVRTC -> cupy.RawModule, one module per (family, dtype).

Design:
- Sources live in `kernels/` at the top of a checkout and ship in the wheel as `llmc/cu/`.
- `#include "common.cuh"` (and any other local header) is folded into the source text before
  compiling. CuPy's on-disk cache (`~/.cupy/kernel_cache`, or $CUPY_CACHE_DIR) keys on the
  source text and options, so editing a header invalidates every module that includes it.
- Each family is compiled per storage dtype: `-DLLMC_BF16` makes `floatX` bf16, else fp32.
- On Hopper the arch is sm_90a, so kernels may use wgmma/setmaxnreg under `__CUDA_ARCH_FEAT_SM90_ALL`.
- Compile time is recorded per module (`compile_times`), cold or from the cache.

CPU-only check (no GPU needed; cupy-cuda12x + the NVRTC/runtime/CCCL wheels):
    python -m llmc.kernels --check            # every family, both dtypes, sm_80 and sm_90a
    python -m llmc.kernels --list             # the families, their sources and kernels
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

FAMILIES = ("encoder", "layernorm", "matmul", "attention", "flash_attention", "flash_attention_bwd",
            "flash_attention_sm90", "flash_attention_sm90_bwd",
            "gelu", "classifier", "adamw", "decode", "sampling", "fp8")
DTYPES = ("bf16", "fp32")
CHECK_ARCHS = ("sm_80", "sm_90a")
BASE_OPTIONS = ("-std=c++17",)

_modules: dict = {}
compile_times: dict = {}  # (family, dtype) -> seconds spent building or loading the module


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the compiler log."""


def kernel_dir() -> Path:
    """Where the .cu sources are: the wheel's llmc/cu, else the checkout's kernels/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "cu", here.parent / "kernels"):
        if (candidate / "common.cuh").is_file():
            return candidate
    raise FileNotFoundError(f"CUDA sources not found next to {here} (looked for cu/ and ../kernels/)")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def source(family: str) -> str:
    """The family's source with local headers folded in (each once)."""
    root = kernel_dir()
    seen = set()

    def fold(path: Path) -> str:
        text = path.read_text()

        def repl(m):
            name = m.group(1)
            if name in seen:
                return f"// {name} already included"
            seen.add(name)
            return f"// ---- {name} ----\n" + fold(root / name) + f"\n// ---- end {name} ----"
        return _INCLUDE.sub(repl, text)

    path = root / f"{family}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no kernel family {family!r}: {path} does not exist")
    return fold(path)


def options(dtype: str, arch: str | None = None) -> tuple:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    opts = list(BASE_OPTIONS)
    if dtype == "bf16":
        opts.append("-DLLMC_BF16")
    if arch is not None:
        opts.append(f"-arch={arch}")
    return tuple(opts)


def device_arch() -> str | None:
    """sm_90a on Hopper (for wgmma); None lets CuPy pick the current device's arch."""
    import cupy
    return "sm_90a" if cupy.cuda.Device().compute_capability == "90" else None


def module(family: str, dtype: str = "bf16"):
    """The compiled cupy.RawModule for a family and storage dtype (built once per process)."""
    import cupy
    dev = cupy.cuda.Device().id
    key = (family, dtype, dev)
    mod = _modules.get(key)
    if mod is None:
        t0 = time.perf_counter()
        mod = cupy.RawModule(code=source(family), options=options(dtype, device_arch()),
                             backend="nvrtc")
        try:
            mod.compile()
        except cupy.cuda.compiler.CompileException as e:
            raise KernelCompileError(f"kernels/{family}.cu ({dtype}) failed to compile:\n{e}") from e
        compile_times[(family, dtype)] = time.perf_counter() - t0
        _modules[key] = mod
    return mod


def function(family: str, name: str, dtype: str = "bf16"):
    """A RawKernel by its extern "C" name."""
    return module(family, dtype).get_function(name)


def load_all(dtype: str = "bf16") -> float:
    """Build every family; returns the seconds it took (cold, or from CuPy's disk cache)."""
    t0 = time.perf_counter()
    for fam in families():
        module(fam, dtype)
    return time.perf_counter() - t0


def families() -> list:
    """The families whose .cu exists (the loader tolerates a family not written yet)."""
    root = kernel_dir()
    return [f for f in FAMILIES if (root / f"{f}.cu").is_file()]


def entry_points(family: str) -> list:
    """The `extern "C" __global__` kernels of a family, in source order."""
    text = (kernel_dir() / f"{family}.cu").read_text()
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?'
                      r'(\w+)\s*\(', text)


# ----------------------------------------------------------------------------------------------
# CPU-only compile check through NVRTC directly (no device, no driver needed)

def compile_check(family: str, dtype: str, arch: str) -> str:
    """Compile one family for `arch`; returns the NVRTC log. Raises KernelCompileError."""
    from cupy_backends.cuda.libs import nvrtc
    import cupy._core.core as core
    prog = nvrtc.createProgram(source(family), f"{family}.cu", [], [])
    try:
        opts = core.assemble_cupy_compiler_options(options(dtype, arch))
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise KernelCompileError(
                f"kernels/{family}.cu ({dtype}, {arch}) failed:\n{nvrtc.getProgramLog(prog)}") from e
        log = nvrtc.getProgramLog(prog).strip()
        nvrtc.getCUBIN(prog)
        return log
    finally:
        nvrtc.destroyProgram(prog)


def check_all(archs=CHECK_ARCHS, verbose=True) -> list:
    """Compile every family x dtype x arch; returns a list of problems (errors and warnings)."""
    problems = []
    for fam in families():
        for dtype in DTYPES:
            for arch in archs:
                t0 = time.perf_counter()
                try:
                    log = compile_check(fam, dtype, arch)
                except KernelCompileError as e:
                    problems.append(str(e))
                    status = "FAILED"
                else:
                    if log:
                        problems.append(f"kernels/{fam}.cu ({dtype}, {arch}) warnings:\n{log}")
                        status = "WARNINGS"
                    else:
                        status = "ok"
                if verbose:
                    print(f"{fam:12s} {dtype:5s} {arch:7s} {status:8s} {time.perf_counter() - t0:6.2f}s")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmc.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compile every kernel for sm_80 and sm_90a on the CPU")
    ap.add_argument("--arch", action="append", help="arch(s) for --check (default sm_80, sm_90a)")
    ap.add_argument("--list", action="store_true", help="list the kernel families with their source files and kernels (the default)")
    args = ap.parse_args(argv)
    if args.list or not args.check:
        for fam in families():
            print(f"{fam:20s} kernels/{fam}.cu: {', '.join(entry_points(fam))}")
        return 0
    problems = check_all(tuple(args.arch or CHECK_ARCHS))
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
