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
