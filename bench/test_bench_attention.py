"""Causal self-attention at GPT-2 124M: B=64 and B=16, NH=12, T=1024, HS=64 (C=768), bf16.

Timed in one process: llmc's flash kernels (the device's default: the wgmma kernels on
Hopper; "flash_sm80" forces the mma.sync ones), the "matmul"
method of llmc.ops.attention (cuBLAS products + our softmax, a T x T matrix per head), and PyTorch
scaled_dot_product_attention(is_causal=True) with the FlashAttention-2 backend and the cuDNN
backend as peers. Forward, and forward + backward (dqkv `=` from dout). FLOPs are counted causal,
as in PEERS.md: forward 2*B*NH*T^2*HS, forward + backward 3.5x that. `extra_info`: CUDA-event
median ms (L2 flushed), TFLOP/s, fraction of this card's bf16 8192^3 GEMM, peer ms and speedups; the flash forward+backward
cases also give the backward alone. The peers are timed in alternation with ours (3 rounds
each, medians; `ours_ms_beside_<peer>`): the card warms and meets its power limit under this
load, and whichever ran later would lose. Correctness is checked on a small case first.

Run:  python -m pytest bench/test_bench_attention.py --benchmark-only -q
"""
import ml_dtypes
import numpy as np
import pytest

from bench.timing import cuda_time, device_randn, record, to_host, torch_peer
from llmc.model import reference
from tests.tolerances import assert_close

NH, T, HS = 12, 1024, 64
C = NH * HS
BF16 = np.dtype(ml_dtypes.bfloat16)
METHODS = ["flash", "flash_sm80", "matmul"]


def flops(B: int, direction: str) -> int:
    forward = 2 * B * NH * T * T * HS
    return forward if direction == "forward" else int(3.5 * forward)


def check_small():
    """Flash forward + backward on B=2, T=100 against the float64 reference."""
    import cupy
    from llmc.ops.flash_attention import (flash_attention_backward, flash_attention_forward,
                                          flash_scratch_shapes)
    b, t = 2, 100
    qkv, dout = device_randn((b, t, 3 * C), BF16, 1), device_randn((b, t, C), BF16, 2)
    out, lse = cupy.empty((b, t, C), BF16), cupy.empty((b, NH, t), np.float32)
    dqkv = cupy.empty((b, t, 3 * C), BF16)
    scratch = {k: cupy.empty(s, d) for k, (s, d) in flash_scratch_shapes(b, t, C, NH).items()}
    flash_attention_forward(out, lse, qkv, NH)
    flash_attention_backward(dqkv, dout, qkv, out, lse, NH, scratch)
    ref_out, att = reference.attention_forward(to_host(qkv), NH)
    assert_close(to_host(out), ref_out, "bf16", "out", rel=1e-2)
    assert_close(to_host(dqkv), reference.attention_backward(to_host(dout), to_host(qkv), att, NH),
                 "bf16", "dqkv", rel=1e-2)


def sdpa(backend_name: str, train: bool, B: int):
    """make() for torch_peer: SDPA on contiguous (B, NH, T, HS) bf16 q, k, v with one backend."""
    def make():
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise RuntimeError(f"SDPBackend.{backend_name} is not in torch {torch.__version__}")
        q, k, v = (torch.randn(B, NH, T, HS, device="cuda", dtype=torch.bfloat16,
                               requires_grad=train) for _ in range(3))
        dy = torch.randn(B, NH, T, HS, device="cuda", dtype=torch.bfloat16)

        def fn():
            with sdpa_kernel(backend):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                if train:  # grads returned, not accumulated: no extra add kernels
                    torch.autograd.grad(y, (q, k, v), dy)
        fn()  # fail here (not while timing) if the backend cannot run this shape
        return fn
    return make


@pytest.mark.gpu
@pytest.mark.parametrize("B", [64, 16])
@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("method", METHODS)
def test_bench_attention(benchmark, method, direction, B):
    import cupy
    from llmc.ops import attention as attn
    from llmc.ops import flash_attention as fa
    if method == "matmul" and B != 64:
        pytest.skip("the matmul method is timed at B=64 only")
    impl = "sm80" if method == "flash_sm80" else None
    qkv = device_randn((B, T, 3 * C), BF16, seed=1)
    dout = device_randn((B, T, C), BF16, seed=2)
    out, dqkv = cupy.empty((B, T, C), BF16), cupy.empty((B, T, 3 * C), BF16)
    info = benchmark.extra_info
    if method == "matmul":
        saved = attn.allocate(attn.attention_buffers(B, T, C, NH, BF16, "matmul"))
        scratch = attn.allocate(attn.attention_scratch(B, T, C, NH, BF16, "matmul"))

        def fwd():
            attn.attention_forward(out, saved, qkv, NH, scratch)

        def bwd():
            attn.attention_backward(dqkv, dout, qkv, out, saved, NH, scratch)
    else:
        check_small()
        lse = cupy.empty((B, NH, T), np.float32)
        spec = fa.flash_scratch_shapes(B, T, C, NH)
        scratch = {k: cupy.empty(s, d) for k, (s, d) in spec.items()}

        def fwd():
            fa.flash_attention_forward(out, lse, qkv, NH, impl=impl)

        def bwd():
            fa.flash_attention_backward(dqkv, dout, qkv, out, lse, NH, scratch, impl=impl)

    def both():
        fwd()
        bwd()
    fn = fwd if direction == "forward" else both
    fn()
    info["B"] = B
    if method != "matmul":
        info["impl"] = f"{fa.resolve_impl(impl)} / {fa.resolve_bwd_impl(impl)}"
    ms = record(benchmark, fn, flops=flops(B, direction))
    assert np.all(np.isfinite(to_host(out[0, :4]))), "out went non-finite while timing"
    if direction == "forward_backward":
        assert np.all(np.isfinite(to_host(dqkv[0, :4]))), "dqkv went non-finite while timing"
        info["backward_ms"] = round(cuda_time(bwd), 4)
    if method != "matmul":
        train = direction == "forward_backward"
        # in alternation with ours: the card's clock drifts under this sustained load
        torch_peer(info, "sdpa_flash2", sdpa("FLASH_ATTENTION", train, B), ms, ours_fn=fn)
        torch_peer(info, "sdpa_cudnn", sdpa("CUDNN_ATTENTION", train, B), ms, ours_fn=fn)
