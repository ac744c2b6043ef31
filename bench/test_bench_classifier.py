"""Fused classifier throughput at the GPT-2 124M micro-step shape: N = 64*1024 rows, Vp = 50304.

The kernel is memory-bound: training mode reads the V real logits once and writes the (N, Vp)
dlogits in place, eval mode only reads. `extra_info` has the CUDA-event median time (L2 flushed),
the GB/s of that minimum traffic and its fraction of this card's measured memory ceiling
(bench/timing.py); in the bf16 training case also PyTorch's F.cross_entropy forward+backward on
the same GPU in the same run (bf16 logits as given, and upcast to fp32 as autocast does) and
our speed-up over each. Correctness is checked on sampled rows against llmc.model.reference before
any timing.

Run:  python -m pytest bench/test_bench_classifier.py --benchmark-only -q
"""
import ml_dtypes
import numpy as np
import pytest

from bench.timing import record, torch_peer
from llmc.model import reference
from llmc.ops.classifier import classifier_bytes, fused_classifier
from tests.tolerances import assert_close

N, V, VP = 65536, 50257, 50304
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
UINT = {2: np.uint16, 4: np.uint32}


def make_logits(dtype, seed=0):
    """(N, VP) device logits from 512 random rows, rotated per copy so every row differs."""
    import cupy
    dt = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    base = (3.0 * rng.standard_normal((512, VP), dtype=np.float32)).astype(dt)
    bits = cupy.asarray(base.view(UINT[dt.itemsize]))
    rows = cupy.empty((N, VP), dtype=bits.dtype)
    for j in range(N // 512):
        rows[j * 512:(j + 1) * 512, :V] = cupy.roll(bits[:, :V], 53 * j, axis=1)
        rows[j * 512:(j + 1) * 512, V:] = bits[:, V:]
    targets = rng.integers(0, V, size=N).astype(np.int32)
    return rows, rows.view(dt), targets


def check_sample(bits, logits, losses, targets, dtype, write_dlogits):
    """Run once and compare 64 sampled rows with the reference."""
    import cupy
    dt = DTYPES[dtype]
    sample = cupy.asarray(np.linspace(0, N - 1, 64).astype(np.int64))
    before = cupy.asnumpy(bits[sample]).view(dt).astype(np.float64)
    fused_classifier(logits, losses, cupy.asarray(targets), V, 1.0 / N, write_dlogits)
    after = cupy.asnumpy(bits[sample]).view(dt).astype(np.float64)
    t = targets[sample.get()]
    ref_losses, probs = reference.crossentropy_forward(before, t, V)
    assert_close(losses[sample].get(), ref_losses, "fp32", "losses")
    if write_dlogits:
        ref = reference.crossentropy_backward(probs, t, np.full(len(t), 1.0 / N))
        assert_close(after, ref, dtype, "dlogits")
    else:
        assert np.array_equal(after, before), "eval mode must leave the logits unchanged"


def torch_cross_entropy(upcast: bool):
    """make() for torch_peer: F.cross_entropy forward+backward on (N, V) bf16 logits."""
    def make():
        import torch
        import torch.nn.functional as F
        gen = torch.Generator(device="cuda").manual_seed(0)
        leaf = (3.0 * torch.randn(N, V, device="cuda", generator=gen)).to(torch.bfloat16)
        leaf.requires_grad_(True)
        targets = torch.randint(0, V, (N,), device="cuda", generator=gen)

        def step():
            leaf.grad = None
            logits = leaf.float() if upcast else leaf
            F.cross_entropy(logits, targets).backward()
        step()  # fail here (out of memory) rather than while timing
        return step
    return make


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bench_fused_classifier(benchmark, dtype, mode):
    import cupy
    write = mode == "train"
    bits, logits, targets_h = make_logits(dtype)
    targets = cupy.asarray(targets_h)
    losses = cupy.full(N, np.nan, dtype=np.float32)
    check_sample(bits, logits, losses, targets_h, dtype, write)

    # In training mode each call turns the previous call's dlogits into new dlogits: the same
    # traffic and arithmetic, and the values stay finite.
    def launch():
        fused_classifier(logits, losses, targets, V, 1.0 / N, write)

    nbytes = classifier_bytes(N, V, VP, DTYPES[dtype].itemsize, write)
    ms = record(benchmark, launch, nbytes=nbytes)
    info = benchmark.extra_info
    assert np.all(np.isfinite(losses.get())), "losses went non-finite while timing"
    if dtype == "bf16" and write:
        del bits, logits, losses, targets
        cupy.get_default_memory_pool().free_all_blocks()
        for name, upcast in (("torch_bf16", False), ("torch_fp32_upcast", True)):
            torch_peer(info, name, torch_cross_entropy(upcast), ms)
            try:
                import torch
                torch.cuda.empty_cache()
            except ImportError:
                pass
