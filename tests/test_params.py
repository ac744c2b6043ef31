"""llmc/model/params.py: parameter counts, the flat layout and its views, GPT-2 initialization.

- Counts: d12/d24/d36/d48 equal the published GPT-2 sizes (124M/350M/774M/1558M, counted with
  the real vocabulary V = 50257) plus the (Vp - V) * C padded wte rows, and every config follows
  Vp*C + maxT*C + L*(12 C^2 + 13 C) + 2C.
- Layout: tensors in PARAM_NAMES order, back to back, no gaps; `views` are views (writes reach
  the flat buffer) and round-trip; decay mask and ranges mark exactly the matrices.
- Init (on the d4 preset, large enough for tight statistics): matrices std 0.02, residual
  projections 0.02/sqrt(2L), biases 0, LayerNorm weights 1, padded wte rows 0, seeded.

Run: cd /work/main && /work/venv/bin/python -m pytest tests/test_params.py -q
"""
import math

import numpy as np
import pytest

from llmc.config import ModelConfig, model_config
from llmc.model.params import (DECAYED, PARAM_NAMES, decay_mask, decay_ranges, init_params, num_params,
                         param_specs, views)

# Published GPT-2 parameter counts (tied head, V = 50257): small, medium, large, XL.
GPT2_PUBLISHED = {"d12": 124_439_808, "d24": 354_823_168, "d36": 774_030_080, "d48": 1_557_611_200}


@pytest.mark.parametrize("name", sorted(GPT2_PUBLISHED))
def test_counts_match_gpt2(name):
    mc = model_config(name)
    padding = (mc.padded_vocab_size - mc.vocab_size) * mc.n_embd
    assert num_params(mc) == GPT2_PUBLISHED[name] + padding


def test_d12_count():
    assert num_params(model_config("d12")) == 124_475_904


@pytest.mark.parametrize("mc", [
    model_config("d4"), model_config("d6"),
    ModelConfig(n_layer=3, n_head=2, n_embd=10, vocab_size=37, padded_vocab_size=40, block_size=7),
])
def test_count_formula(mc):
    L, C, Vp, maxT = mc.n_layer, mc.n_embd, mc.padded_vocab_size, mc.block_size
    assert num_params(mc) == Vp * C + maxT * C + L * (12 * C * C + 13 * C) + 2 * C


SMALL = ModelConfig(n_layer=3, n_head=2, n_embd=10, vocab_size=37, padded_vocab_size=40, block_size=7)


def test_layout_contiguous_in_order():
    specs = param_specs(SMALL)
    assert tuple(s.name for s in specs) == PARAM_NAMES
    offset = 0
    for s in specs:
        assert s.offset == offset, f"{s.name} starts at {s.offset}, expected {offset}"
        offset += s.size
    assert offset == num_params(SMALL)
    assert param_specs(SMALL)[4].shape == (3, 30, 10)  # qkvw (L, 3C, C)


def test_views_round_trip():
    flat = np.arange(num_params(SMALL), dtype=np.float64)
    v = views(flat, SMALL)
    for s in param_specs(SMALL):
        assert v[s.name].shape == s.shape
        assert np.shares_memory(v[s.name], flat), f"{s.name} is a copy, not a view"
        np.testing.assert_array_equal(v[s.name].reshape(-1), flat[s.offset:s.offset + s.size])
    np.testing.assert_array_equal(np.concatenate([v[n].reshape(-1) for n in PARAM_NAMES]), flat)
    v["fcw"][1, 2, 3] = -1.0  # writes through a view land at offset + row-major index
    fcw = next(s for s in param_specs(SMALL) if s.name == "fcw")
    assert flat[fcw.offset + (1 * 40 + 2) * 10 + 3] == -1.0


def test_views_reject_wrong_buffer():
    with pytest.raises(ValueError, match=str(num_params(SMALL))):
        views(np.zeros(num_params(SMALL) + 1), SMALL)
    with pytest.raises(ValueError, match="1-D"):
        views(np.zeros((1, num_params(SMALL))), SMALL)


def test_decay_mask_and_ranges():
    mask = decay_mask(SMALL)
    v = views(mask, SMALL)
    for name in PARAM_NAMES:
        assert np.all(v[name]) if name in DECAYED else not np.any(v[name]), name
    assert DECAYED == {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}
    start = 0
    for (a, b, decay), s in zip(decay_ranges(SMALL), param_specs(SMALL)):
        assert a == start and b - a == s.size and decay == (s.name in DECAYED)
        start = b
    assert start == num_params(SMALL)


@pytest.fixture(scope="module")
def d4_init():
    mc = model_config("d4")
    return mc, init_params(mc, seed=1337)


def test_init_statistics(d4_init):
    mc, flat = d4_init
    assert flat.dtype == np.float32 and flat.shape == (num_params(mc),)
    p = views(flat, mc)
    resid = 0.02 / math.sqrt(2 * mc.n_layer)
    for name, want, tensor in [("wte", 0.02, p["wte"][:mc.vocab_size]), ("wpe", 0.02, p["wpe"]),
                               ("qkvw", 0.02, p["qkvw"]), ("fcw", 0.02, p["fcw"]),
                               ("attprojw", resid, p["attprojw"]), ("fcprojw", resid, p["fcprojw"])]:
        # std estimates from >= 65k samples are within ~0.3% of the truth; allow 3%
        assert float(tensor.std()) == pytest.approx(want, rel=0.03), f"{name} std {tensor.std()}"
        assert abs(float(tensor.mean())) < 0.05 * want, f"{name} mean {tensor.mean()}"
    for l in range(mc.n_layer):  # every layer is initialized, not only the first
        assert float(p["fcprojw"][l].std()) == pytest.approx(resid, rel=0.05)
    assert np.all(p["wte"][mc.vocab_size:] == 0), "padded wte rows must start at zero"
    for name in ("qkvb", "attprojb", "fcb", "fcprojb", "ln1b", "ln2b", "lnfb"):
        assert np.all(p[name] == 0), f"{name} must start at zero"
    for name in ("ln1w", "ln2w", "lnfw"):
        assert np.all(p[name] == 1), f"{name} must start at one"


def test_init_seeded():
    small = model_config("d4", n_layer=1)
    a, b, c = init_params(small, 7), init_params(small, 7), init_params(small, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
