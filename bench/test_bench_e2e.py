"""One llmc training step of GPT-2 124M at the production shape (B=64, T=1024, bf16).

A thin pytest-benchmark wrapper around bench/e2e.py's LlmcRunner: correctness first (the loss
of random tokens starts near ln(V) and stays finite), then each round is one optimizer step
(ending in the loss read, i.e. synchronized). extra_info: tokens/s, MFU (llm.c's formula against
989 TFLOP/s), device memory. The PyTorch comparison in the same process is the script itself:
    python bench/e2e.py --model d12 --batch-size 64 --seq-len 1024 --steps 20 --recompute 1

Run:  python -m pytest bench/test_bench_e2e.py --benchmark-only -q
"""
import math

import pytest

pytestmark = pytest.mark.gpu

B, T = 64, 1024


@pytest.mark.parametrize("recompute,chunks", [(0, 1), (1, 1), (1, 4)])
def test_bench_llmc_step(benchmark, recompute, chunks):
    from bench.e2e import PEAK_BF16, LlmcRunner, flops_per_token
    from llmc.config import model_config
    mc = model_config("d12")
    runner = LlmcRunner(mc, B, T, recompute=recompute, classifier_chunks=chunks)
    try:
        first = runner.step()
        assert abs(first - math.log(mc.vocab_size)) < 0.5, f"initial loss {first} is not ~ln(V)"
        runner.step()  # warm-up: compiles and cuBLAS heuristics out of the timing
        losses = []
        benchmark.pedantic(lambda: losses.append(runner.step()), rounds=10, iterations=1,
                           warmup_rounds=1)
        assert all(math.isfinite(l) for l in losses)
        seconds = benchmark.stats.stats.median
        tps = B * T / seconds
        benchmark.extra_info.update(
            tokens_per_s=round(tps), mfu=round(tps * flops_per_token(mc, T) / PEAK_BF16, 4),
            attention=runner.model.attention, recompute=recompute, classifier_chunks=chunks,
            **runner.memory())
    finally:
        runner.close()
