"""fp8 products through cuBLASLt (Hopper / Ada, compute capability 8.9+), on the plans and the
launch of llmc/cuda/cublaslt.py (its row-major convention, tuning and CUDA-graph safety).

    matmul_fp8(c, a, a_format, a_scale_inv, b, b_format, b_scale_inv, *, beta=0.0,
               epilogue="default", bias=None, aux=None, fast_accum=False)
    c (M, N) bf16 = a_scale_inv * b_scale_inv * (a (M, K) @ b (N, K).T) (+ beta * c), epilogue

a and b are uint8 arrays holding fp8 bits ("e4m3" or "e5m2"; not both e5m2), both K-contiguous:
cuBLASLt's fp8 kernels take only the "TN" layout, which in our row-major convention is
a @ b.T with both operands stored row by row. Row strides must be multiples of 16 bytes. The
scales are device pointers to one fp32 each (the decode scales, 1/scale of the cast), 16-byte
aligned (cuBLASLt refuses others at run time, status 15), so no host sync and nothing for a CUDA
graph to miss; they are set on the plan's descriptor per call when they changed. Accumulation
is fp32; fast_accum=True lets the kernel skip the periodic promotion of its partial sums
(faster, less accurate: Transformer Engine uses it in the forward products only). Bias (bf16,
added to the fp32 accumulator) and DGELU epilogues as cublaslt.matmul's.
"""
from __future__ import annotations

import ctypes

import numpy as np

from llmc.cuda import cublaslt as lt
from llmc.cuda.cublas import (BF16, CUBLAS_COMPUTE_32F, CUBLAS_OP_N, CUBLAS_OP_T, CUDA_R_32F,
                              row_stride)

CUDA_R_8F_E4M3, CUDA_R_8F_E5M2 = 28, 29  # library_types.h
FP8_TYPES = {"e4m3": CUDA_R_8F_E4M3, "e5m2": CUDA_R_8F_E5M2}


def _check_fp8_operand(name: str, x, dev: int) -> int:
    """A uint8 (rows, K) matrix of fp8 bits, K contiguous, row stride a multiple of 16 bytes;
    returns the row stride."""
    import cupy
    if not isinstance(x, cupy.ndarray) or x.dtype != np.uint8 or x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D uint8 cupy.ndarray of fp8 bits, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if x.device.id != dev:
        raise ValueError(f"{name}: expected an array on the current device {dev}, got device "
                         f"{x.device.id}")
    ld = row_stride(name, x, *x.shape)
    if ld % 16 != 0 or x.data.ptr % 16 != 0:
        raise ValueError(f"{name}: fp8 operands need 16-byte aligned rows (row stride and address "
                         f"multiples of 16 bytes), got row stride {ld} at {x.data.ptr:#x}")
    return ld


def _check_scale(name: str, x, dev: int):
    import cupy
    if (not isinstance(x, cupy.ndarray) or x.dtype != np.float32 or x.size != 1
            or x.device.id != dev):
        raise ValueError(f"{name}: expected a one-element float32 cupy.ndarray on device {dev} "
                         f"(the decode scale), got {getattr(x, 'dtype', type(x).__name__)} "
                         f"{getattr(x, 'shape', '')}")
    if x.data.ptr % 16 != 0:
        raise ValueError(f"{name}: cuBLASLt needs a 16-byte aligned scale pointer (it refuses "
                         f"others at run time, status 15), got {x.data.ptr:#x}: keep each scale "
                         "in its own 16-byte row (llmc.ops.fp8.INV_STRIDE)")


