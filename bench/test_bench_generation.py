"""Generation speed of d12 (bf16) with the KV cache and CUDA-graph decode steps.

Correctness first (every row gets its tokens, all inside the vocabulary), then each round is
one full generation of 128 new tokens from a one-token prompt at batch 1 and 64, sampling with
temperature 1 and top-k 50. extra_info: tokens/s. transformers' `generate` in the same process
is the script: python bench/generation.py (the table in docs/RESULTS.md).

Run:  python -m pytest bench/test_bench_generation.py --benchmark-only -q
"""
import pytest

pytestmark = pytest.mark.gpu

NEW = 128


@pytest.fixture(scope="module")
def decoder():
    import cupy
    from llmc.config import model_config
    from llmc.inference.gpu_decoder import GPUDecoder
    from llmc.model.params import init_params
    mc = model_config("d12")
    dec = GPUDecoder(mc, init_params(mc, 1337), max_batch=64, dtype="bf16")
    yield dec
    del dec
    cupy.get_default_memory_pool().free_all_blocks()


@pytest.mark.parametrize("B", [1, 64])
def test_bench_generate(benchmark, decoder, B):
    kw = dict(temperature=1.0, top_k=50, seed=0, stop_at_eot=False)
    out = decoder.generate_all([[50256]] * B, NEW, **kw)  # warm-up: plans and the graph
    assert all(len(r) == 1 + NEW and all(0 <= t < 50257 for t in r) for r in out)
    benchmark.pedantic(lambda: decoder.generate_all([[50256]] * B, NEW, **kw), rounds=5,
                       iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(B=B, new_tokens=NEW,
                                tokens_per_s=round(B * NEW / benchmark.stats.stats.median))
