"""KV-cache generation on the GPU (llmc/inference/gpu_decoder.py) against the CPU oracles.

- fp32 greedy generation equals a full-forward recomputation on the CPU (CPUModel.logits of
  the whole prefix, argmax) token by token for 200 tokens, for a batch of prompts of different
  lengths, with decode steps replayed as a CUDA graph; each row equals generating it alone.
- fp32 greedy equals `transformers` GPT2LMHeadModel.generate of the same weights (imported
  through llmc.formats from a transformers save; random weights, nonzero biases).
- bf16 with sampling: graph replay gives bitwise the tokens of eager launches (the same seed),
  and a fixed seed repeats.
- The prefill's flash path (bf16, head size 64) and the matmul path (fp32) both run.

Run (GPU machine): python -m pytest -m gpu tests/test_gpu_decoder.py -q
"""
import numpy as np
import pytest

from llmc.config import ModelConfig
from tests.test_decoder import full_forward_greedy, peaked_weights

pytestmark = pytest.mark.gpu

MC = ModelConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=1000, padded_vocab_size=1024,
                 block_size=256)
PROMPTS = [[464, 329, 318], [999], [11, 262, 37, 110, 286, 8, 7, 6, 5, 4, 3, 2]]


def test_fp32_greedy_equals_full_forward_200_tokens():
    from llmc.inference.gpu_decoder import GPUDecoder
    params = peaked_weights(MC)
    dec = GPUDecoder(MC, params, max_batch=3, dtype="fp32")
    got = dec.generate_all(PROMPTS, 200, temperature=0, stop_at_eot=False)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == full_forward_greedy(MC, params, prompt, 200)
    alone = GPUDecoder(MC, params, max_batch=1, dtype="fp32")
    for prompt, tokens in zip(PROMPTS, got):
        assert alone.generate_all([prompt], 200, temperature=0, stop_at_eot=False)[0] == tokens


def test_fp32_greedy_equals_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from llmc.formats import load_model
    from llmc.inference.gpu_decoder import GPUDecoder
    from tests.test_decoder import _hf_dir
    mc = ModelConfig(n_layer=2, n_head=2, n_embd=128, block_size=128)
    model = _hf_dir(tmp_path, mc)
    mf = load_model(tmp_path)
    dec = GPUDecoder(mf.config, mf.params, max_batch=2, dtype="fp32")
    prompts = [[464, 3290, 318], [50256, 1, 2, 3, 4, 5]]
    ours = dec.generate_all(prompts, 60, temperature=0, stop_at_eot=False)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=60, min_new_tokens=60,
                                    do_sample=False, pad_token_id=50256)[0].tolist()
        assert tokens == theirs


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_graph_replay_equals_eager(dtype):
    from llmc.inference.gpu_decoder import GPUDecoder
    params = peaked_weights(MC, scale=0.1)
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7, stop_at_eot=False)
    graph = GPUDecoder(MC, params, max_batch=3, dtype=dtype, graphs=True)
    eager = GPUDecoder(MC, params, max_batch=3, dtype=dtype, graphs=False)
    a = graph.generate_all(PROMPTS, 60, **kw)
    b = eager.generate_all(PROMPTS, 60, **kw)
    assert a == b
    assert graph.generate_all(PROMPTS, 60, **kw) == a  # the cached graph, replayed again
    assert graph._graphs, "no CUDA graph was captured"


def test_streaming_on_gpu_matches_one_update():
    from llmc.inference.gpu_decoder import GPUDecoder
    dec = GPUDecoder(MC, peaked_weights(MC), max_batch=3)
    kw = dict(temperature=1.0, top_k=20, seed=3, stop_at_eot=False)
    ups = list(dec.generate(PROMPTS, 30, stream_every=4, **kw))
    final = dec.generate_all(PROMPTS, 30, **kw)
    assert ups[-1].tokens == final
    for b, prompt in enumerate(PROMPTS):
        assert prompt + [t for u in ups for t in u.new[b]] == final[b]
