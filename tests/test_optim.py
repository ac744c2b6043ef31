"""llmc/training/optim.py against values worked out by hand: AdamW, the LR schedule, clipping.

- `adamw_step`: two steps on tiny float64 arrays, with decoupled weight decay on one entry only;
  constant gradients must give an update of exactly +-lr per step (bias correction at work).
- `AdamW`: two steps on the smallest model layout (29 parameters) with clipping active on the
  first step only, weight decay on the matrices only; the returned norm is the pre-clip norm.
- `lr_at`: cosine, linear and constant schedules with warmup at chosen steps.
- `global_norm`, `clip_scale`, state_dict round trip and the errors on bad input.

Run: cd /work/main && /work/venv/bin/python -m pytest tests/test_optim.py -q
"""
import math

import numpy as np
import pytest

from llmc.config import ModelConfig, TrainConfig
from llmc.training.optim import AdamW, adamw_step, clip_scale, global_norm, lr_at
from llmc.model.params import views

HP = dict(beta1=0.9, beta2=0.95, eps=1e-8)


def test_adamw_step_two_steps_by_hand():
    p = np.array([1.0, -2.0, 0.0])
    m, v = np.zeros(3), np.zeros(3)
    decay = np.array([True, False, False])
    # step 1: m = 0.1 g, v = 0.05 g^2, mhat = g, vhat = g^2 -> update = sign(g)
    adamw_step(p, np.array([0.5, -1.0, 0.2]), m, v, lr=0.1, weight_decay=0.1, t=1, decay=decay, **HP)
    np.testing.assert_allclose(m, [0.05, -0.1, 0.02], rtol=1e-14)
    np.testing.assert_allclose(v, [0.0125, 0.05, 0.002], rtol=1e-14)
    # p0 - lr * (1 + wd * p0) = 1 - 0.1 * 1.1 ; -2 + 0.1 ; 0 - 0.1
    np.testing.assert_allclose(p, [0.89, -1.9, -0.1], rtol=1e-7)
    # step 2, same gradient on the first two entries: mhat = g, vhat = g^2 again;
    # third entry flips: m = 0.018 - 0.02 = -0.002, mhat = -0.002 / 0.19 = -1/95,
    # v = 0.0019 + 0.002 = 0.0039, vhat = 0.0039 / 0.0975 = 0.04 -> update = -(1/95) / 0.2 = -1/19
    adamw_step(p, np.array([0.5, -1.0, -0.2]), m, v, lr=0.1, weight_decay=0.1, t=2, decay=decay, **HP)
    np.testing.assert_allclose(p, [0.89 - 0.1 * (1 + 0.1 * 0.89), -1.8, -0.1 + 0.1 / 19], rtol=1e-7)


def test_adamw_step_scalar_decay_and_dtype():
    for decay, want in ((True, 1.0 - 0.1 * (1 + 0.5 * 1.0)), (False, 1.0 - 0.1)):
        p = np.ones(4, dtype=np.float32)
        m, v = np.zeros_like(p), np.zeros_like(p)
        adamw_step(p, np.full(4, 0.3, np.float32), m, v, lr=0.1, weight_decay=0.5, t=1, decay=decay, **HP)
        assert p.dtype == np.float32 and m.dtype == np.float32 and v.dtype == np.float32
        np.testing.assert_allclose(p, want, rtol=1e-6)


def test_adamw_step_rejects_bad_input():
    p = np.ones(3)
    with pytest.raises(ValueError, match="grad"):
        adamw_step(p, np.ones(4), np.zeros(3), np.zeros(3), lr=0.1, weight_decay=0, t=1, decay=False, **HP)
    with pytest.raises(ValueError, match="decay"):
        adamw_step(p, np.ones(3), np.zeros(3), np.zeros(3), lr=0.1, weight_decay=0, t=1,
                   decay=np.ones(2, bool), **HP)
    with pytest.raises(ValueError, match="t is 1-based"):
        adamw_step(p, np.ones(3), np.zeros(3), np.zeros(3), lr=0.1, weight_decay=0, t=0, decay=False, **HP)


# The smallest layout: C = 1, one layer, one-token vocabulary: 29 parameters.
TINY = ModelConfig(n_layer=1, n_head=1, n_embd=1, vocab_size=1, padded_vocab_size=1, block_size=1)


