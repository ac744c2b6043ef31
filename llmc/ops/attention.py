"""Causal self-attention launchers: the "matmul" method (kernels/attention.cu + cuBLAS) and the
dispatch to the "flash" method (llmc/ops/flash_attention.py).

    attention_forward(out (B,T,C), saved, qkv (B,T,3C), n_head, scratch)
    attention_backward(dqkv (B,T,3C) =, dout (B,T,C), qkv, out, saved, n_head, scratch)
    attention(qkv, n_head, method="auto") -> out, saved
    attention_grad(dout, qkv, out, saved, n_head) -> dqkv
        the same, allocating outputs, saved arrays and scratch

`saved` holds one layer's arrays kept from the forward for the backward; `scratch` is one dict
shared by every layer. Both are allocated once by the model from `attention_buffers(...)` and
`attention_scratch(...)` ({name: (shape, dtype)}; `allocate` turns such a spec into arrays).
The method is read off `saved`: {"att"} is the matmul method, {"lse"} the flash method.

Matmul method (fp32 or bf16, any head size), HS = C/NH, scale = 1/sqrt(HS):
    qkvp  = split_heads(qkv)                      (3, B, NH, T, HS)   scratch["qkvp"]
    att   = scale * q @ k^T, softmaxed in place   (B, NH, T, T)       saved["att"]
    y     = att @ v                               (B, NH, T, HS)      scratch["dqkvp"][0]
    out   = merge_heads(y)
  Backward, reusing the buffers in an order that keeps every operand alive while it is read:
    dy = split_heads(dout) -> dqkvp[0]; datt = dy @ v^T -> scratch["datt"]; dv = att^T @ dy -> dqkvp[2]
    dpreatt = softmax backward, in place in datt; dq = dpreatt @ k -> dqkvp[0] (dy is dead);
    dk = dpreatt^T @ q -> dqkvp[1]; dqkv = merge_heads(dqkvp)
  The products are gemmStridedBatchedEx over B*NH heads (llmc.cuda.cublas.gemm), so this method cannot
  be captured in a CUDA graph. It stores a T x T matrix per head and layer: the fallback for
  fp32 and head sizes the flash kernel does not take.

Flash method: saved = {"lse": (B, NH, T) f32}; scratch is what `flash_scratch_shapes(B, T, C,
NH)` asks for ({name: (shape, dtype)}), passed on to `flash_attention_backward` as that dict.
"""
from __future__ import annotations

import importlib
import importlib.util
import math

import numpy as np

from llmc import kernels
from llmc.cuda.cublas import gemm
from llmc.ops import BF16, F32, FLOATX, as_dtype, ceil_div, check, dtype_name
from llmc.ops.arrays import empty

METHODS = ("matmul", "flash")
FLASH_HEAD_SIZE = 64  # the head size (and bf16 the dtype) the flash kernel is written for
ELEMENTWISE_BLOCK = 256
SOFTMAX_BLOCK = 256  # 8 warps, one row each


def flash_available() -> bool:
    """True when both kernels/flash_attention.cu and llmc/ops/flash_attention.py exist."""
    try:
        cu = (kernels.kernel_dir() / "flash_attention.cu").is_file()
    except FileNotFoundError:
        return False
    return cu and importlib.util.find_spec("llmc.ops.flash_attention") is not None


def _flash():
    return importlib.import_module("llmc.ops.flash_attention")


def resolve_method(method: str, dtype, head_size: int) -> str:
    """"auto" -> "flash" for bf16 with HS == 64 when the flash kernel exists, else "matmul"."""
    dt = as_dtype(dtype)
    if dt not in FLOATX:
        raise ValueError(f"dtype: expected bfloat16 or float32, got {dt}")
    if method == "auto":
        ok = dt == BF16 and head_size == FLASH_HEAD_SIZE and flash_available()
        return "flash" if ok else "matmul"
    if method == "flash":
        if not flash_available():
            raise ValueError("method: 'flash' needs kernels/flash_attention.cu and "
                             "llmc/ops/flash_attention.py, which this installation lacks; "
                             "use 'matmul' or 'auto'")
        if dt != BF16 or head_size != FLASH_HEAD_SIZE:
            raise ValueError(f"method: 'flash' takes bf16 with head size {FLASH_HEAD_SIZE}, got "
                             f"{dt} with head size {head_size}; use 'matmul' or 'auto'")
        return method
    if method == "matmul":
        return method
    raise ValueError(f"method: expected one of {('auto',) + METHODS}, got {method!r}")


def _head_size(C: int, NH: int) -> int:
    if NH <= 0 or C % NH != 0:
        raise ValueError(f"n_head: must divide C = {C}, got {NH}")
    return C // NH


