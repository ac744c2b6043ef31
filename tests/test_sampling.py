"""The sampling kernel (llmc/ops/sampling.py) against reference.sampling_probs, on the GPU.

- Greedy (temperature 0) is the argmax with the lowest id among ties.
- For temperature / top-k / top-p settings, 4096 rows holding the same logits each draw once
  (the draw hashes the row): every drawn token is in the reference's support, the empirical
  frequencies match the reference probabilities (total variation within a bound from the
  sample size), and with top-k 1 every row draws one of the tied maxima.
- A fixed seed gives the same draws twice; another seed or position gives others.
- ids[b, pos[b] + 1] is written and pos advances by one; fp32 and bf16 logits.

Run: pytest -m gpu tests/test_sampling.py
"""
import numpy as np
import pytest

from llmc.model import reference
from tests.gpu_arrays import DTYPES, device

pytestmark = pytest.mark.gpu
V, VP, S = 50257, 50304, 8


def logits_rows(dtype, B, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    row = np.zeros(VP, dtype=np.float64)
    row[:V] = rng.standard_normal(V) * scale
    row[[7, 70, 700]] = row[:V].max() + 1.0  # a tie at the top
    stored = row.astype(DTYPES[dtype])
    return np.tile(stored, (B, 1)), stored[:V].astype(np.float64)


def draw(logits, seed=1, pos0=3, **settings):
    import cupy
    from llmc.ops.sampling import sample_tokens
    B = logits.shape[0]
    ids = cupy.full((B, S), -7, dtype=np.int32)
    pos = cupy.full((B,), pos0, dtype=np.int32)
    sample_tokens(ids, pos, device(logits), V, seed=seed, **settings)
    ids, pos = cupy.asnumpy(ids), cupy.asnumpy(pos)
    assert np.all(pos == pos0 + 1)
    keep = np.ones(S, dtype=bool)
    keep[pos0 + 1] = False
    assert np.all(ids[:, keep] == -7), "the kernel wrote outside ids[b, pos[b] + 1]"
    return ids[:, pos0 + 1]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_is_argmax_lowest_id(dtype):
    logits, row = logits_rows(dtype, 3)
    got = draw(logits, temperature=0.0)
    assert np.all(got == 7)  # ids 7, 70, 700 tie at the maximum


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.8, 50, 1.0), (1.0, 0, 0.9), (1.5, 200, 0.7), (1.0, 1, 1.0), (0.6, 3, 1.0),
])
def test_draws_follow_the_reference(dtype, temperature, top_k, top_p):
    B = 4096
    logits, row = logits_rows(dtype, B, seed=1, scale=4.0)  # peaked enough for the TV test
    probs = reference.sampling_probs(row, temperature, top_k, top_p)
    got = draw(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert np.all(probs[got] > 0), f"drew tokens outside the support: {sorted(set(got[probs[got] == 0]))[:5]}"
    freq = np.bincount(got, minlength=V) / B
    tv = 0.5 * np.abs(freq - probs).sum()
    # E|freq_v - p_v| <= sqrt(p_v / B), so E[TV] <= 0.5 * sum sqrt(p_v / B); one draw moves TV
    # by at most 1 / B, so TV stays within a few 1 / sqrt(4B) = 0.008 of its mean: + 0.05
    bound = 0.5 * np.sqrt(probs / B).sum() + 0.05
    assert tv <= bound, f"total variation {tv:.3f} > {bound:.3f}"
    if top_k == 1:  # the top tie survives whole (threshold semantics, as torch.topk's)
        assert set(got.tolist()) <= {7, 70, 700}


def test_seed_and_position_fix_the_draw():
    logits, _ = logits_rows("bf16", 256, seed=2)
    a = draw(logits, seed=11, temperature=1.0)
    assert np.array_equal(a, draw(logits, seed=11, temperature=1.0))
    assert not np.array_equal(a, draw(logits, seed=12, temperature=1.0))
    assert not np.array_equal(a, draw(logits, seed=11, pos0=4, temperature=1.0))


def test_bad_settings():
    from llmc.ops.sampling import check_sampling
    for kw, match in ((dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
                      (dict(top_p=2.0), "top_p"), (dict(top_p=0.0), "top_p")):
        args = dict(temperature=1.0, top_k=0, top_p=1.0)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            check_sampling(**args)


def test_functional_sample():
    from llmc import ops
    logits, row = logits_rows("bf16", 512, seed=3, scale=4.0)
    assert np.all(cupy_get(ops.sample(device(logits), V, temperature=0.0)) == 7)
    a = cupy_get(ops.sample(device(logits), V, top_k=5, seed=9, step=4))
    assert np.array_equal(a, draw(logits, seed=9, pos0=4, temperature=1.0, top_k=5))
    probs = reference.sampling_probs(row, 1.0, 5, 1.0)
    assert np.all(probs[a] > 0)


def cupy_get(x):
    import cupy
    return cupy.asnumpy(x)
