"""cuBLAS matrix products on row-major CuPy arrays: gemmEx and gemmStridedBatchedEx.

    c = alpha * op(a) @ op(b) + beta * c      op(a) (M, K), op(b) (K, N), c (M, N)

op(x) is x, or x.T when trans_x is set (then x is stored (K, M) / (N, K)). The arrays are all
bf16 (`ml_dtypes.bfloat16`) or all float32; accumulation is fp32 (CUBLAS_COMPUTE_32F) in both.
The fp32 product never uses TF32: if the handle was put in TF32 math mode (e.g. CUPY_TF32=1),
it is switched to the default math for the call and restored, so fp32 results match a float64
reference to ~1e-6.

Row-major trick: cuBLAS is column-major, and a row-major (R, C) array with row stride ld is the
column-major (C, R) matrix with leading dimension ld. So c = op(a) @ op(b) is computed as the
column-major product c^T = op(b)^T @ op(a)^T: cuBLAS's "A" is our b, its "B" is our a, m = N,
n = M, and each operand's transpose flag carries over unchanged.

Supported layouts (anything else is a ValueError naming the argument):
- Each matrix's last dimension is contiguous (element stride 1); its row stride may be larger
  than its width, so a column slice of a wider array works (e.g. q = qkv[:, :C] of (N, 3C)).
- Batched: a, b, c with leading batch dimensions (any number). c's batch shape is the batch;
  a and b either have the same batch shape or are 2-D (broadcast: stride 0). Batch strides are
  arbitrary; when all operands' batch dimensions collapse to one uniform stride it is a single
  gemmStridedBatchedEx, otherwise one call per index of the outer batch dimensions (e.g. heads
  of a (B, T, 3, NH, HS) view: (B, NH, T, HS) with strides that do not merge -> B calls).
- c must not be a broadcast view (its batch strides must be non-zero) nor overlap itself.

Runs on CuPy's current stream with CuPy's cuBLAS handle for the current device. cuBLAS calls
through CuPy cannot be captured in a CUDA graph (CuPy refuses to set a capturing stream).
"""
from __future__ import annotations

import functools
import math

import numpy as np

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    BF16 = None
F32 = np.dtype(np.float32)

CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_DEFAULT_MATH = 0
CUBLAS_TF32_TENSOR_OP_MATH = 3
_CUDA_TYPES = {F32: CUDA_R_32F, BF16: CUDA_R_16BF}


@functools.lru_cache(maxsize=1)
def _lib():
    """cupy_backends' cuBLAS binding (imported on first use: it needs libcublas)."""
    from cupy_backends.cuda.libs import cublas
    return cublas


def matmul_flops(M: int, N: int, K: int, batch: int = 1) -> int:
    """Floating-point operations of a (M,K) @ (K,N) product: 2*M*N*K per batch entry."""
    return 2 * M * N * K * batch


def row_stride(name: str, x, rows: int, cols: int) -> int:
    """Row stride (elements) of x's last two dims viewed as a (rows, cols) row-major matrix."""
    item = x.itemsize
    s_row, s_col = x.strides[-2], x.strides[-1]
    if s_col != item and cols > 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride {item} bytes), "
                         f"got strides {x.strides}")
    if rows == 1:
        return max(cols, 1)
    if s_row % item != 0 or s_row // item < cols:
        raise ValueError(f"{name}: row stride must be a whole number of elements >= the row "
                         f"width {cols}, got strides {x.strides} for shape {x.shape}")
    return s_row // item


def product_dims(c, a, b, trans_a: bool, trans_b: bool) -> tuple:
    """(M, N, K) of c (.., M, N) = op(a) (.., M, K) @ op(b) (.., K, N) over the last two
    dimensions; a ValueError naming a or b when their shapes do not make c."""
    M, N = c.shape[-2:]
    Ma, Ka = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
    Kb, Nb = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
    if Ma != M:
        raise ValueError(f"a: op(a) must have {M} rows (c is {c.shape}), got shape {a.shape} "
                         f"with trans_a={trans_a}")
    if Nb != N:
        raise ValueError(f"b: op(b) must have {N} columns (c is {c.shape}), got shape {b.shape} "
                         f"with trans_b={trans_b}")
    if Ka != Kb:
        raise ValueError(f"b: inner dimensions differ: op(a) is ({M}, {Ka}), op(b) is "
                         f"({Kb}, {N}) (a {a.shape} trans_a={trans_a}, b {b.shape} "
                         f"trans_b={trans_b})")
    return M, N, Ka