def matmul_fp8(c, a, a_format: str, a_scale_inv, b, b_format: str, b_scale_inv, *,
               beta: float = 0.0, epilogue: str = "default", bias=None, aux=None,
               fast_accum: bool = False):
    """c (M, N) bf16 = a_scale_inv * b_scale_inv * a (M, K) @ b (N, K).T (+ beta c), epilogue
    "default", "bias" (bias (N,) bf16) or "dgelu" (aux (M, N) bf16, beta 0); returns c.

    a, b: uint8 fp8 bits in a_format / b_format ("e4m3" | "e5m2", not both "e5m2");
    a_scale_inv, b_scale_inv: one-element float32 device arrays.
    """
    import cupy
    for name, fmt in (("a_format", a_format), ("b_format", b_format)):
        if fmt not in FP8_TYPES:
            raise ValueError(f"{name}: expected one of {tuple(FP8_TYPES)}, got {fmt!r}")
    if a_format == "e5m2" and b_format == "e5m2":
        raise ValueError("b_format: cuBLASLt has no e5m2 x e5m2 product; cast one operand "
                         "(the weights or activations) to e4m3")
    if epilogue not in ("default", "bias", "dgelu"):
        raise ValueError(f"epilogue: expected 'default', 'bias' or 'dgelu' for fp8, got "
                         f"{epilogue!r}")
    dev = cupy.cuda.Device().id
    lt._check_matrix("c", c, BF16, dev)
    lda = _check_fp8_operand("a", a, dev)
    ldb = _check_fp8_operand("b", b, dev)
    _check_scale("a_scale_inv", a_scale_inv, dev)
    _check_scale("b_scale_inv", b_scale_inv, dev)
    (M, K), (N, Kb) = a.shape, b.shape
    if Kb != K or K < 1:
        raise ValueError(f"b: expected shape (N, {K}) (K = a.shape[1] >= 1), got {b.shape}")
    if c.shape != (M, N):
        raise ValueError(f"c: expected shape {(M, N)} (rows of a, rows of b), got {c.shape}")
    ldc = row_stride("c", c, M, N)
    ptrs = {"a_scale": a_scale_inv.data.ptr, "b_scale": b_scale_inv.data.ptr}
    ldaux = lt.epilogue_args(ptrs, epilogue, bias, aux, c, beta, dev)
    if c.size == 0:
        return c
    aligns = (lt._alignment(b.data.ptr), lt._alignment(a.data.ptr), lt._alignment(c.data.ptr),
              lt._alignment(c.data.ptr))
    key = (dev, "fp8", a_format, b_format, M, N, K, lda, ldb, ldc, epilogue, ldaux,
           bool(fast_accum), aligns)
    lt.run_plan(key, _make_fp8_plan, c, a, b, beta, ptrs)
    return c


def _make_fp8_plan(state: lt._Device, key: tuple, ptrs: dict) -> lt._Plan:
    _, _, a_format, b_format, M, N, K, lda, ldb, ldc, epilogue, ldaux, fast_accum, aligns = key
    lib = lt._lib()
    desc = ctypes.c_void_p()
    lt._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
              "cublasLtMatmulDescCreate")
    setd = lib.cublasLtMatmulDescSetAttribute
    # cuBLASLt's A is our b (N, K) row-major = column-major (K, N), used transposed: "TN"
    lt._set(setd, desc, lt.DESC_TRANSA, ctypes.c_int32(CUBLAS_OP_T))
    lt._set(setd, desc, lt.DESC_TRANSB, ctypes.c_int32(CUBLAS_OP_N))
    lt._set(setd, desc, lt.DESC_EPILOGUE, ctypes.c_uint32(lt.EPILOGUES[epilogue]))
    lt._set(setd, desc, lt.DESC_FAST_ACCUM, ctypes.c_int8(1 if fast_accum else 0))
    plan = lt._Plan(desc, lt._layout(FP8_TYPES[b_format], N, K, ldb),
                    lt._layout(FP8_TYPES[a_format], M, K, lda), lt._layout(BF16, M, N, ldc),
                    lt._Algo(), 0, ctypes.c_void_p(), ctypes.c_void_p())
    plan.a_scale_ptr.value = ptrs["b_scale"]
    lt._set(setd, desc, lt.DESC_A_SCALE_POINTER, plan.a_scale_ptr)
    plan.b_scale_ptr.value = ptrs["a_scale"]
    lt._set(setd, desc, lt.DESC_B_SCALE_POINTER, plan.b_scale_ptr)
    lt.set_vectors(plan, ptrs, ldaux)
    lt._pick_algorithm(state, plan, aligns,
                       f"fp8 {a_format} x {b_format} -> bf16, epilogue {epilogue!r}, (M, N, K) = "
                       f"{(M, N, K)}, fast_accum={fast_accum}")
    return plan
