"""NumPy reference of every GPT-2 op, forward and backward: the CPU path and the GPU test oracle.

Each function is the math of one layer, written plainly and vectorized (attention is a batched
matmul), with the same shapes as the GPU ops in `llmc/ops/`. Backward functions return fresh
gradients (`=`); callers that accumulate add them up themselves.

Design choices:
- Dtype-generic: every result has the dtype of the inputs (float32 for the CPU training path,
  float64 for finite-difference checks). Constants are Python floats so they never promote a
  float32 array to float64 (NEP 50).
- LayerNorm uses the biased variance and eps = 1e-5, as GPT-2.
- GELU is the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
- Attention is causal; the forward saves the softmax probabilities `att` for the backward.
- fp8 (the --fp8 products): a cast is q = fp8(x * scale), round to nearest even, saturating at
  the format's largest finite value (NaN stays NaN); fp8 bits are uint8 arrays, decoded with
  ml_dtypes' float8_e4m3fn / float8_e5m2. The scale rule is Transformer Engine's delayed
  scaling, in float32 as the kernel computes it (see fp8_scale_update).
- Cross-entropy reads only the first V of Vp logit columns: padded columns get probability 0
  and gradient 0, so padded rows of the tied wte never receive a gradient from the loss.

Shapes: B batch, T time, C channels, NH heads, HS = C / NH, N = B*T rows, OC output channels,
V vocabulary, Vp padded vocabulary, maxT rows of wpe.
"""
from __future__ import annotations

import math

import numpy as np

LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


# ---------------------------------------------------------------------------------------------
# encoder: token embedding + position embedding

def encoder_forward(wte, wpe, inp):
    """out[b, t] = wte[inp[b, t]] + wpe[t]. wte (Vp, C), wpe (maxT, C), inp int (B, T) -> (B, T, C)."""
    T = inp.shape[1]
    return wte[inp] + wpe[:T]  # (B, T, C)


def encoder_backward(dout, inp, wte_shape, wpe_shape):
    """dout (B, T, C) -> dwte (Vp, C), dwpe (maxT, C); repeated tokens accumulate."""
    B, T, C = dout.shape
    dwte = np.zeros(wte_shape, dtype=dout.dtype)
    np.add.at(dwte, inp.reshape(-1), dout.reshape(B * T, C))  # (Vp, C)
    dwpe = np.zeros(wpe_shape, dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)  # (T, C) into (maxT, C)
    return dwte, dwpe


# ---------------------------------------------------------------------------------------------
# layernorm

def layernorm_forward(x, w, b, eps=LN_EPS):
    """y = (x - mean) * rstd * w + b over the last axis. x (..., C) -> out (..., C), mean (...), rstd (...)."""
    mean = x.mean(axis=-1)  # (...)
    xc = x - mean[..., None]  # (..., C)
    var = (xc * xc).mean(axis=-1)  # (...) biased
    rstd = 1.0 / np.sqrt(var + eps)  # (...)
    out = xc * rstd[..., None] * w + b  # (..., C)
    return out, mean, rstd


def layernorm_backward(dout, x, w, mean, rstd):
    """dout, x (..., C); w (C,); mean, rstd (...) -> dx (..., C), dw (C,), db (C,)."""
    norm = (x - mean[..., None]) * rstd[..., None]  # (..., C)
    lead = tuple(range(x.ndim - 1))
    dw = (dout * norm).sum(axis=lead)  # (C,)
    db = dout.sum(axis=lead)  # (C,)
    dnorm = dout * w  # (..., C)
    dx = (dnorm
          - dnorm.mean(axis=-1, keepdims=True)
          - norm * (dnorm * norm).mean(axis=-1, keepdims=True)) * rstd[..., None]  # (..., C)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# residual

def residual_forward(a, b):
    """a + b; the backward hands the same gradient to both inputs."""
    return a + b


# ---------------------------------------------------------------------------------------------
# matmul (linear layer): y = x @ w.T + b

def matmul_forward(x, w, b=None):
    """x (..., C), w (OC, C), b (OC,) or None -> (..., OC)."""
    out = x @ w.T  # (..., OC)
    if b is not None:
        out += b
    return out


def matmul_backward(dout, x, w, has_bias=True):
    """dout (..., OC), x (..., C), w (OC, C) -> dx (..., C), dw (OC, C), db (OC,) or None."""
    OC, C = w.shape
    dx = dout @ w  # (..., C)
    dout2 = dout.reshape(-1, OC)  # (N, OC)
    dw = dout2.T @ x.reshape(-1, C)  # (OC, C)
    db = dout2.sum(axis=0) if has_bias else None  # (OC,)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# causal self-attention

