"""GELU (tanh approximation) launchers for kernels/gelu.cu.

    gelu_forward(out, inp)            out = gelu(inp)
    gelu_backward(dinp, inp, dout)    dinp = gelu'(inp) * dout   (=, dinp may be dout itself)

Any shape (the MLP uses (B, T, 4C)); arrays C-contiguous, floatX (bf16 or fp32), 16-byte
aligned for the kernels' 128-bit access. One thread per 128-bit pack.
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.ops import ceil_div, check, check_aligned, check_same, dtype_name, pack_size

BLOCK = 256


def _grid(n: int, dtype) -> tuple:
    return (max(1, ceil_div(ceil_div(n, pack_size(dtype)), BLOCK)),)


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
        _grid(inp.size, inp.dtype), (BLOCK,), (out, inp, np.int64(inp.size)))
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
