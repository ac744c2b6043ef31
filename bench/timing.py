"""GPU timing for the benchmarks, against the ceilings of the card in hand, measured once.

    ceilings() -> Ceilings          this GPU's measured limits (cached for the process):
        memory: the best of a 2 GiB device-to-device copy (bytes read + written), a 2 GiB
                read-only sum (CUB) and a 2 GiB memset; compute: 8192^3 GEMMs through cuBLASLt
                in bf16 and in fp32 (fp32 accumulation, no TF32, as our products)
    flush_l2()                      write 4x the L2 size so no input of the next call sits in L2
    cuda_time(fn, warmup=3, iters=20, flush=True) -> median ms of fn() alone: each call between
        two CUDA events on the current stream, the L2 flush before the first event
    record(benchmark, fn, *, nbytes=None, flops=None, dtype="bf16") -> median ms; fills
        extra_info (ms, GB/s or TFLOP/s, fraction of this card's ceiling) and adds a row to ROWS
    torch_peer(info, name, make, ours_ms, ours_fn=None) -> the PyTorch peer's median ms on the
        same GPU, timed the same way (with ours_fn: in alternation with ours), noted in
        extra_info and on the benchmark's row
    alternate({name: fn}, rounds=3) -> {name: median ms}, the callables timed in turns
    ROWS: the rows of this session; bench/conftest.py prints them as a table at the end.

Why: with fixed H100 figures (3.0 TB/s, 780 TFLOP/s) and warm L2, memory-bound kernels on an
H200 showed 1.1-1.7x "of peak". Flushing L2 makes every call read its inputs from DRAM, and
the ceiling is this card's own, so a figure above 100% is a measurement bug (the table marks
it), not a fast kernel. Byte counts are the minimum DRAM traffic of each kernel.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

CEILING_BYTES = 2 << 30      # 2 GiB per ceiling buffer: far beyond any L2
GEMM_N = 8192
ROWS: list = []              # one dict per recorded benchmark, in run order


@dataclass(frozen=True)
class Ceilings:
    name: str
    l2_bytes: int
    copy_bytes_per_s: float      # device-to-device copy, bytes read + written
    read_bytes_per_s: float      # read-only reduction
    write_bytes_per_s: float     # memset
    gemm_flops_per_s: dict       # "bf16" / "fp32" -> FLOP/s of an 8192^3 product

    @property
    def bytes_per_s(self) -> float:
        """The memory ceiling: the fastest of copy, read and write."""
        return max(self.copy_bytes_per_s, self.read_bytes_per_s, self.write_bytes_per_s)

    def describe(self) -> str:
        g = self.gemm_flops_per_s
        return (f"{self.name}: memory {self.bytes_per_s / 1e12:.2f} TB/s (copy "
                f"{self.copy_bytes_per_s / 1e12:.2f}, read {self.read_bytes_per_s / 1e12:.2f}, "
                f"write {self.write_bytes_per_s / 1e12:.2f}); {GEMM_N}^3 GEMM bf16 "
                f"{g['bf16'] / 1e12:.0f} TFLOP/s, fp32 {g['fp32'] / 1e12:.1f} TFLOP/s; "
                f"L2 {self.l2_bytes / 2**20:.0f} MiB (flushed before every timed call)")


def _median_ms(fn, warmup: int, iters: int, flush: bool) -> float:
    import cupy
    for _ in range(warmup):
        fn()
    stream = cupy.cuda.get_current_stream()
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(iters)]
    for start, end in events:
        if flush:
            flush_l2()
        start.record(stream)
        fn()
        end.record(stream)
    events[-1][1].synchronize()
    return float(np.median([cupy.cuda.get_elapsed_time(s, e) for s, e in events]))


@functools.lru_cache(maxsize=None)
def _flush_buffer(device: int):
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(device)
    l2 = int(props["l2CacheSize"])
    return l2, cupy.empty(max(4 * l2, 64 << 20), dtype=np.uint8)


def flush_l2() -> None:
    """Write 4x the L2 size (at least 64 MiB) on the current stream: evicts every earlier line."""
    import cupy
    _, buf = _flush_buffer(cupy.cuda.Device().id)
    buf.data.memset_async(0, buf.nbytes)


@functools.lru_cache(maxsize=None)
def _ceilings(device: int) -> Ceilings:
    import cupy
    from llmc.cuda import cublaslt
    from llmc.ops import BF16
    props = cupy.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    l2, _ = _flush_buffer(device)
    n = CEILING_BYTES
    src, dst = cupy.ones(n // 4, dtype=np.float32), cupy.empty(n, dtype=np.uint8)
    copy_ms = _median_ms(lambda: dst.data.copy_from_device_async(src.data, n), 2, 10, False)
    out = cupy.empty((), dtype=np.float32)
    read_ms = _median_ms(lambda: cupy.sum(src, out=out), 2, 10, False)
    write_ms = _median_ms(lambda: dst.data.memset_async(0, n), 2, 10, False)
    del src, dst
    gemm = {}
    for key, dt in (("bf16", BF16), ("fp32", np.dtype(np.float32))):
        a, b = device_randn((GEMM_N, GEMM_N), dt, 1), device_randn((GEMM_N, GEMM_N), dt, 2)
        c = cupy.empty((GEMM_N, GEMM_N), dtype=dt)
        ms = _median_ms(lambda: cublaslt.matmul(c, a, b, trans_b=True), 3, 10, False)
        gemm[key] = 2 * GEMM_N ** 3 / (ms * 1e-3)
        del a, b, c
    cupy.get_default_memory_pool().free_all_blocks()
    return Ceilings(name, l2, 2 * n / (copy_ms * 1e-3), n / (read_ms * 1e-3),
                    n / (write_ms * 1e-3), gemm)


def ceilings() -> Ceilings:
    """This GPU's measured ceilings (measured on the first call, then cached)."""
    import cupy
    return _ceilings(cupy.cuda.Device().id)