def _split_heads(qkv, n_head):
    """qkv (B, T, 3C) -> q, k, v each (B, NH, T, HS)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    heads = qkv.reshape(B, T, 3, n_head, C // n_head)  # (B, T, 3, NH, HS)
    heads = heads.transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, HS)
    return heads[0], heads[1], heads[2]


def _check_qkv(qkv, n_head):
    if qkv.ndim != 3 or qkv.shape[2] % 3 != 0 or (qkv.shape[2] // 3) % n_head != 0:
        raise ValueError(f"qkv must be (B, T, 3C) with C divisible by n_head={n_head}, "
                         f"got shape {qkv.shape}")


def attention_forward(qkv, n_head):
    """Causal softmax attention. qkv (B, T, 3C) -> out (B, T, C), att (B, NH, T, T) probabilities."""
    _check_qkv(qkv, n_head)
    B, T, C3 = qkv.shape
    q, k, v = _split_heads(qkv, n_head)  # (B, NH, T, HS) each
    scale = 1.0 / math.sqrt(q.shape[-1])
    preatt = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, NH, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # (T, T): key after query
    preatt[..., future] = -np.inf
    preatt -= preatt.max(axis=-1, keepdims=True)
    att = np.exp(preatt)
    att /= att.sum(axis=-1, keepdims=True)  # (B, NH, T, T)
    y = att @ v  # (B, NH, T, HS)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)  # (B, T, C)
    return out, att


def attention_cached(q, kcache, vcache, pos):
    """Attention of new queries over a KV cache, as generation runs it.

    q (B, R, C): query r of sequence b sits at position pos[b] + r and attends to the cached keys
    0 .. pos[b] + r of kcache/vcache (B, NH, S, HS). Returns out (B, R, C).
    """
    B, R, C = q.shape
    _, NH, S, HS = kcache.shape
    qh = q.reshape(B, R, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, R, HS)
    scores = (qh @ kcache.transpose(0, 1, 3, 2)) / math.sqrt(HS)  # (B, NH, R, S)
    last = np.asarray(pos)[:, None] + np.arange(R)[None, :]  # (B, R): each query's position
    future = np.arange(S)[None, None, :] > last[:, :, None]  # (B, R, S)
    scores = np.where(future[:, None], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    att = np.exp(scores)
    att /= att.sum(axis=-1, keepdims=True)
    return (att @ vcache).transpose(0, 2, 1, 3).reshape(B, R, C)  # (B, R, C)


def attention_backward(dout, qkv, att, n_head):
    """dout (B, T, C), qkv (B, T, 3C), att (B, NH, T, T) -> dqkv (B, T, 3C)."""
    _check_qkv(qkv, n_head)
    B, T, C3 = qkv.shape
    q, k, v = _split_heads(qkv, n_head)  # (B, NH, T, HS) each
    HS = q.shape[-1]
    scale = 1.0 / math.sqrt(HS)
    dy = dout.reshape(B, T, n_head, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    dv = att.transpose(0, 1, 3, 2) @ dy  # (B, NH, T, HS)
    # softmax backward; masked entries have att = 0 so their gradient is 0
    dpreatt = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) * scale  # (B, NH, T, T)
    dq = dpreatt @ k  # (B, NH, T, HS)
    dk = dpreatt.transpose(0, 1, 3, 2) @ q  # (B, NH, T, HS)
    dqkv = np.stack([dq, dk, dv])  # (3, B, NH, T, HS)
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, C3)  # (B, T, 3C)


# ---------------------------------------------------------------------------------------------
# gelu (tanh approximation)

def gelu_forward(x):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise."""
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x)))


def gelu_backward(x, dout):
    """dx = dout * dy/dx, elementwise."""
    th = np.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x))
    dth = (1.0 - th * th) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
    return dout * (0.5 * (1.0 + th) + 0.5 * x * dth)


# ---------------------------------------------------------------------------------------------
# softmax cross-entropy over the real vocabulary

def crossentropy_forward(logits, targets, V):
    """logits (N, Vp), targets int (N,) in [0, V) -> losses (N,), probs (N, Vp) (columns >= V are 0)."""
    N, Vp = logits.shape
    if not 0 < V <= Vp:
        raise ValueError(f"V={V} must be in [1, Vp={Vp}]")
    if targets.shape != (N,):
        raise ValueError(f"targets must have shape ({N},), got {targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"targets must lie in [0, {V}), got range "
                         f"[{targets.min()}, {targets.max()}]")
    real = logits[:, :V]  # (N, V)
    shifted = real - real.max(axis=1, keepdims=True)  # (N, V)
    logsumexp = np.log(np.exp(shifted).sum(axis=1))  # (N,)
    rows = np.arange(N)
    losses = logsumexp - shifted[rows, targets]  # (N,)
    probs = np.zeros_like(logits)  # (N, Vp)
    probs[:, :V] = np.exp(shifted - logsumexp[:, None])
    return losses, probs


def crossentropy_backward(probs, targets, dlosses):
    """probs (N, Vp), targets (N,), dlosses (N,) -> dlogits (N, Vp) = (probs - onehot) * dlosses."""
    N = probs.shape[0]
    dlogits = probs.copy()  # (N, Vp)
    dlogits[np.arange(N), targets] -= 1.0
    dlogits *= dlosses[:, None].astype(probs.dtype, copy=False)
    return dlogits


