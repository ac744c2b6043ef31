"""CPUModel (llmc/model/cpu_model.py): whole-model gradients, agreement with PyTorch, AdamW trajectory.

- Finite differences: on a tiny config in float64, the gradient of a sample of entries from every
  parameter tensor matches central differences of the loss (weights are perturbed away from the
  GPT-2 init so biases, LayerNorm and padded rows are non-trivial).
- PyTorch (tests/torch_gpt2.py, an independent implementation) with the same weights and batch:
  logits, loss and every parameter tensor's gradient, norm-wise relative error <= 1e-5 in
  float64 (both attention variants), and within float32 rounding for the float32 model.
- 10 AdamW steps (warmup + cosine schedule, weight decay, clipping that is active) give the
  same loss at every step as torch.optim.AdamW with the same decay groups.
- Padded vocabulary rows of wte get exactly zero gradient; loss_scale accumulation; shorter
  sequences and batches at call time; clear errors on bad input.

Run: cd /work/main && /work/venv/bin/python -m pytest tests/test_cpu_model.py -q
"""
import numpy as np
import pytest

from llmc.config import ModelConfig, TrainConfig
from llmc.model.cpu_model import CPUModel
from llmc.training.optim import AdamW, lr_at
from llmc.model.params import init_params, param_specs, views
from tests.tolerances import rel_err

MC = ModelConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=29, padded_vocab_size=32, block_size=8)
B, T = 2, 6


def weights(seed=0):
    """GPT-2 init plus noise on every entry (biases, LayerNorm, padded rows too), float64."""
    rng = np.random.default_rng(seed)
    flat = init_params(MC, seed).astype(np.float64)
    return flat + 0.1 * rng.standard_normal(flat.size)


def batch(seed=0, b=B, t=T):
    rng = np.random.default_rng(100 + seed)
    return (rng.integers(0, MC.vocab_size, (b, t)).astype(np.int32),
            rng.integers(0, MC.vocab_size, (b, t)).astype(np.int32))


def model(dtype=np.float64, seed=0):
    m = CPUModel(MC, B, T, dtype=dtype)
    m.load_params(weights(seed))
    return m


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def torch_model(torch, flat, attn="manual"):
    from tests.torch_gpt2 import TorchGPT2, load_flat
    tm = TorchGPT2(MC, attn=attn).double()
    load_flat(tm, flat)
    return tm


def test_gradients_match_finite_differences():
    m = model()
    inp, tgt = batch()
    m.zero_grad()
    m.forward_backward(inp, tgt, loss_scale=1.0)
    rng = np.random.default_rng(5)
    h = 1e-5
    for spec in param_specs(MC):
        idx = list(spec.offset + rng.choice(spec.size, size=min(4, spec.size), replace=False))
        if spec.name == "wte":
            idx.append(spec.offset + MC.vocab_size * MC.n_embd + 3)  # a padded row: gradient 0
        for i in idx:
            old = m.params[i]
            m.params[i] = old + h
            up = m.forward(inp, tgt)
            m.params[i] = old - h
            down = m.forward(inp, tgt)
            m.params[i] = old
            num = (up - down) / (2 * h)
            assert abs(m.grads[i] - num) <= 1e-8 + 1e-5 * abs(num), (
                f"{spec.name}[{i - spec.offset}]: analytic {m.grads[i]:.10e} vs numeric {num:.10e}")


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_matches_torch_float64(torch, attn):
    m = model()
    inp, tgt = batch()
    tm = torch_model(torch, weights(), attn)
    logits, loss = tm(torch.from_numpy(inp).long(), torch.from_numpy(tgt).long())
    loss.backward()
    from tests.torch_gpt2 import grads_flat
    tgrads = grads_flat(tm)
    m.zero_grad()
    ours = m.forward_backward(inp, tgt, 1.0)
    assert ours == pytest.approx(loss.item(), rel=1e-12)
    V = MC.vocab_size
    assert rel_err(m.logits(inp), logits[..., :V].detach().numpy()) <= 1e-6  # float32 host copy
    ours_g, theirs_g = views(m.grads, MC), views(tgrads, MC)
    for name in ours_g:
        err = rel_err(ours_g[name], theirs_g[name])
        assert err <= 1e-5, f"{name}: gradient rel err {err:.2e} vs torch"