def measured_ceilings():
    """The ceilings if this process measured them, else None (nothing is measured here)."""
    info = _ceilings.cache_info()
    if info.currsize == 0:
        return None
    import cupy
    return _ceilings(cupy.cuda.Device().id)


def cuda_time(fn, warmup: int = 3, iters: int = 20, flush: bool = True) -> float:
    """Median milliseconds of fn() alone between CUDA events, L2 flushed before each call."""
    return _median_ms(fn, warmup, iters, flush)


def bandwidth_info(nbytes: int, ms: float) -> dict:
    """{bytes, GB/s, fraction of this card's memory ceiling} for `nbytes` of DRAM traffic."""
    bps = nbytes / (ms * 1e-3)
    return {"bytes": int(nbytes), "GB_per_s": round(bps / 1e9, 1),
            "frac_of_ceiling": round(bps / ceilings().bytes_per_s, 3)}


def flops_info(flops: int, ms: float, dtype: str = "bf16") -> dict:
    """{flops, TFLOP/s, fraction of this card's GEMM ceiling in `dtype`}."""
    fps = flops / (ms * 1e-3)
    return {"flops": int(flops), "TFLOP_per_s": round(fps / 1e12, 1),
            "frac_of_ceiling": round(fps / ceilings().gemm_flops_per_s[dtype], 3)}


def record(benchmark, fn, *, nbytes: int | None = None, flops: int | None = None,
           dtype: str = "bf16", warmup: int = 3, iters: int = 20, rounds: int = 10) -> float:
    """Time fn() with cuda_time (L2 flushed, median ms), run it under pytest-benchmark
    (synchronized rounds), fill extra_info and add the benchmark's row to ROWS.

    nbytes: minimum DRAM bytes of one call (memory-bound); flops: its FLOPs (compute-bound), of
    a `dtype` ("bf16" or "fp32") product, compared with the GEMM ceiling of that dtype.
    """
    import cupy
    ceilings()  # measured before the first timing, never inside it
    ms = cuda_time(fn, warmup, iters)

    def synced():
        fn()
        cupy.cuda.get_current_stream().synchronize()

    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=1, iterations=1)
    info = benchmark.extra_info
    info["ms"] = round(ms, 4)
    row = {"name": benchmark.name, "ms": ms, "rate": None, "frac": None, "peers": [],
           "info": info}
    if nbytes is not None:
        info.update(bandwidth_info(nbytes, ms))
        row.update(rate=f"{info['GB_per_s']:.0f} GB/s", frac=info["frac_of_ceiling"])
    if flops is not None:
        info.update(flops_info(flops, ms, dtype))
        row.update(rate=f"{info['TFLOP_per_s']:.1f} TFLOP/s", frac=info["frac_of_ceiling"])
    ROWS.append(row)
    return ms