def _batch_strides(name: str, x, batch_shape: tuple) -> tuple:
    """Element strides of x's batch dims for `batch_shape` (zeros where x is 2-D: broadcast)."""
    if x.ndim == 2:
        return (0,) * len(batch_shape)
    if tuple(x.shape[:-2]) != batch_shape:
        raise ValueError(f"{name}: batch shape must be {batch_shape} (that of c) or absent, "
                         f"got shape {x.shape}")
    strides = []
    for s, n in zip(x.strides[:-2], batch_shape):
        if s % x.itemsize != 0:
            raise ValueError(f"{name}: batch strides must be whole elements, got {x.strides}")
        strides.append(s // x.itemsize if n > 1 else 0)
    return tuple(strides)


def _merge_batch(batch_shape: tuple, strides: list) -> tuple:
    """Collapse adjacent batch dims whose strides nest, for every operand at once.

    Returns (shape, per-operand strides) with as few dims as possible; size-1 dims dropped.
    """
    dims = [(n, tuple(s[i] for s in strides)) for i, n in enumerate(batch_shape) if n != 1]
    merged = []
    for n, st in dims:
        if merged:
            pn, pst = merged[-1]
            if all(p == q * n for p, q in zip(pst, st)):
                merged[-1] = (pn * n, st)
                continue
        merged.append((n, st))
    if not merged:
        merged = [(1, tuple(0 for _ in strides))]
    shape = tuple(n for n, _ in merged)
    per_op = [tuple(st[j] for _, st in merged) for j in range(len(strides))]
    return shape, per_op


def gemm(c, a, b, *, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0,
         beta: float = 0.0):
    """c (..., M, N) = alpha * op(a) @ op(b) + beta * c; all bf16 or all fp32, fp32 accumulate.

    a: (..., M, K), or (..., K, M) with trans_a; b: (..., K, N), or (..., N, K) with trans_b.
    Leading batch dims of a and b equal c's, or a/b 2-D (shared by every batch entry).
    Returns c.
    """
    import cupy
    for name, x in (("c", c), ("a", a), ("b", b)):
        if not isinstance(x, cupy.ndarray):
            raise ValueError(f"{name}: expected a cupy.ndarray, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"{name}: expected a matrix (ndim >= 2), got shape {x.shape}")
    if c.dtype not in _CUDA_TYPES:
        raise ValueError(f"c: dtype must be bfloat16 or float32, got {c.dtype}")
    for name, x in (("a", a), ("b", b)):
        if x.dtype != c.dtype:
            raise ValueError(f"{name}: dtype must match c ({c.dtype}), got {x.dtype}")
    dev = cupy.cuda.Device().id
    for name, x in (("c", c), ("a", a), ("b", b)):
        if x.device.id != dev:
            raise ValueError(f"{name}: expected an array on the current device {dev}, "
                             f"got device {x.device.id}")

    M, N, K = product_dims(c, a, b, trans_a, trans_b)
    batch_shape = tuple(c.shape[:-2])

    ldc = row_stride("c", c, M, N)
    lda = row_stride("a", a, a.shape[-2], a.shape[-1])
    ldb = row_stride("b", b, b.shape[-2], b.shape[-1])
    sc = _batch_strides("c", c, batch_shape)
    sa = _batch_strides("a", a, batch_shape)
    sb = _batch_strides("b", b, batch_shape)
    if any(s == 0 and n > 1 for s, n in zip(sc, batch_shape)) or any(s < 0 for s in sc):
        raise ValueError(f"c: batch strides must be positive (no broadcast output), "
                         f"got {c.strides}")
    if any(s < 0 for s in sa + sb):
        raise ValueError("a/b: negative strides are not supported")
    if c.size == 0:
        return c

    lib = _lib()
    handle = cupy.cuda.device.get_cublas_handle()
    lib.setStream(handle, cupy.cuda.get_current_stream().ptr)
    ctype = _CUDA_TYPES[c.dtype]
    # Host scalars: cuBLAS reads them before the call returns (host pointer mode).
    alpha_h = np.array(alpha, dtype=np.float32)
    beta_h = np.array(beta, dtype=np.float32)
    op_a = CUBLAS_OP_T if trans_a else CUBLAS_OP_N
    op_b = CUBLAS_OP_T if trans_b else CUBLAS_OP_N
    item = c.itemsize

    restore_mode = None
    if c.dtype == F32:
        mode = lib.getMathMode(handle)
        if mode & 0xF == CUBLAS_TF32_TENSOR_OP_MATH:
            restore_mode = mode
            lib.setMathMode(handle, (mode & ~0xF) | CUBLAS_DEFAULT_MATH)
    try:
        if not batch_shape:
            lib.gemmEx(handle, op_b, op_a, N, M, K, alpha_h.ctypes.data,
                       b.data.ptr, ctype, ldb, a.data.ptr, ctype, lda,
                       beta_h.ctypes.data, c.data.ptr, ctype, ldc,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
            return c
        shape, (mc, ma, mb) = _merge_batch(batch_shape, [sc, sa, sb])
        outer = shape[:-1]
        count = shape[-1]
        for idx in np.ndindex(*outer) if outer else [()]:
            oc = sum(i * s for i, s in zip(idx, mc[:-1]))
            oa = sum(i * s for i, s in zip(idx, ma[:-1]))
            ob = sum(i * s for i, s in zip(idx, mb[:-1]))
            lib.gemmStridedBatchedEx(
                handle, op_b, op_a, N, M, K, alpha_h.ctypes.data,
                b.data.ptr + ob * item, ctype, ldb, mb[-1],
                a.data.ptr + oa * item, ctype, lda, ma[-1],
                beta_h.ctypes.data,
                c.data.ptr + oc * item, ctype, ldc, mc[-1],
                count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    finally:
        if restore_mode is not None:
            lib.setMathMode(handle, restore_mode)
    return c


def gemm_shape_flops(c, a, b, *, trans_a=False, trans_b=False) -> int:
    """matmul_flops for the product gemm(c, a, b, ...) would compute."""
    K = a.shape[-2] if trans_a else a.shape[-1]
    M, N = c.shape[-2:]
    return matmul_flops(M, N, K, math.prod(c.shape[:-2]))
