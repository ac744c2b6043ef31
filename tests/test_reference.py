"""Every backward in llmc/model/reference.py against float64 central finite differences of its forward.

For an op f and a fixed random cotangent R, the scalar J = sum(f(x) * R) has dJ/dx = backward(R);
that analytic gradient is compared element-wise with (J(x + h e_i) - J(x - h e_i)) / 2h over all
entries of small, seeded, non-zero inputs. Forwards get small independent checks too (hand values
for GELU, loop attention, normalized LayerNorm statistics, probabilities summing to one), and every
op must keep float32 inputs float32.

Run: cd /work/main && /work/venv/bin/python -m pytest tests/test_reference.py -q
"""
import math

import numpy as np
import pytest

from llmc.model import reference as ref

H = 1e-6  # central-difference step in float64: truncation ~h^2, rounding ~eps/h, both < 1e-9
RTOL = 1e-6


def numeric_grad(fn, x):
    """d fn() / d x by central differences, perturbing x in place; fn returns a scalar."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        up = fn()
        flat[i] = old - H
        down = fn()
        flat[i] = old
        gflat[i] = (up - down) / (2 * H)
    return g


def check_grad(name, analytic, fn, x):
    num = numeric_grad(fn, x)
    assert analytic.shape == x.shape, f"{name}: gradient shape {analytic.shape} != {x.shape}"
    scale = max(np.abs(num).max(), 1e-3)
    err = np.abs(analytic - num).max() / scale
    assert err < RTOL, f"{name}: max |analytic - numeric| / max|numeric| = {err:.2e}"
    assert np.abs(num).max() > 1e-6, f"{name}: the gradient is zero, the check says nothing"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_encoder_backward(rng):
    Vp, maxT, C, B, T = 9, 6, 4, 2, 5
    wte, wpe = rng.standard_normal((Vp, C)), rng.standard_normal((maxT, C))
    inp = np.array([[1, 3, 3, 0, 7], [3, 2, 7, 7, 1]], dtype=np.int32)  # repeats accumulate
    R = rng.standard_normal((B, T, C))
    dwte, dwpe = ref.encoder_backward(R, inp, wte.shape, wpe.shape)
    J = lambda: float(np.sum(ref.encoder_forward(wte, wpe, inp) * R))
    check_grad("dwte", dwte, J, wte)
    check_grad("dwpe", dwpe, J, wpe)
    assert np.all(dwte[[4, 5, 6, 8]] == 0) and np.all(dwpe[T:] == 0)


def test_layernorm_forward_statistics(rng):
    x = rng.standard_normal((3, 7, 16)) * 3 + 2
    out, mean, rstd = ref.layernorm_forward(x, np.ones(16), np.zeros(16))
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(-1), x.var(-1) / (x.var(-1) + 1e-5), rtol=1e-12)  # biased var, eps
    np.testing.assert_allclose(mean, x.mean(-1), rtol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x.var(-1) + 1e-5), rtol=1e-12)


def test_layernorm_backward(rng):
    x = rng.standard_normal((2, 3, 8)) * 2 + 0.5
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    R = rng.standard_normal((2, 3, 8))
    _, mean, rstd = ref.layernorm_forward(x, w, b)
    dx, dw, db = ref.layernorm_backward(R, x, w, mean, rstd)
    J = lambda: float(np.sum(ref.layernorm_forward(x, w, b)[0] * R))
    check_grad("layernorm dx", dx, J, x)
    check_grad("layernorm dw", dw, J, w)
    check_grad("layernorm db", db, J, b)


def test_residual_backward(rng):
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    R = rng.standard_normal((2, 3, 4))
    J = lambda: float(np.sum(ref.residual_forward(a, b) * R))
    check_grad("residual da", R, J, a)  # the gradient passes through unchanged to both inputs
    check_grad("residual db", R, J, b)


@pytest.mark.parametrize("has_bias", [True, False])
def test_matmul_backward(rng, has_bias):
    x, w = rng.standard_normal((2, 3, 5)), rng.standard_normal((7, 5))
    b = rng.standard_normal(7) if has_bias else None
    R = rng.standard_normal((2, 3, 7))
    dx, dw, db = ref.matmul_backward(R, x, w, has_bias=has_bias)
    J = lambda: float(np.sum(ref.matmul_forward(x, w, b) * R))
    check_grad("matmul dx", dx, J, x)
    check_grad("matmul dw", dw, J, w)
    if has_bias:
        check_grad("matmul db", db, J, b)
    else:
        assert db is None
    np.testing.assert_allclose(ref.matmul_forward(x, w, b)[1, 2],
                               w @ x[1, 2] + (b if has_bias else 0), rtol=1e-12)


def attention_loops(qkv, n_head):
    """Attention one query at a time, straight from the definition (independent of the reference)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // n_head
    out = np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            q, k, v = (qkv[b, :, j * C + h * HS:j * C + (h + 1) * HS] for j in range(3))
            for t in range(T):
                s = np.array([q[t] @ k[u] / math.sqrt(HS) for u in range(t + 1)])
                p = np.exp(s - s.max())
                out[b, t, h * HS:(h + 1) * HS] = (p / p.sum()) @ v[:t + 1]
    return out