def alternate(fns: dict, rounds: int = 3, warmup: int = 3, iters: int = 20) -> dict:
    """Median ms of each callable, timed by cuda_time in alternation: round r times every one of
    them, starting one further along the list each round. Under sustained load the card's clock
    drifts (it warms, it meets its power limit), so the one timed later would lose; alternating
    gives each the same share of every state. Returns {name: median over the rounds}."""
    import statistics
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(cuda_time(fns[n], warmup, iters))
    return {n: statistics.median(t) for n, t in times.items()}


def torch_peer(info: dict, name: str, make, ours_ms: float, warmup: int = 3, iters: int = 20,
               ours_fn=None, rounds: int = 3):
    """Time a PyTorch peer on the same GPU: make() imports torch and returns the callable.

    Records info[f"{name}_ms"] and info[f"speedup_vs_{name}"] (> 1: we are faster), and the
    peer on the row of the benchmark that owns `info`; a missing torch or an out-of-memory is
    recorded instead of failing the benchmark. Both libraries run on the legacy default stream,
    so CuPy events time the torch work; L2 is flushed before each call as for ours. With ours_fn
    (our callable), ours and the peer are timed in alternation (`alternate`, `rounds` each) and
    the speedup is the ratio of those medians; ours then goes to info[f"ours_ms_beside_{name}"].
    """
    row = next((r for r in reversed(ROWS) if r["info"] is info), None)
    try:
        fn = make()
        if ours_fn is None:
            ms = cuda_time(fn, warmup, iters)
        else:
            med = alternate({"ours": ours_fn, name: fn}, rounds, warmup, iters)
            ms, ours_ms = med[name], med["ours"]
            info[f"ours_ms_beside_{name}"] = round(ours_ms, 4)
    except (ImportError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        info[f"{name}_ms"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        if row is not None:
            row["peers"].append((name, None, ours_ms))
        return None
    info[f"{name}_ms"] = round(ms, 4)
    info[f"speedup_vs_{name}"] = round(ms / ours_ms, 3)
    if row is not None:
        row["peers"].append((name, ms, ours_ms))
    return ms


def table() -> list:
    """The session's rows as text lines: kernel, ms, rate, % of ceiling, peers."""
    if not ROWS:
        return []
    lines = []
    c = measured_ceilings()
    if c is not None:
        lines.append("ceilings measured on " + c.describe())
    width = max(len(r["name"]) for r in ROWS)
    lines.append(f"{'kernel':{width}s} {'ms':>9s} {'rate':>15s} {'% ceiling':>9s}  peer (same work)")
    for r in ROWS:
        frac = r["frac"]
        pct = "" if frac is None else f"{100 * frac:.1f}%"
        if frac is not None and frac > 1.0:
            pct += " !"
        peers = "; ".join(f"{n} failed" if ms is None else
                          f"{n} {ms:.4f} ms (ours {ours:.4f}, {ms / ours:.2f}x)"
                          for n, ms, ours in r["peers"])
        lines.append(f"{r['name']:{width}s} {r['ms']:9.4f} {r['rate'] or '':>15s} {pct:>9s}  {peers}")
    if any(r["frac"] is not None and r["frac"] > 1.0 for r in ROWS):
        lines.append("! above this card's measured ceiling: a byte/FLOP count or timing bug")
    return lines


_UINT = {2: np.uint16, 4: np.uint32}


def device_randn(shape, dtype, seed: int = 0, scale: float = 1.0, block: int = 1 << 22):
    """A device array of `dtype` (float32 or ml_dtypes.bfloat16) filled with N(0, scale^2) values.

    Drawn on the host in one block of `block` values, rounded there, and tiled on the device as
    raw bits: fast for 100M+ element benchmark buffers and independent of CuPy's bf16 support.
    """
    import cupy
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    base = (scale * np.random.default_rng(seed).standard_normal(min(n, block))).astype(dt)
    bits = cupy.asarray(base.view(_UINT[dt.itemsize]))
    reps = -(-n // bits.size)
    return cupy.tile(bits, reps)[:n].reshape(shape).view(dt)


def to_host(a) -> np.ndarray:
    """float64 host copy of a float32 or bf16 device array (through its raw bits)."""
    from llmc.ops.arrays import to_host as raw
    return raw(a).astype(np.float64)