def attention_buffers(B: int, T: int, C: int, NH: int, dtype, method: str) -> dict:
    """Per-layer arrays the forward saves for the backward: {name: (shape, dtype)}."""
    HS = _head_size(C, NH)
    method = resolve_method(method, dtype, HS)
    if method == "flash":
        return {"lse": ((B, NH, T), F32)}
    return {"att": ((B, NH, T, T), as_dtype(dtype))}


def attention_scratch(B: int, T: int, C: int, NH: int, dtype, method: str) -> dict:
    """Arrays shared by every layer's forward and backward: {name: (shape, dtype)}."""
    HS = _head_size(C, NH)
    method = resolve_method(method, dtype, HS)
    if method == "flash":
        spec = _flash().flash_scratch_shapes(B, T, C, NH)
        return {name: (tuple(shape), as_dtype(dt)) for name, (shape, dt) in spec.items()}
    dt = as_dtype(dtype)
    return {"qkvp": ((3, B, NH, T, HS), dt),    # q, k, v by head
            "dqkvp": ((3, B, NH, T, HS), dt),   # y in the forward; dy, then dq, dk, dv
            "datt": ((B, NH, T, T), dt)}        # datt, then dpreatt in place


def allocate(spec: dict) -> dict:
    """cupy.empty arrays for a {name: (shape, dtype)} spec (done once, outside the step)."""
    import cupy
    return {name: cupy.empty(shape, dtype=dt) for name, (shape, dt) in spec.items()}


def _get(where: str, d: dict, key: str, shape, dtype):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: expected a dict with {key!r} (see attention_buffers / "
                         f"attention_scratch), got keys {sorted(d) if isinstance(d, dict) else d!r}")
    return check(f"{where}[{key!r}]", d[key], shape, dtype)


def _method_of(saved) -> str:
    if isinstance(saved, dict) and "att" in saved:
        return "matmul"
    if isinstance(saved, dict) and "lse" in saved:
        return "flash"
    raise ValueError(f"saved: expected a dict with 'att' (matmul method) or 'lse' (flash method), "
                     f"got {sorted(saved) if isinstance(saved, dict) else type(saved).__name__}")


def _check_qkv(qkv, n_head: int):
    check("qkv", qkv, (None, None, None), FLOATX)
    B, T, C3 = qkv.shape
    if C3 % 3 != 0:
        raise ValueError(f"qkv: last dimension must be 3*C, got {C3}")
    C = C3 // 3
    HS = _head_size(C, n_head)
    if B * T * C3 >= 2**31:
        raise ValueError(f"qkv: at most 2^31 - 1 elements (32-bit indexing), got shape {qkv.shape}")
    return B, T, C, n_head, HS


def _elementwise(name: str, dt: str, out, inp, parts: int, B: int, T: int, NH: int, HS: int):
    kernel = kernels.function("attention", name, dt)
    total = B * T * NH * HS
    kernel((ceil_div(total, ELEMENTWISE_BLOCK),), (ELEMENTWISE_BLOCK,),
           (out, inp, np.int32(parts), np.int32(B), np.int32(T), np.int32(NH), np.int32(HS)))


