"""LayerNorm / residual throughput at GPT-2 124M: N = B*T = 65536 rows of C = 768.

Memory-bound. Bytes are the minimum traffic: forward reads x and writes out (+ mean, rstd);
fused residual reads two inputs and writes residual and out; residual reads two, writes one;
backward reads dout, x and dinp and writes dinp (dinp +=). `extra_info`: CUDA-event median ms (L2
flushed), GB/s, fraction of this card's measured memory ceiling; in bf16 also PyTorch's F.layer_norm forward and forward+backward
as peers. Correctness is checked on a small case against llmc.model.reference first.

Run:  python -m pytest bench/test_bench_layernorm.py --benchmark-only -q
"""
import ml_dtypes
import numpy as np
import pytest

from bench.timing import cuda_time, device_randn, record, to_host, torch_peer
from llmc.model import reference
from tests.tolerances import assert_close

N, C = 64 * 1024, 768
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
KINDS = ["forward", "fused_residual", "residual", "backward"]


def check_small(dtype):
    import cupy
    from llmc.ops.layernorm import (layernorm_backward, layernorm_backward_scratch_size,
                                    layernorm_forward)
    dt = DTYPES[dtype]
    n, c = 37, 264
    x, w, b = device_randn((n, c), dt, 1), device_randn((c,), dt, 2), device_randn((c,), dt, 3)
    out = cupy.empty((n, c), dt)
    mean, rstd = cupy.empty(n, np.float32), cupy.empty(n, np.float32)
    layernorm_forward(out, mean, rstd, x, w, b)
    ref_out, _, _ = reference.layernorm_forward(to_host(x), to_host(w), to_host(b))
    assert_close(to_host(out), ref_out, dtype, "out")
    dinp, dw, db = cupy.zeros((n, c), dt), cupy.zeros(c, dt), cupy.zeros(c, dt)
    scratch = cupy.empty(layernorm_backward_scratch_size(n, c), cupy.uint8)
    layernorm_backward(dinp, dw, db, out, x, w, mean, rstd, scratch)
    ref = reference.layernorm_backward(to_host(out), to_host(x), to_host(w),
                                       mean.get().astype(np.float64), rstd.get().astype(np.float64))
    for name, got, want in zip(("dinp", "dweight", "dbias"), (dinp, dw, db), ref):
        assert_close(to_host(got), want, dtype, name)


def torch_ln(train):
    import torch
    import torch.nn.functional as F
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    w = torch.ones(C, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    b = torch.zeros(C, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    g = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    if not train:
        return lambda: F.layer_norm(x, (C,), w, b)
    return lambda: torch.autograd.backward(F.layer_norm(x, (C,), w, b), g)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bench_layernorm(benchmark, dtype, kind):
    import cupy
    from llmc.ops import layernorm as ln
    check_small(dtype)
    dt = DTYPES[dtype]
    s = dt.itemsize
    x, x2 = device_randn((N, C), dt, 1), device_randn((N, C), dt, 2)
    w, b = device_randn((C,), dt, 3), device_randn((C,), dt, 4)
    out, res = cupy.empty((N, C), dt), cupy.empty((N, C), dt)
    mean, rstd = cupy.empty(N, np.float32), cupy.empty(N, np.float32)
    ln.layernorm_forward(out, mean, rstd, x, w, b)
    info = benchmark.extra_info
    if kind == "forward":
        ms = record(benchmark, lambda: ln.layernorm_forward(out, mean, rstd, x, w, b),
                    nbytes=2 * N * C * s + 8 * N)
        peer = ("torch_layer_norm_fwd", lambda: torch_ln(False))
    elif kind == "fused_residual":
        ms = record(benchmark, lambda: ln.fused_residual_layernorm_forward(
            res, out, mean, rstd, x, x2, w, b), nbytes=4 * N * C * s + 8 * N)
        peer = None
    elif kind == "residual":
        ms = record(benchmark, lambda: ln.residual_forward(res, x, x2), nbytes=3 * N * C * s)
        peer = None
    else:
        dinp = device_randn((N, C), dt, 5, 1e-3)
        dout = device_randn((N, C), dt, 6, 1e-3)
        dw, db = cupy.zeros(C, dt), cupy.zeros(C, dt)
        scratch = cupy.empty(ln.layernorm_backward_scratch_size(N, C), cupy.uint8)
        record(benchmark, lambda: ln.layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd,
                                                        scratch),
               nbytes=4 * N * C * s + 8 * N)

        def fwd_bwd():  # what the PyTorch peer does: forward, then backward
            ln.layernorm_forward(out, mean, rstd, x, w, b)
            ln.layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd, scratch)
        ms = cuda_time(fwd_bwd)
        info["ours_fwd_bwd_ms"] = round(ms, 4)
        peer = ("torch_layer_norm_fwd_bwd", lambda: torch_ln(True))
    if dtype == "bf16" and peer is not None:
        torch_peer(info, peer[0], peer[1], ms)