def test_float32_matches_torch(torch):
    m = model(np.float32)
    inp, tgt = batch(1)
    tm = torch_model(torch, weights())
    logits, loss = tm(torch.from_numpy(inp).long(), torch.from_numpy(tgt).long())
    loss.backward()
    from tests.torch_gpt2 import grads_flat
    tgrads = views(grads_flat(tm), MC)
    m.zero_grad()
    assert m.forward_backward(inp, tgt, 1.0) == pytest.approx(loss.item(), rel=1e-6)
    assert m.params.dtype == np.float32 and m.grads.dtype == np.float32
    assert rel_err(m.logits(inp), logits[..., :MC.vocab_size].detach().numpy()) <= 1e-6
    for name, g in views(m.grads, MC).items():
        err = rel_err(g, tgrads[name])
        assert err <= 1e-4, f"{name}: float32 gradient rel err {err:.2e} vs torch float64"


def test_adamw_trajectory_matches_torch(torch):
    from tests.torch_gpt2 import make_optimizer
    cfg = TrainConfig(lr=1e-2, warmup_steps=3, max_steps=10, lr_schedule="cosine",
                      lr_decay_frac=0.1, weight_decay=0.1, grad_clip=1.0)
    m = model()
    opt = AdamW.from_config(m.params, MC, cfg)
    tm = torch_model(torch, weights())
    topt = make_optimizer(tm, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), eps=1e-8)
    clipped, losses = 0, []
    for step in range(10):
        inp, tgt = batch(step % 2)  # two batches in turn: the loss must go down
        lr = lr_at(step, cfg)
        m.zero_grad()
        loss = m.forward_backward(inp, tgt, 1.0)
        norm = opt.step(m.grads, lr, step)
        topt.zero_grad()
        _, tloss = tm(torch.from_numpy(inp).long(), torch.from_numpy(tgt).long())
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(tm.parameters(), cfg.grad_clip)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-9), f"step {step}: loss {loss} vs {tloss.item()}"
        assert norm == pytest.approx(tnorm.item(), rel=1e-9), f"step {step}: grad norm"
        clipped += norm > cfg.grad_clip
        losses.append(loss)
    assert 0 < clipped < 10, f"clipping active on {clipped} of 10 steps; the test needs some of each"
    assert losses[-1] < losses[0] - 0.3, f"no learning: losses {losses}"
    from tests.torch_gpt2 import params_flat
    assert rel_err(m.params, params_flat(tm)) <= 1e-9, "weights after 10 steps differ from torch"


def test_padded_rows_get_zero_gradient():
    for dtype in (np.float32, np.float64):
        m = model(dtype)
        m.zero_grad()
        m.forward_backward(*batch(), loss_scale=1.0)
        wte = views(m.grads, MC)["wte"]
        assert np.all(wte[MC.vocab_size:] == 0), "padded wte rows got a gradient"
        assert np.any(wte[:MC.vocab_size] != 0)


def test_loss_scale_accumulates():
    inp, tgt = batch()
    a, b = model(), model()
    a.zero_grad()
    la = a.forward_backward(inp, tgt, 1.0)
    b.zero_grad()
    lb1 = b.forward_backward(inp, tgt, 0.5)
    lb2 = b.forward_backward(inp, tgt, 0.5)
    assert la == lb1 == lb2, "the returned loss must be the unscaled mean"
    np.testing.assert_allclose(b.grads, a.grads, rtol=1e-12, atol=1e-15)
    b.zero_grad()
    assert not np.any(b.grads)


def test_shorter_calls_and_forward_only():
    m = model()
    inp, tgt = batch(3)
    full = m.logits(inp)
    assert full.shape == (B, T, MC.vocab_size) and full.dtype == np.float32
    np.testing.assert_array_equal(m.logits(inp[:1, :3]), full[:1, :3])  # causal: prefix unchanged
    assert m.forward(inp) is None
    m.zero_grad()
    assert m.forward(inp, tgt) == m.forward_backward(inp, tgt, 1.0)
    assert isinstance(m.forward(inp[:, :1], tgt[:, :1]), float)


def test_bad_input_errors():
    m = model()
    inp, tgt = batch()
    bad = inp.copy()
    bad[1, 2] = MC.vocab_size
    with pytest.raises(ValueError, match=f"token id {MC.vocab_size}"):
        m.forward(bad)
    with pytest.raises(ValueError, match="token id -1"):
        m.forward_backward(inp, np.full_like(tgt, -1), 1.0)
    with pytest.raises(ValueError, match="int32"):
        m.forward(inp.astype(np.int64))
    with pytest.raises(ValueError, match="T'"):
        m.forward(np.zeros((B, T + 1), np.int32))
    with pytest.raises(ValueError, match="inputs' shape"):
        m.forward(inp, tgt[:, :2])
    with pytest.raises(ValueError, match="flat buffer"):
        m.load_params(np.zeros(10))
    with pytest.raises(ValueError, match="dtype"):
        CPUModel(MC, B, T, dtype=np.float16)
    with pytest.raises(ValueError, match="block_size"):
        CPUModel(MC, B, MC.block_size + 1)
