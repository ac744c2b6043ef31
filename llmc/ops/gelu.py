"""GELU (tanh approximation) launchers for kernels/gelu.cu.

    gelu_forward(out, inp)            out = gelu(inp)
    gelu_backward(dinp, inp, dout)    dinp = gelu'(inp) * dout   (=, dinp may be dout itself)
    gelu(x) -> y ; gelu_grad(x, dout) -> dx     the same, allocating their outputs

Any shape (the MLP uses (B, T, 4C)); arrays C-contiguous, floatX (bf16 or fp32), 16-byte
aligned for the kernels' 128-bit access. One thread per 128-bit pack.
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.ops import ceil_div, check, check_aligned, check_same, dtype_name, pack_size
from llmc.ops.arrays import empty

BLOCK = 256
FWD_PACKS = 2  # GELU_FWD_PACKS in kernels/gelu.cu: packs per thread of the forward


def _grid(n: int, dtype, packs_per_thread: int = 1) -> tuple:
    return (max(1, ceil_div(ceil_div(n, pack_size(dtype)), BLOCK * packs_per_thread)),)


def gelu_forward(out, inp):
    """out (any shape) = gelu(inp); floatX."""
    dt = dtype_name(inp, "inp")
    check("inp", inp)
    check_same("out", out, inp, "inp")
    for name, x in (("out", out), ("inp", inp)):
        check_aligned(name, x)
    if inp.size == 0:
        return out
    kernels.function("gelu", "gelu_forward", dt)(
        _grid(inp.size, inp.dtype, FWD_PACKS), (BLOCK,), (out, inp, np.int64(inp.size)))
    return out


def gelu_backward(dinp, inp, dout):
    """dinp = gelu'(inp) * dout (written, not accumulated); dinp may alias dout."""
    dt = dtype_name(inp, "inp")
    check("inp", inp)
    check_same("dout", dout, inp, "inp")
    check_same("dinp", dinp, inp, "inp")
    for name, x in (("dinp", dinp), ("inp", inp), ("dout", dout)):
        check_aligned(name, x)
    if inp.size == 0:
        return dinp
    kernels.function("gelu", "gelu_backward", dt)(
        _grid(inp.size, inp.dtype), (BLOCK,), (dinp, inp, dout, np.int64(inp.size)))
    return dinp


# ---------------------------------------------------------------------------------------------
# functional forms: allocate their outputs


def gelu(x):
    """y = gelu(x), tanh approximation; a new array.

    x: any shape, C-contiguous, bf16 or fp32, 16-byte aligned. Returns y of x's shape and dtype.
    Saves nothing: the backward needs x itself.
    """
    check("x", x)
    return gelu_forward(empty(x.shape, x.dtype), x)


def gelu_grad(x, dout):
    """dx = gelu'(x) * dout; a new array (written, not accumulated).

    x: the forward's input; dout: the gradient of y, x's shape and dtype.
    """
    check("x", x)
    return gelu_backward(empty(x.shape, x.dtype), x, dout)
