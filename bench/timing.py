"""GPU timing for the benchmarks: CUDA events around the call, after a warm-up.

    cuda_time(fn, warmup=3, iters=20) -> median milliseconds of fn() on the current stream
    bandwidth_info(nbytes, ms) -> extra_info entries for a memory-bound kernel
    flops_info(flops, ms) -> extra_info entries for a compute-bound kernel

The warm-up keeps NVRTC compilation and the first-touch of buffers out of the measurement. The
reference peaks are the H100's: ~3.0 TB/s measured copy bandwidth (HBM3) and ~780 TFLOP/s dense
bf16 with fp32 accumulation as measured by large cuBLAS products (989 nominal).
"""
from __future__ import annotations

import numpy as np

PEAK_BYTES_PER_S = 3.0e12
PEAK_FLOPS = 780e12


def cuda_time(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of fn() measured between CUDA events on the current stream."""
    import cupy
    for _ in range(warmup):
        fn()
    stream = cupy.cuda.get_current_stream()
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(iters)]
    for start, end in events:
        start.record(stream)
        fn()
        end.record(stream)
    events[-1][1].synchronize()
    times = [cupy.cuda.get_elapsed_time(start, end) for start, end in events]
    return float(np.median(times))


def bandwidth_info(nbytes: int, ms: float) -> dict:
    """{ms, GB/s, fraction of PEAK_BYTES_PER_S} for a kernel that moves `nbytes` of DRAM."""
    bps = nbytes / (ms * 1e-3)
    return {"ms": round(ms, 4), "bytes": int(nbytes), "GB_per_s": round(bps / 1e9, 1),
            "frac_of_3.0TB_per_s": round(bps / PEAK_BYTES_PER_S, 3)}


def flops_info(flops: int, ms: float) -> dict:
    """{ms, TFLOP/s, fraction of PEAK_FLOPS} for a kernel doing `flops` floating-point ops."""
    fps = flops / (ms * 1e-3)
    return {"ms": round(ms, 4), "flops": int(flops), "TFLOP_per_s": round(fps / 1e12, 1),
            "frac_of_780TFLOP_per_s": round(fps / PEAK_FLOPS, 3)}


def record(benchmark, fn, *, nbytes: int | None = None, flops: int | None = None,
           warmup: int = 3, iters: int = 20, rounds: int = 10) -> float:
    """Time fn() with CUDA events (median ms), run it under pytest-benchmark (synchronized
    rounds), and put ms plus GB/s or TFLOP/s and their peak fractions in extra_info."""
    import cupy
    ms = cuda_time(fn, warmup, iters)

    def synced():
        fn()
        cupy.cuda.get_current_stream().synchronize()

    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info["ms"] = round(ms, 4)
    if nbytes is not None:
        benchmark.extra_info.update(bandwidth_info(nbytes, ms))
    if flops is not None:
        benchmark.extra_info.update(flops_info(flops, ms))
    return ms


def torch_peer(info: dict, name: str, make, ours_ms: float, warmup: int = 3, iters: int = 20):
    """Time a PyTorch peer on the same GPU: make() imports torch and returns the callable.

    Records info[f"{name}_ms"] and info[f"speedup_vs_{name}"] (> 1: we are faster); a missing
    torch or an out-of-memory is recorded instead of failing the benchmark. Both libraries run
    on the legacy default stream, so CuPy events time the torch work.
    """
    try:
        fn = make()
        ms = cuda_time(fn, warmup, iters)
    except (ImportError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        info[f"{name}_ms"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        return None
    info[f"{name}_ms"] = round(ms, 4)
    info[f"speedup_vs_{name}"] = round(ms / ours_ms, 3)
    return ms


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
    import cupy
    return cupy.asnumpy(a.view(_UINT[a.dtype.itemsize])).view(a.dtype).astype(np.float64)
