"""Shared pytest set-up for tests/ and bench/: the `gpu` marker skips cleanly without a CUDA device.

Run everything:            pytest
Only the GPU tests:        pytest -m gpu
Benchmarks:                pytest bench/ --benchmark-only
"""
import functools

import pytest


@functools.lru_cache(maxsize=1)
def gpu_skip_reason():
    """None when a CUDA device is usable, else why not (llmc.cuda.device.cuda_problem: the real cause,
    e.g. "no NVIDIA driver on this machine", not CUDA's "driver version is insufficient")."""
    from llmc.cuda.device import cuda_problem
    return cuda_problem()


def gpu_count():
    if gpu_skip_reason() is not None:
        return 0
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    for item in items:
        if reason is not None and ("gpu" in item.keywords or "multigpu" in item.keywords):
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}"))
        elif "multigpu" in item.keywords and gpu_count() < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2+ GPUs, found {gpu_count()}"))

