"""Linear layers of GPT-2 124M at B*T = 65536 rows: cuBLASLt products (bias epilogue, fused GELU
backward) plus our deterministic dbias kernels.

Shapes (C -> OC): qkv 768 -> 2304, fc 768 -> 3072, fcproj 3072 -> 768, attproj 768 -> 768.
Forward (bias added in the product's epilogue), forward without bias (the product alone: what
the bias costs), backward (dinp, dweight += and the deterministic dbias), backward without
bias, fcproj's backward with the GELU backward fused into dinp (`unfused_ms`: the same
backward, then our gelu_backward kernel), and the dbias reduction alone (memory-bound: reads
dout once). `extra_info`: CUDA-event median ms (L2 flushed), TFLOP/s and fraction of this card's
8192^3 GEMM of the same dtype for the products, GB/s and fraction of its memory ceiling for dbias; in bf16 also PyTorch's F.linear (cuBLASLt with the bias epilogue) as
a peer for the forward.
Correctness is checked on a small case against llmc.model.reference first.

Measured on an H100 (bf16 ms; "before": gemmEx after writing the bias into out, dbias ours):
| layer   | forward before / now / F.linear | backward before / now |
| qkv     | 0.450 / 0.337 / 0.337           | 0.769 / 0.767         |
| fc      | 0.601 / 0.442 / 0.443           | 0.955 / 0.956         |
| fcproj  | 0.449 / 0.413 / 0.413           | 0.885 / 0.886         |
| attproj | 0.173 / 0.123 / 0.123           | 0.282 / 0.283         |
fcproj backward with the GELU backward fused: 1.023 ms, unfused (then gelu_backward) 1.304.
cuBLASLt's bias-gradient epilogue (BGRADB) instead of our dbias kernels made the backward slower
(qkv 0.806, fc 0.999, fcproj 0.897, attproj 0.294 ms), so dbias stays ours.

Run:  python -m pytest bench/test_bench_matmul.py --benchmark-only -q
"""
import ml_dtypes
import numpy as np
import pytest

from bench.timing import cuda_time, device_randn, record, to_host, torch_peer
from llmc.model import reference
from llmc.cuda.cublas import matmul_flops
from tests.tolerances import assert_close

N = 64 * 1024
LAYERS = {"qkv": (768, 2304), "fc": (768, 3072), "fcproj": (3072, 768), "attproj": (768, 768)}
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}


def check_small(dtype):
    import cupy
    from llmc.ops.matmul import matmul_backward, matmul_backward_scratch_size, matmul_forward
    dt = DTYPES[dtype]
    n, c, oc = 100, 96, 264
    x, w = device_randn((n, c), dt, 1), device_randn((oc, c), dt, 2, 0.1)
    b = device_randn((oc,), dt, 3)
    out = cupy.empty((n, oc), dt)
    matmul_forward(out, x, w, b)
    assert_close(to_host(out), reference.matmul_forward(to_host(x), to_host(w), to_host(b)),
                 dtype, "out")
    dinp, dw, db = cupy.empty((n, c), dt), cupy.zeros((oc, c), dt), cupy.zeros(oc, dt)
    scratch = cupy.empty(matmul_backward_scratch_size(n, oc), cupy.uint8)
    matmul_backward(dinp, dw, db, out, x, w, scratch)
    ref = reference.matmul_backward(to_host(out), to_host(x), to_host(w))
    for name, got, want in zip(("dinp", "dweight", "dbias"), (dinp, dw, db), ref):
        assert_close(to_host(got), want, dtype, name)
    pre = device_randn((n, c), dt, 4)
    matmul_backward(dinp, dw, db, out, x, w, scratch, pre_gelu=pre)
    assert_close(to_host(dinp), reference.gelu_backward(to_host(pre), ref[0]), dtype,
                 "dinp (pre_gelu)")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["forward", "forward_nobias", "backward", "backward_nobias",
                                  "backward_dgelu", "dbias"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bench_matmul(benchmark, dtype, layer, kind):
    import cupy
    from llmc.ops.gelu import gelu_backward
    from llmc.ops.matmul import (bias_backward, matmul_backward, matmul_backward_scratch_size,
                                 matmul_forward)
    if kind == "backward_dgelu" and layer != "fcproj":
        pytest.skip("the GELU backward is fused into fcproj's backward only")
    check_small(dtype)
    dt = DTYPES[dtype]
    C, OC = LAYERS[layer]
    x, w = device_randn((N, C), dt, 1), device_randn((OC, C), dt, 2, 0.02)
    b = device_randn((OC,), dt, 3)
    out = cupy.empty((N, OC), dt)
    info = benchmark.extra_info
    if kind in ("forward", "forward_nobias"):
        bias = b if kind == "forward" else None
        ms = record(benchmark, lambda: matmul_forward(out, x, w, bias),
                    flops=matmul_flops(N, OC, C), dtype=dtype)
        if dtype == "bf16" and kind == "forward":
            def make():
                import torch
                import torch.nn.functional as F
                tx = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
                tw = torch.randn(OC, C, device="cuda", dtype=torch.bfloat16) * 0.02
                tb = torch.randn(OC, device="cuda", dtype=torch.bfloat16)
                return lambda: F.linear(tx, tw, tb)
            torch_peer(info, "torch_linear", make, ms)
        return
    dout = device_randn((N, OC), dt, 4, 1e-3)
    scratch = cupy.empty(matmul_backward_scratch_size(N, OC), cupy.uint8)
    db = cupy.zeros(OC, dt)
    dinp, dw = cupy.empty((N, C), dt), cupy.zeros((OC, C), dt)
    if kind in ("backward", "backward_nobias"):
        dbias = db if kind == "backward" else None
        record(benchmark, lambda: matmul_backward(dinp, dw, dbias, dout, x, w, scratch),
               flops=2 * matmul_flops(N, OC, C), dtype=dtype)
        return
    if kind == "backward_dgelu":
        pre = device_randn((N, C), dt, 5)
        ms = record(benchmark, lambda: matmul_backward(dinp, dw, db, dout, x, w, scratch,
                                                       pre_gelu=pre),
                    flops=2 * matmul_flops(N, OC, C), dtype=dtype)

        def unfused():
            matmul_backward(dinp, dw, db, dout, x, w, scratch)
            gelu_backward(dinp, pre, dinp)
        info["unfused_ms"] = round(cuda_time(unfused), 4)
        info["speedup_vs_unfused"] = round(info["unfused_ms"] / ms, 3)
        return
    record(benchmark, lambda: bias_backward(db, dout, scratch), nbytes=N * OC * dt.itemsize)