def test_adamw_class_two_steps_with_clipping():
    params = np.ones(29)
    opt = AdamW(params, TINY, weight_decay=0.1, grad_clip=1.0, **HP)
    p = views(params, TINY)
    grads = np.zeros(29)
    g = views(grads, TINY)
    # step 1: gradient 3 on wte (decayed) and 4 on lnfb (not): norm 5, clipped to [0.6, 0.8]
    g["wte"][0, 0], g["lnfb"][0] = 3.0, 4.0
    assert opt.step(grads, lr=0.01, step=0) == pytest.approx(5.0, rel=1e-15)
    assert p["wte"][0, 0] == pytest.approx(1 - 0.01 * (1 + 0.1), rel=1e-7)  # 0.989
    assert p["lnfb"][0] == pytest.approx(0.99, rel=1e-7)
    assert p["qkvw"][0, 0, 0] == pytest.approx(1 - 0.01 * 0.1, rel=1e-12)  # decay only
    assert p["qkvb"][0, 0] == 1.0 and p["ln1w"][0, 0] == 1.0  # not decayed, zero gradient
    # step 2: [0.3, 0.4], norm 0.5, not clipped. With the clipped step-1 gradient
    # m = 0.09 [0.6, 0.8] + 0.1 [0.3, 0.4] = [0.084, 0.112],
    # v = 0.0475 [0.36, 0.64] + 0.05 [0.09, 0.16] = [0.0216, 0.0384]: the same ratio per entry.
    # (Without clipping the update would be 0.75, not 0.94.)
    g["wte"][0, 0], g["lnfb"][0] = 0.3, 0.4
    assert opt.step(grads, lr=0.01, step=1) == pytest.approx(0.5, rel=1e-15)
    u = (0.084 / 0.19) / math.sqrt(0.0216 / 0.0975)
    assert p["wte"][0, 0] == pytest.approx(0.989 - 0.01 * (u + 0.1 * 0.989), rel=1e-6)
    assert p["lnfb"][0] == pytest.approx(0.99 - 0.01 * u, rel=1e-6)
    assert p["fcprojw"][0, 0, 0] == pytest.approx(0.999 * 0.999, rel=1e-12)
    assert p["lnfw"][0] == 1.0


def test_adamw_state_dict_round_trip():
    params = np.ones(29, dtype=np.float32)
    opt = AdamW(params, TINY)
    opt.step(np.linspace(-1, 1, 29).astype(np.float32), lr=1e-2, step=0)
    state = opt.state_dict()
    assert set(state) == {"m", "v"} and np.any(state["m"] != 0)
    opt.m[...] = 7  # the state dict holds copies
    assert not np.any(state["m"] == 7)
    other = AdamW(np.ones(29, dtype=np.float32), TINY)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.m, state["m"])
    np.testing.assert_array_equal(other.v, state["v"])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"m": np.zeros(28), "v": np.zeros(29)})
    with pytest.raises(ValueError, match="missing 'v'"):
        other.load_state_dict({"m": np.zeros(29)})
    with pytest.raises(ValueError, match="flat"):
        AdamW(np.ones(30), TINY)
    with pytest.raises(ValueError, match="grads shape"):
        other.step(np.ones(5, np.float32), lr=1e-2, step=0)


def test_from_config():
    cfg = TrainConfig(beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.2, grad_clip=0.5)
    opt = AdamW.from_config(np.ones(29), TINY, cfg)
    assert (opt.beta1, opt.beta2, opt.eps, opt.weight_decay, opt.grad_clip) == (0.8, 0.9, 1e-6, 0.2, 0.5)


def sched(kind, warmup=10, max_steps=110, frac=0.1):
    return TrainConfig(lr=1e-3, warmup_steps=warmup, max_steps=max_steps, lr_schedule=kind,
                       lr_decay_frac=frac)


@pytest.mark.parametrize("kind,step,want", [
    # warmup: lr * (step + 1) / 10, the same for every schedule
    ("cosine", 0, 1e-4), ("cosine", 4, 5e-4), ("cosine", 9, 1e-3), ("linear", 0, 1e-4),
    ("constant", 4, 5e-4),
    # cosine over the 100 steps after warmup from 1e-3 to 1e-4
    ("cosine", 10, 1e-3),
    ("cosine", 35, 1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4),  # 8.68198e-4
    ("cosine", 60, 5.5e-4),
    ("cosine", 110, 1e-4), ("cosine", 500, 1e-4),
    # linear
    ("linear", 10, 1e-3), ("linear", 35, 7.75e-4), ("linear", 60, 5.5e-4), ("linear", 110, 1e-4),
    # constant
    ("constant", 10, 1e-3), ("constant", 109, 1e-3),
])
def test_lr_schedule(kind, step, want):
    assert lr_at(step, sched(kind)) == pytest.approx(want, rel=1e-12)


def test_lr_schedule_edges():
    assert lr_at(0, sched("cosine", warmup=0)) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(50, sched("cosine", warmup=0, max_steps=100, frac=0.0)) == pytest.approx(5e-4, rel=1e-12)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, sched("cosine"))
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(0, sched("exponential"))


def test_global_norm_and_clip_scale():
    assert global_norm(np.array([3.0, 4.0])) == 5.0
    assert global_norm([np.array([[3.0]]), np.array([4.0], np.float32)]) == 5.0
    big = np.full(3_000_001, 0.1, dtype=np.float32)  # spans several accumulation chunks
    assert global_norm(big) == pytest.approx(math.sqrt(3_000_001) * float(np.float32(0.1)), rel=1e-12)
    assert clip_scale(5.0, 1.0) == pytest.approx(1 / (5 + 1e-6), rel=1e-15)
    assert clip_scale(0.5, 1.0) == 1.0
    assert clip_scale(5.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="grad_clip"):
        clip_scale(1.0, -1.0)
