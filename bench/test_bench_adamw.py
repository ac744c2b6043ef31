"""Optimizer throughput over the GPT-2 124M flat buffer (124,475,904 parameters).

Memory-bound. The fused AdamW update reads grads (bf16), master, m, v (fp32) and writes
params (bf16), master, m, v: 28 bytes per parameter; in fp32 mode (params are the master) it
reads p, g, m, v and writes p, m, v: also 28 bytes.
The gradient norm reads the gradients once. `extra_info`: CUDA-event median ms (L2 flushed), GB/s,
fraction of this card's measured memory ceiling; for the bf16 update also PyTorch's fused AdamW (fp32 params and grads, one
tensor) as a peer. Correctness is checked on a small buffer against llmc.training.optim first.

Run:  python -m pytest bench/test_bench_adamw.py --benchmark-only -q
"""
import math

import ml_dtypes
import numpy as np
import pytest

from bench.timing import device_randn, record, torch_peer
from llmc.training import optim
from llmc.model import params
from llmc.config import ModelConfig
from tests.tolerances import assert_close

MC = ModelConfig(n_layer=12, n_head=12, n_embd=768)
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
HP = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def check_small(dtype):
    import cupy
    from llmc.ops.adamw import (adamw_update, decay_table, global_norm_scratch_size,
                                global_norm_squared)
    dt = DTYPES[dtype]
    n = 4099
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n).astype(dt)
    p = (0.1 * rng.standard_normal(n)).astype(np.float32)
    ranges = [(0, 2000, True), (2000, n, False)]
    decay = np.arange(n) < 2000
    uint = np.uint16 if dt.itemsize == 2 else np.uint32
    d_g = cupy.asarray(g.view(uint)).view(dt)
    d_p = cupy.asarray(p.astype(dt).view(uint)).view(dt)
    master = cupy.asarray(p) if dtype == "bf16" else None
    m, v = cupy.zeros(n, np.float32), cupy.zeros(n, np.float32)
    ns = cupy.empty(1, np.float32)
    scratch = cupy.empty(global_norm_scratch_size(n), cupy.uint8)
    global_norm_squared(ns, d_g, scratch)
    adamw_update(d_p, master, d_g, m, v, ns, step=1, grad_clip=1.0, seed=0,
                 ranges=decay_table(ranges), **HP)
    p64, m64, v64 = p.astype(np.float64), np.zeros(n), np.zeros(n)
    scale = optim.clip_scale(math.sqrt(float(ns.get()[0])), 1.0)
    optim.adamw_step(p64, g.astype(np.float64), m64, v64, t=1, decay=decay, grad_scale=scale, **HP)
    got = (master if master is not None else d_p).get()
    assert_close(got - p, p64 - p, "fp32", "update")
    assert_close(m.get(), m64, "fp32", "m")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["update", "norm"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bench_adamw(benchmark, dtype, kind):
    import cupy
    from llmc.ops.adamw import (adamw_update, decay_table, global_norm_scratch_size,
                                global_norm_squared)
    check_small(dtype)
    dt = DTYPES[dtype]
    n = params.num_params(MC)
    grads = device_randn((n,), dt, 1, 1e-3)
    ns = cupy.empty(1, np.float32)
    scratch = cupy.empty(global_norm_scratch_size(n), cupy.uint8)
    global_norm_squared(ns, grads, scratch)
    if kind == "norm":
        record(benchmark, lambda: global_norm_squared(ns, grads, scratch), nbytes=n * dt.itemsize)
        return
    p = device_randn((n,), dt, 2, 0.02)
    master = device_randn((n,), np.float32, 2, 0.02) if dtype == "bf16" else None
    m, v = cupy.zeros(n, np.float32), cupy.zeros(n, np.float32)
    table = decay_table(params.decay_ranges(MC))
    nbytes = 28 * n
    ms = record(benchmark, lambda: adamw_update(p, master, grads, m, v, ns, step=1, grad_clip=1.0,
                                                seed=0, ranges=table, **HP), nbytes=nbytes)
    if dtype == "bf16":
        def make():
            import torch
            w = torch.nn.Parameter(torch.randn(n, device="cuda") * 0.02)
            w.grad = torch.randn(n, device="cuda") * 1e-3
            opt = torch.optim.AdamW([w], lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                    fused=True)
            return opt.step
        torch_peer(benchmark.extra_info, "torch_fused_adamw_fp32", make, ms)