# ---------------------------------------------------------------------------------------------
# sampling the next token

def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution generation draws the next token from: float64 (V,) for logits (V,).

    temperature 0: all mass on the argmax (lowest id among ties). Else softmax(logits / T) over
    the tokens kept by top-k (z >= the k-th largest z, ties kept; 0 keeps all) and then top-p
    (a token is kept when the kept mass strictly above it is below top_p of the total; 1 keeps
    all), renormalized. The GPU kernel (kernels/sampling.cu) draws from exactly this support.
    """
    z = np.asarray(logits, dtype=np.float64)
    out = np.zeros_like(z)
    if temperature <= 0:
        out[int(np.argmax(z))] = 1.0
        return out
    z = z / temperature
    keep = np.ones(z.shape, dtype=bool)
    if 0 < top_k < z.size:
        keep &= z >= np.sort(z)[-top_k]
    w = np.where(keep, np.exp(z - z.max()), 0.0)
    if top_p < 1.0:
        order = np.argsort(-z, kind="stable")
        zs, ws = z[order], w[order]
        # mass strictly above each token: the total of every kept token with a larger z
        uniq, first = np.unique(-zs, return_index=True)
        above_by_value = np.concatenate([[0.0], np.cumsum(ws)])[first]
        above = np.empty_like(z)
        above[order] = above_by_value[np.searchsorted(uniq, -zs)]
        keep &= above < top_p * w.sum()
        w = np.where(keep, w, 0.0)
    return w / w.sum()


# ---------------------------------------------------------------------------------------------
# fp8: casts, the scale rule, the product of decoded operands

FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def _fp8_dtype(fmt):
    import ml_dtypes
    if fmt not in FP8_MAX:
        raise ValueError(f"fmt: expected 'e4m3' or 'e5m2', got {fmt!r}")
    return ml_dtypes.float8_e4m3fn if fmt == "e4m3" else ml_dtypes.float8_e5m2


def fp8_quantize(x, scale, fmt):
    """uint8 fp8 bits of x * scale (products in float32), nearest even, saturating; x's shape."""
    fmax = np.float32(FP8_MAX[fmt])
    y = np.asarray(x, dtype=np.float32) * np.float32(scale)
    y = np.clip(y, -fmax, fmax)  # satfinite; NaN passes through clip
    return y.astype(_fp8_dtype(fmt)).view(np.uint8)


def fp8_dequantize(bits, fmt, scale_inv=1.0):
    """float32 values of uint8 fp8 bits, times the decode scale scale_inv."""
    values = np.asarray(bits, dtype=np.uint8).view(_fp8_dtype(fmt)).astype(np.float32)
    return values * np.float32(scale_inv)


def fp8_amax(x):
    """max |x| as float32 (NaN when x holds a NaN, as the kernel's max over the bits of |x|)."""
    a = np.abs(np.asarray(x, dtype=np.float32))
    return np.float32(np.nan) if np.isnan(a).any() else np.float32(a.max(initial=0.0))


def fp8_scale_update(scale, history, amax, fmax, pos, margin=0):
    """Delayed scaling, one step for S slots; returns new (scale, scale_inv, history, amax).

    scale, amax, fmax (S,) float32; history (S, H) float32; pos: the history column written.
    history[:, pos] = amax; amax = 0; m = max of the finite history entries per slot;
    scale = fmax / m * 2^-margin where m > 0 and the result is finite and > 0, else unchanged;
    scale_inv = 1 / scale.
    """
    scale = np.array(scale, dtype=np.float32)
    history = np.array(history, dtype=np.float32)
    history[:, pos] = np.asarray(amax, dtype=np.float32)
    finite = np.where(np.isfinite(history), history, np.float32(0.0))
    m = finite.max(axis=1)  # (S,)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        candidate = np.asarray(fmax, dtype=np.float32) / m * np.float32(2.0 ** -margin)
    ok = (m > 0) & np.isfinite(candidate) & (candidate > 0)
    scale = np.where(ok, candidate, scale).astype(np.float32)
    return scale, (np.float32(1.0) / scale).astype(np.float32), history, np.zeros_like(scale)


def fp8_matmul(a_bits, a_fmt, a_scale_inv, b_bits, b_fmt, b_scale_inv, bias=None):
    """float64 (M, N) = decode(a) (M, K) @ decode(b) (N, K).T (+ bias (N,)): the exact product
    of what an fp8 matmul multiplies, the oracle for cuBLASLt's fp32 accumulation."""
    a = fp8_dequantize(a_bits, a_fmt, a_scale_inv).astype(np.float64)
    b = fp8_dequantize(b_bits, b_fmt, b_scale_inv).astype(np.float64)
    out = a @ b.T  # (M, N)
    return out if bias is None else out + np.asarray(bias, dtype=np.float64)
