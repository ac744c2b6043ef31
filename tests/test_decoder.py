"""KV-cache generation on the CPU (llmc/inference/decoder.py) and the sampling filters (llmc.model.reference).

- Greedy generation with the cache equals a full-forward recomputation (CPUModel.logits of the
  whole prefix, argmax) token by token for 200 tokens, for a batch of prompts of different
  lengths, fp32.
- Greedy generation equals `transformers` GPT2LMHeadModel.generate (do_sample=False) of the
  same weights (random, nonzero biases), imported through llmc.formats.
- reference.sampling_probs keeps exactly the tokens transformers' TopK/TopP warpers keep and
  gives softmax(logits / T) over them; sampled streams follow the seed.
- Bad requests (too long, empty prompt, bad top-p) fail with a message naming the setting.

Run: python -m pytest tests/test_decoder.py -q
"""
import numpy as np
import pytest

from llmc.model import reference as ref
from llmc.config import ModelConfig
from llmc.model.cpu_model import CPUModel
from llmc.inference.decoder import CPUDecoder, GenerationError
from llmc.model.params import init_params

MC = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=256)
PROMPTS = [[464, 3290, 318], [50256], [11, 262, 3797, 1110, 286, 8, 7, 6, 5, 4, 3, 2]]


def peaked_weights(mc, seed=0, scale=0.3):
    """GPT-2 init plus N(0, scale) noise everywhere: confident logits, so greedy choices are
    decided by margins far above fp32 rounding (a tie would make 'equal' meaningless)."""
    rng = np.random.default_rng(seed)
    flat = init_params(mc, seed)
    return (flat + scale * rng.standard_normal(flat.size)).astype(np.float32)


def full_forward_greedy(mc, params, prompt, n):
    model = CPUModel(mc, 1, mc.block_size)
    model.load_params(params)
    ids = list(prompt)
    for _ in range(n):
        logits = model.logits(np.array([ids], dtype=np.int32))[0, -1]
        ids.append(int(np.argmax(logits)))
    return ids


def test_greedy_equals_full_forward_200_tokens():
    # a 1000-token vocabulary keeps the 600 full forwards of the oracle quick
    mc = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, padded_vocab_size=1024,
                     block_size=256)
    prompts = [[464, 329, 318], [999], [11, 262, 37, 110, 286, 8, 7, 6, 5, 4, 3, 2]]
    params = peaked_weights(mc)
    dec = CPUDecoder(mc, params, max_batch=len(prompts))
    got = dec.generate_all(prompts, 200, temperature=0, stop_at_eot=False)
    for prompt, tokens in zip(prompts, got):
        assert tokens == full_forward_greedy(mc, params, prompt, 200)


def test_streaming_updates_add_up():
    dec = CPUDecoder(MC, peaked_weights(MC), max_batch=3)
    updates = list(dec.generate(PROMPTS, 10, temperature=1.0, top_k=40, seed=5,
                                stop_at_eot=False, stream_every=3))
    assert len(updates) == 4  # after 3, 6, 9 and 10 tokens
    for b, prompt in enumerate(PROMPTS):
        streamed = [t for u in updates for t in u.new[b]]
        assert prompt + streamed == updates[-1].tokens[b]
        assert len(streamed) == 10


def test_seed_fixes_the_draw():
    dec = CPUDecoder(MC, peaked_weights(MC), max_batch=3)
    kw = dict(temperature=1.0, top_k=0, top_p=0.95, stop_at_eot=False)
    a = dec.generate_all(PROMPTS, 20, seed=1, **kw)
    b = dec.generate_all(PROMPTS, 20, seed=1, **kw)
    c = dec.generate_all(PROMPTS, 20, seed=2, **kw)
    assert a == b and a != c


def test_stop_at_eot_truncates_the_row():
    from llmc.model.params import views
    mc = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)
    params = peaked_weights(mc)
    w = views(params, mc)
    # lnf outputs its bias u at every position (weight 0), so logits = wte @ u: EOT's row wins
    u = np.linspace(-1, 1, mc.n_embd, dtype=np.float32)
    w["lnfw"][...] = 0.0
    w["lnfb"][...] = u
    w["wte"][50256] = 10 * u
    dec = CPUDecoder(mc, params)
    (tokens,) = dec.generate_all([[1, 2, 3]], 10, temperature=0)
    assert tokens == [1, 2, 3, 50256]
    (tokens,) = dec.generate_all([[1, 2, 3]], 10, temperature=0, stop_at_eot=False)
    assert tokens == [1, 2, 3] + [50256] * 10


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=[[1] * 250], max_new_tokens=10), "exceed the model's context of 256"),
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[[1, 60000]]), "outside the vocabulary"),
    (dict(top_p=2.0), "top-p"),
    (dict(top_p=0.0), "top-p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-3), "top-k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1]] * 4), "max_batch"),
])
def test_bad_requests(bad, match):
    dec = CPUDecoder(MC, peaked_weights(MC), max_batch=3)
    kw = dict(prompts=[[1, 2]], max_new_tokens=4)
    kw.update(bad)
    with pytest.raises(GenerationError, match=match):
        dec.generate_all(kw.pop("prompts"), **kw)


# ---------------------------------------------------------------------------------------------
# against transformers

def _hf_dir(tmp_path, mc, seed=0):
    """A transformers GPT-2 with every parameter random, saved as safetensors."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=mc.n_layer, n_head=mc.n_head, n_embd=mc.n_embd,
                                  n_positions=mc.block_size, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(torch.randn_like(t) * (0.3 if t.ndim > 1 else 0.5) + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
    model.save_pretrained(tmp_path)
    return model


def test_greedy_equals_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    model = _hf_dir(tmp_path, MC)
    from llmc.formats import load_model
    mf = load_model(tmp_path)
    dec = CPUDecoder(mf.config, mf.params, max_batch=1)
    for prompt in PROMPTS[:2]:
        ours = dec.generate_all([prompt], 40, temperature=0, stop_at_eot=False)[0]
        with torch.no_grad():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40,
                                    do_sample=False, pad_token_id=50256)[0].tolist()
        assert ours == theirs


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (1.0, 20, 0.5), (0.5, 3, 0.99), (1.0, 1, 1.0),
])
def test_sampling_probs_match_transformers_warpers(temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    tgen = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50257) * 3
    if top_p == 1.0:
        # ties at the top (top-k keeps every tied token, as torch.topk's threshold does); not
        # under top-p, where transformers keeps an arbitrary part of a tie at the boundary (its
        # sort order) and llmc keeps the whole tie
        logits[[10, 11, 12]] = logits.max()
    scores = torch.tensor(logits[None], dtype=torch.float64) / temperature
    if top_k:
        scores = tgen.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = tgen.TopPLogitsWarper(top_p)(None, scores)
    want = torch.softmax(scores, dim=-1)[0].numpy()
    got = ref.sampling_probs(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