def _softmax_grid(rows: int) -> tuple:
    return (ceil_div(rows, SOFTMAX_BLOCK // 32),), (SOFTMAX_BLOCK,)


def attention_forward(out, saved, qkv, n_head: int, scratch):
    """Causal self-attention: out (B, T, C) = softmax(q k^T / sqrt(HS), causal) v, heads merged."""
    B, T, C, NH, HS = _check_qkv(qkv, n_head)
    check("out", out, (B, T, C), qkv.dtype)
    if _method_of(saved) == "flash":
        lse = _get("saved", saved, "lse", (B, NH, T), F32)
        _flash().flash_attention_forward(out, lse, qkv, n_head)
        return out
    dt = dtype_name(qkv, "qkv")
    att = _get("saved", saved, "att", (B, NH, T, T), qkv.dtype)
    qkvp = _get("scratch", scratch, "qkvp", (3, B, NH, T, HS), qkv.dtype)
    dqkvp = _get("scratch", scratch, "dqkvp", (3, B, NH, T, HS), qkv.dtype)
    if B * T == 0:
        return out
    heads = (B * NH, T, HS)
    q, k, v = (qkvp[i].reshape(heads) for i in range(3))
    att3 = att.reshape(B * NH, T, T)
    y = dqkvp[0].reshape(heads)

    _elementwise("split_heads", dt, qkvp, qkv, 3, B, T, NH, HS)
    gemm(att3, q, k, trans_b=True, alpha=1.0 / math.sqrt(HS), beta=0.0)
    grid, block = _softmax_grid(B * NH * T)
    kernels.function("attention", "softmax_causal_forward", dt)(
        grid, block, (att, att, np.int32(B * NH * T), np.int32(T)))
    gemm(y, att3, v, alpha=1.0, beta=0.0)
    _elementwise("merge_heads", dt, out, y, 1, B, T, NH, HS)
    return out


def attention_backward(dqkv, dout, qkv, out, saved, n_head: int, scratch):
    """dqkv (B, T, 3C) = gradient of attention_forward through dout (B, T, C); overwrites dqkv."""
    B, T, C, NH, HS = _check_qkv(qkv, n_head)
    check("dqkv", dqkv, (B, T, 3 * C), qkv.dtype)
    check("dout", dout, (B, T, C), qkv.dtype)
    check("out", out, (B, T, C), qkv.dtype)
    if _method_of(saved) == "flash":
        lse = _get("saved", saved, "lse", (B, NH, T), F32)
        _flash().flash_attention_backward(dqkv, dout, qkv, out, lse, n_head, scratch)
        return dqkv
    dt = dtype_name(qkv, "qkv")
    att = _get("saved", saved, "att", (B, NH, T, T), qkv.dtype)
    qkvp = _get("scratch", scratch, "qkvp", (3, B, NH, T, HS), qkv.dtype)
    dqkvp = _get("scratch", scratch, "dqkvp", (3, B, NH, T, HS), qkv.dtype)
    datt = _get("scratch", scratch, "datt", (B, NH, T, T), qkv.dtype)
    if B * T == 0:
        return dqkv
    heads = (B * NH, T, HS)
    q, k, v = (qkvp[i].reshape(heads) for i in range(3))
    dq, dk, dv = (dqkvp[i].reshape(heads) for i in range(3))
    dy = dq  # dy lives in dq's slot until dq is computed
    att3 = att.reshape(B * NH, T, T)
    datt3 = datt.reshape(B * NH, T, T)

    _elementwise("split_heads", dt, qkvp, qkv, 3, B, T, NH, HS)
    _elementwise("split_heads", dt, dqkvp, dout, 1, B, T, NH, HS)
    gemm(datt3, dy, v, trans_b=True, alpha=1.0, beta=0.0)
    gemm(dv, att3, dy, trans_a=True, alpha=1.0, beta=0.0)
    grid, block = _softmax_grid(B * NH * T)
    kernels.function("attention", "softmax_causal_backward", dt)(
        grid, block, (datt, datt, att, np.int32(B * NH * T), np.int32(T),
                      np.float32(1.0 / math.sqrt(HS))))
    gemm(dq, datt3, k, alpha=1.0, beta=0.0)  # overwrites dy, read for the last time above
    gemm(dk, datt3, q, trans_a=True, alpha=1.0, beta=0.0)
    _elementwise("merge_heads", dt, dqkv, dqkvp, 3, B, T, NH, HS)
    return dqkv


# ---------------------------------------------------------------------------------------------
# functional forms: allocate their outputs, saved arrays and scratch


def attention(qkv, n_head: int, method: str = "auto"):
    """Causal self-attention; returns (out, saved) as new arrays.

    qkv: (B, T, 3C), q, k, v at channels [0, C), [C, 2C), [2C, 3C), bf16 or fp32; n_head divides
    C. method: "auto" (flash for bf16 with head size 64, else matmul), "flash" or "matmul".
    out: (B, T, C) of qkv's dtype. saved: what attention_grad needs besides qkv and out, a dict:
    {"lse": (B, NH, T) f32} (flash) or {"att": (B, NH, T, T) softmax probabilities} (matmul).
    """
    B, T, C, NH, HS = _check_qkv(qkv, n_head)
    saved = allocate(attention_buffers(B, T, C, NH, qkv.dtype, method))
    scratch = allocate(attention_scratch(B, T, C, NH, qkv.dtype, method))
    out = empty((B, T, C), qkv.dtype)
    attention_forward(out, saved, qkv, n_head, scratch)
    return out, saved


def attention_grad(dout, qkv, out, saved, n_head: int):
    """dqkv (B, T, 3C), a new array: the gradient of attention through dout (B, T, C).

    qkv, out, saved: the forward's input and outputs (the method is read off saved).
    """
    B, T, C, NH, HS = _check_qkv(qkv, n_head)
    scratch = allocate(attention_scratch(B, T, C, NH, qkv.dtype, _method_of(saved)))
    dqkv = empty((B, T, 3 * C), qkv.dtype)
    return attention_backward(dqkv, dout, qkv, out, saved, n_head, scratch)
