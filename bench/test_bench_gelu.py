"""GELU throughput at the GPT-2 124M MLP activation: (B=64, T=1024, 4C=3072) = 201M elements.

Memory-bound: the forward reads x and writes y (2 n bytes/elt), the backward reads x and dout and
writes dinp in place (3 n). `extra_info`: CUDA-event median ms (L2 flushed), GB/s and the
fraction of this card's measured memory ceiling (bench/timing.py), and PyTorch's F.gelu(approximate="tanh") on the same tensor (bf16 only) as a peer.
Correctness is checked on a small case against llmc.model.reference first.

Run:  python -m pytest bench/test_bench_gelu.py --benchmark-only -q
"""
import ml_dtypes
import numpy as np
import pytest

from bench.timing import device_randn, record, to_host, torch_peer
from llmc.model import reference
from tests.tolerances import assert_close

SHAPE = (64, 1024, 3072)
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
UINT = {2: np.uint16, 4: np.uint32}


def check_small(dtype):
    import cupy
    from llmc.ops.gelu import gelu_backward, gelu_forward
    dt = DTYPES[dtype]
    rng = np.random.default_rng(0)
    x = (2 * rng.standard_normal((3, 1001))).astype(dt)
    dy = rng.standard_normal((3, 1001)).astype(dt)
    d_x = cupy.asarray(x.view(UINT[dt.itemsize])).view(dt)
    d_dy = cupy.asarray(dy.view(UINT[dt.itemsize])).view(dt)
    out = cupy.empty_like(d_x)
    gelu_forward(out, d_x)
    gelu_backward(d_dy, d_x, d_dy)
    assert_close(to_host(out), reference.gelu_forward(x.astype(np.float64)), dtype, "out")
    assert_close(to_host(d_dy), reference.gelu_backward(x.astype(np.float64),
                                                        dy.astype(np.float64)), dtype, "dinp")


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bench_gelu(benchmark, dtype, direction):
    from llmc.ops.gelu import gelu_backward, gelu_forward
    check_small(dtype)
    dt = DTYPES[dtype]
    x = device_randn(SHAPE, dt, seed=1, scale=2.0)
    buf = device_randn(SHAPE, dt, seed=2, scale=1e-3)
    n = x.size
    if direction == "forward":
        ms = record(benchmark, lambda: gelu_forward(buf, x), nbytes=2 * n * dt.itemsize)
    else:  # in place, as in the model; dout stays finite (|gelu'| <= 1.13, values tiny)
        ms = record(benchmark, lambda: gelu_backward(buf, x, buf), nbytes=3 * n * dt.itemsize)
    assert np.all(np.isfinite(to_host(buf[0, :4]))), "values went non-finite while timing"
    if dtype == "bf16" and direction == "forward":
        def make():
            import torch
            import torch.nn.functional as F
            t = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16)
            return lambda: F.gelu(t, approximate="tanh")
        torch_peer(benchmark.extra_info, "torch_gelu", make, ms)
