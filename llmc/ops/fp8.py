"""fp8 launchers for kernels/fp8.cu, and the fp8 product through cuBLASLt.

    cast_transpose(out, out_t, amax, inp, scale, *, fmt="e4m3", batch=1)
        out (R, C) = fp8(inp * scale), out_t (C, R) = its transpose (either may be None: amax
        alone), amax = max(amax, max |inp|)                                 (max-accumulated)
    gelu_cast_transpose(out, out_t, amax, inp, scale, *, out_x=None, fmt="e4m3")
        the same of y = gelu(inp) rounded to floatX, y also written to out_x when given
    scale_update(scale, scale_inv, history, amax, fmax, pos, margin=0, advance=True)
        delayed scaling for S slots: history[:, pos] = amax, amax = 0, new scale and 1/scale;
        pos is an int32 device scalar, moved on by the kernel (scale_inv: (S, 4), column 0)
    fp8_matmul(out, a, a_format, a_scale_inv, b, b_format, b_scale_inv, *, beta=0.0,
               epilogue="default", bias=None, aux=None, fast_accum=False)
        out (M, N) bf16 = a_scale_inv * b_scale_inv * a (M, K) @ b (N, K).T (+ beta out)
    quantize(x, scale, fmt) -> (bits, amax)    functional form of cast_transpose (new arrays)

fp8 tensors are uint8 arrays of fp8 bits; their format ("e4m3": weights and activations, max
448; "e5m2": gradients, max 57344) travels beside them. Scales are fp32 device arrays: `scale`
multiplies before the cast (fp8 = fmax / amax), its inverse decodes (cuBLASLt reads it through
a device pointer). inp is (batch, R, C) or any shape with R*C*batch elements viewed so (a
stacked (L, OC, C) weight: batch=L, per-matrix amax and scale); R and C multiples of 16 (the fp8
products' 16-byte rows). The NumPy reference is llmc.model.reference.fp8_*.
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.cuda import cublaslt_fp8
from llmc.model.reference import FP8_MAX
from llmc.ops import F32, ceil_div, check, check_aligned, dtype_name
from llmc.ops.arrays import empty, zeros

TILE = 64          # FP8_TILE in kernels/fp8.cu
THREADS = 256
UPDATE_BLOCK = 128
INV_STRIDE = 4  # floats per slot row of scale_inv: 16-byte aligned decode-scale pointers
U8 = np.dtype(np.uint8)
NULL = np.uint64(0)  # CuPy turns a None kernel argument into a garbage pointer (cupy/cupy#9046)


def _format(fmt: str) -> int:
    if fmt not in FP8_MAX:
        raise ValueError(f"fmt: expected 'e4m3' or 'e5m2', got {fmt!r}")
    return 1 if fmt == "e5m2" else 0


def _check_cast(inp, out, out_t, amax, scale, batch):
    dt = dtype_name(inp, "inp")
    check("inp", inp)
    check_aligned("inp", inp)
    if inp.ndim < 2 or batch < 1 or inp.shape[-1] < 1 or inp.size % (batch * inp.shape[-1]):
        raise ValueError(f"inp: expected (batch={batch}, R, C) elements, got shape {inp.shape}")
    C = inp.shape[-1]
    R = inp.size // (batch * C)
    if R % 16 or C % 16:
        raise ValueError(f"inp: rows R={R} and columns C={C} must be multiples of 16 (the fp8 "
                         f"products' 16-byte rows), got shape {inp.shape}")
    for name, a, shape in (("out", out, (batch, R, C)), ("out_t", out_t, (batch, C, R))):
        if a is not None:
            check(name, a, dtype=U8)
            if a.size != batch * R * C:
                raise ValueError(f"{name}: expected {shape} uint8 elements, got shape {a.shape}")
            check_aligned(name, a)
    for name, a in (("amax", amax), ("scale", scale)):
        check(name, a, dtype=F32)
        if a.size != batch:
            raise ValueError(f"{name}: expected {batch} float32 value(s) (one per matrix), got "
                             f"shape {a.shape}")
    return dt, R, C


def _launch(name, dt, R, C, batch, args):
    kernels.function("fp8", name, dt)((ceil_div(C, TILE), ceil_div(R, TILE), batch), (THREADS,),
                                      args)


def cast_transpose(out, out_t, amax, inp, scale, *, fmt: str = "e4m3", batch: int = 1):
    """out = fp8(inp * scale), out_t its transpose per matrix, amax max-accumulated; see module."""
    e5m2 = _format(fmt)
    dt, R, C = _check_cast(inp, out, out_t, amax, scale, batch)
    _launch("fp8_cast_transpose", dt, R, C, batch,
            (out if out is not None else NULL, out_t if out_t is not None else NULL, amax, inp,
             scale, np.int32(R), np.int32(C), np.int32(e5m2)))


def gelu_cast_transpose(out, out_t, amax, inp, scale, *, out_x=None, fmt: str = "e4m3"):
    """y = gelu(inp) (floatX-rounded; stored in out_x when given); out = fp8(y * scale), out_t
    its transpose, amax = max(amax, max |y|)."""
    e5m2 = _format(fmt)
    dt, R, C = _check_cast(inp, out, out_t, amax, scale, 1)
    if out_x is not None:
        check("out_x", out_x, dtype=inp.dtype)
        if out_x.shape != inp.shape:
            raise ValueError(f"out_x: expected shape {inp.shape} (that of inp), got {out_x.shape}")
        check_aligned("out_x", out_x)
    _launch("fp8_gelu_cast_transpose", dt, R, C, 1,
            (out_x if out_x is not None else NULL, out if out is not None else NULL,
             out_t if out_t is not None else NULL, amax, inp, scale, np.int32(R), np.int32(C),
             np.int32(e5m2)))


def scale_update(scale, scale_inv, history, amax, fmax, pos, margin: int = 0, *,
                 advance: bool = True):
    """One delayed-scaling step for S slots (kernels/fp8.cu): history (S, H), scale, amax and
    fmax (S,), scale_inv (S, INV_STRIDE) (one 16-byte row per slot: cuBLASLt wants 16-byte
    aligned scale pointers; column 0 is the value), pos int32 (1,) on the device: the history
    column written, moved on to (pos + 1) % H when advance (all of it on the device, so a
    captured step replays it right)."""
    check("history", history, (None, None), F32)
    S, H = history.shape
    for name, a in (("scale", scale), ("amax", amax), ("fmax", fmax)):
        check(name, a, (S,), F32)
    check("scale_inv", scale_inv, (S, INV_STRIDE), F32)
    check("pos", pos, (1,), np.int32)
    if S == 0:
        return
    kernels.function("fp8", "fp8_scale_update", "bf16")(
        (1,), (UPDATE_BLOCK,),
        (scale, scale_inv, history, amax, fmax, pos, np.int32(S), np.int32(H),
         np.int32(INV_STRIDE), np.float32(2.0 ** -int(margin)), np.int32(1 if advance else 0)))


def fp8_matmul(out, a, a_format, a_scale_inv, b, b_format, b_scale_inv, *, beta: float = 0.0,
               epilogue: str = "default", bias=None, aux=None, fast_accum: bool = False):
    """out (M, N) bf16 = a_scale_inv * b_scale_inv * a (M, K) @ b (N, K).T (+ beta out), with
    cuBLASLt's bias or DGELU epilogue; fp32 accumulation. Arguments: llmc.cuda.cublaslt_fp8."""
    return cublaslt_fp8.matmul_fp8(out, a, a_format, a_scale_inv, b, b_format, b_scale_inv,
                               beta=beta, epilogue=epilogue, bias=bias, aux=aux,
                               fast_accum=fast_accum)


# ---------------------------------------------------------------------------------------------
# functional form


def quantize(x, scale, fmt: str = "e4m3", *, transpose: bool = False):
    """(bits, amax): new uint8 fp8 bits of x (R, C) * scale (a one-element float32 device array)
    and max |x| as a (1,) float32 array; with transpose, bits of x.T (C, R) instead."""
    check("x", x, (None, None))
    R, C = x.shape
    amax = zeros((1,), F32)
    bits = empty((C, R) if transpose else (R, C), U8)
    cast_transpose(None if transpose else bits, bits if transpose else None, amax, x, scale,
                   fmt=fmt)
    return bits, amax