def test_attention_forward(rng):
    qkv = rng.standard_normal((2, 5, 3 * 8))
    out, att = ref.attention_forward(qkv, n_head=2)
    np.testing.assert_allclose(out, attention_loops(qkv, 2), rtol=1e-10, atol=1e-12)
    assert att.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(att.sum(-1), 1, rtol=1e-12)
    assert np.all(np.triu(att, k=1) == 0), "attention looks at future positions"
    one, _ = ref.attention_forward(qkv[:, :1], n_head=2)  # T = 1: out is v
    np.testing.assert_allclose(one, qkv[:, :1, 16:], rtol=1e-12)


def test_attention_backward(rng):
    B, T, C, NH = 2, 4, 6, 2
    qkv = rng.standard_normal((B, T, 3 * C))
    R = rng.standard_normal((B, T, C))
    _, att = ref.attention_forward(qkv, NH)
    dqkv = ref.attention_backward(R, qkv, att, NH)
    J = lambda: float(np.sum(ref.attention_forward(qkv, NH)[0] * R))
    check_grad("attention dqkv", dqkv, J, qkv)


def test_attention_rejects_bad_shape(rng):
    with pytest.raises(ValueError, match="n_head"):
        ref.attention_forward(rng.standard_normal((1, 2, 3 * 5)), n_head=2)


def test_gelu_forward_values():
    # the tanh-approximate GELU at known points, and against the formula in scalar math
    x = np.array([-1.0, 0.0, 1.0, -2.5, 3.0])
    got = ref.gelu_forward(x)
    np.testing.assert_allclose(got[:3], [-0.15880800939172324, 0.0, 0.8411919906082768], rtol=1e-12)
    scalar = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x]
    np.testing.assert_allclose(got, scalar, rtol=1e-12, atol=1e-15)


def test_gelu_backward(rng):
    x = rng.standard_normal((3, 11)) * 2
    R = rng.standard_normal((3, 11))
    J = lambda: float(np.sum(ref.gelu_forward(x) * R))
    check_grad("gelu dx", ref.gelu_backward(x, R), J, x)


def test_crossentropy_forward(rng):
    N, V, Vp = 5, 7, 10
    logits = rng.standard_normal((N, Vp)) * 3
    logits[:, V:] = 50.0  # huge padded logits must not matter
    targets = rng.integers(0, V, N)
    losses, probs = ref.crossentropy_forward(logits, targets, V)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-12)
    assert np.all(probs[:, V:] == 0)
    want = [-math.log(math.exp(logits[n, targets[n]]) / np.exp(logits[n, :V]).sum()) for n in range(N)]
    np.testing.assert_allclose(losses, want, rtol=1e-12)
    with pytest.raises(ValueError, match="targets"):
        ref.crossentropy_forward(logits, np.array([0, 1, 2, 3, V]), V)


def test_crossentropy_backward(rng):
    N, V, Vp = 6, 7, 9
    logits = rng.standard_normal((N, Vp)) * 2
    targets = rng.integers(0, V, N)
    dlosses = rng.standard_normal(N)
    _, probs = ref.crossentropy_forward(logits, targets, V)
    dlogits = ref.crossentropy_backward(probs, targets, dlosses)
    J = lambda: float(np.sum(ref.crossentropy_forward(logits, targets, V)[0] * dlosses))
    check_grad("crossentropy dlogits", dlogits, J, logits)
    assert np.all(dlogits[:, V:] == 0), "padded columns got a gradient"


def test_float32_stays_float32(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    inp = rng.integers(0, 5, (2, 3)).astype(np.int32)
    x, w, b, qkv = f(2, 3, 4), f(4), f(4), f(2, 3, 12)
    results = [*ref.encoder_forward(f(5, 4), f(3, 4), inp)[None],
               *ref.encoder_backward(x, inp, (5, 4), (3, 4)),
               *ref.layernorm_forward(x, w, b),
               *ref.layernorm_backward(x, x, w, *ref.layernorm_forward(x, w, b)[1:]),
               ref.residual_forward(x, x),
               ref.matmul_forward(x, f(6, 4), f(6)),
               *ref.matmul_backward(f(2, 3, 6), x, f(6, 4)),
               *ref.attention_forward(qkv, 2),
               ref.attention_backward(x, qkv, ref.attention_forward(qkv, 2)[1], 2),
               ref.gelu_forward(x), ref.gelu_backward(x, x)]
    losses, probs = ref.crossentropy_forward(f(6, 5), inp.reshape(-1) % 4, 4)
    results += [losses, probs, ref.crossentropy_backward(probs, inp.reshape(-1) % 4, f(6))]
    for i, r in enumerate(results):
        assert r.dtype == np.float32, f"result {i} is {r.dtype}"
