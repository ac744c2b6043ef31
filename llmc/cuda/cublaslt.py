"""cuBLASLt matrix products with fused epilogues on row-major CuPy arrays, through ctypes.

    matmul(c, a, b, *, trans_a=False, trans_b=False, beta=0.0, epilogue="default", bias=None,
           aux=None)
    c (M, N) = op(a) (M, K) @ op(b) (K, N) (+ beta * c), then the epilogue:
        "default"  nothing more
        "bias"     c += bias[None, :]                 bias (N,), c's dtype
        "gelu_bias" c = gelu(product + bias[None, :])  tanh GELU of the fp32 accumulator
        "gelu_aux_bias" the same, and aux = product + bias (the GELU's input, c's dtype), beta = 0
        "dgelu"    c = product * gelu'(aux)           aux (M, N) like c, beta = 0

op(x) is x, or x.T when trans_x is set. All of a, b, c (and aux, bias) are bf16
(`ml_dtypes.bfloat16`) or all float32; accumulation is fp32 (CUBLAS_COMPUTE_32F, which never
uses TF32). The bias is added to the fp32 accumulator, one rounding of c. cuBLASLt's GELU is the
tanh approximation of llmc.model.reference (tests/test_matmul.py: its gelu' on exact inputs over
[-8, 8] is within 2e-5 of the reference in fp32 and 9e-4 from the erf GELU's).

Row-major convention, as llmc/cuda/cublas.py: a row-major (R, C) array with row stride ld is the
column-major (C, R) matrix with leading dimension ld, so c = op(a) @ op(b) is computed as the
column-major c^T = op(b)^T @ op(a)^T: cuBLASLt's A is our b, its B is our a, m = N, n = M. Its
bias runs along the rows of its D, our columns; its aux matrix is laid out like D.

Per device: one cuBLASLt handle and one WORKSPACE_BYTES workspace, made on first use. Per
problem (device, dtype, shapes, strides, transposes, epilogue, pointer alignments) a plan is
made once: the operation descriptor, the matrix layouts and the heuristic's algorithms. A
call then costs a dict lookup, setting the bias/aux pointer on the plan's descriptor when it
changed, and cublasLtMatmul on CuPy's current stream: no device allocation, a few host calls.

Tuning (on unless LLMC_MATMUL_TUNE=0): the heuristic's first answer is often not its fastest
(measured on an H200 at d12's products: 2-18% slower, 6% of the step's matmul time). A plan's
first call times up to TUNE_CANDIDATES of its algorithms on the call's own operands (beta != 0
products write a scratch copy of c, so the result is untouched) and keeps the fastest; the
choice (its rank in the heuristic's list, which is deterministic) is saved in
$LLMC_CACHE_DIR/cublaslt_algos.json (default ~/.cache/llmc), per device name and cuBLASLt
version, first writer wins. Later processes read it instead of timing, so a resumed run picks
the algorithms the interrupted one used (the same bits). Nothing is timed while a stream is
being captured (the heuristic's first algorithm then).
The workspace is shared by every call on the device, so products must not run on two streams at
once (llmc runs them all on the compute stream).

Supported layouts: 2-D arrays whose last dimension is contiguous (row strides may exceed the
width), a contiguous bias vector, aux shaped like c with a row stride that is a multiple of 8.
Anything else is a ValueError naming the argument.

fp8 (Hopper / Ada, compute capability 8.9+):

    matmul_fp8(c, a, a_format, a_scale_inv, b, b_format, b_scale_inv, *, beta=0.0,
               epilogue="default", bias=None, aux=None, fast_accum=False)
    c (M, N) bf16 = a_scale_inv * b_scale_inv * (a (M, K) @ b (N, K).T) (+ beta * c), epilogue

a and b are uint8 arrays holding fp8 bits ("e4m3" or "e5m2"; not both e5m2), both K-contiguous:
cuBLASLt's fp8 kernels take only the "TN" layout, which in our row-major convention is
a @ b.T with both operands stored row by row. Row strides must be multiples of 16 bytes. The
scales are device pointers to one fp32 each (the decode scales, 1/scale of the cast), so no
host sync and nothing for a CUDA graph to miss; they are set on the plan's descriptor per call
when they changed. Accumulation is fp32; fast_accum=True lets the kernel skip the periodic
promotion of its partial sums (faster, less accurate: Transformer Engine uses it in the forward
products only). Bias (bf16, added to the fp32 accumulator) and DGELU epilogues as matmul's.

The library is the libcublasLt that CuPy's cuBLAS loaded (found among the process's mapped
objects), else cuda.pathfinder's, else libcublasLt.so.<CuPy's CUDA major> / .13 / .12. The enum
values and struct layouts below are cublasLt.h's, the same in CUDA 12.9 and 13.x.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass, field

import numpy as np

from llmc.cuda.cublas import (BF16, CUBLAS_COMPUTE_32F, CUBLAS_OP_N, CUBLAS_OP_T, CUDA_R_16BF,
                         CUDA_R_32F, F32, product_dims, row_stride)

WORKSPACE_BYTES = 32 << 20

DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
DESC_EPILOGUE_AUX_POINTER, DESC_EPILOGUE_AUX_LD = 11, 12
DESC_A_SCALE_POINTER, DESC_B_SCALE_POINTER, DESC_FAST_ACCUM = 17, 18, 25
CUDA_R_8F_E4M3, CUDA_R_8F_E5M2 = 28, 29  # library_types.h
FP8_TYPES = {"e4m3": CUDA_R_8F_E4M3, "e5m2": CUDA_R_8F_E5M2}
PREF_MAX_WORKSPACE_BYTES = 1
PREF_MIN_ALIGNMENT = {"a": 5, "b": 6, "c": 7, "d": 8}  # cuBLASLt's A, B, C, D
EPILOGUES = {"default": 1, "bias": 4, "gelu_bias": 32 | 4, "gelu_aux_bias": 32 | 128 | 4,
             "dgelu": 64 | 128}
_CUDA_TYPES = {F32: CUDA_R_32F, BF16: CUDA_R_16BF}


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_P, _I, _VP = ctypes.POINTER, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "cublasLtCreate": (_I, [_P(_VP)]),
    "cublasLtGetVersion": (ctypes.c_size_t, []),
    "cublasLtGetStatusString": (ctypes.c_char_p, [_I]),
    "cublasLtMatmulDescCreate": (_I, [_P(_VP), _I, _I]),
    "cublasLtMatmulDescSetAttribute": (_I, [_VP, _I, _VP, ctypes.c_size_t]),
    "cublasLtMatrixLayoutCreate": (_I, [_P(_VP), _I, ctypes.c_uint64, ctypes.c_uint64,
                                        ctypes.c_int64]),
    "cublasLtMatmulPreferenceCreate": (_I, [_P(_VP)]),
    "cublasLtMatmulPreferenceSetAttribute": (_I, [_VP, _I, _VP, ctypes.c_size_t]),
    "cublasLtMatmulPreferenceDestroy": (_I, [_VP]),
    "cublasLtMatmulAlgoGetHeuristic": (_I, [_VP] * 7 + [_I, _P(_Heuristic), _P(_I)]),
    "cublasLtMatmul": (_I, [_VP] * 12 + [_P(_Algo), _VP, ctypes.c_size_t, _VP]),
}


def _candidates() -> list:
    """Paths or sonames of libcublasLt, best first (see the module docstring)."""
    import cupy
    from cupy_backends.cuda.libs import cublas  # noqa: F401  (loads libcublas and its Lt)
    cupy.cuda.device.get_cublas_handle()
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcublasLt.so" in path and path not in found:
                    found.append(path)
    except OSError:
        pass
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        path = load_nvidia_dynamic_lib("cublasLt").abs_path
        if path:
            found.append(path)
    except Exception:  # noqa: BLE001 - any failure here just moves on to the next candidate
        pass
    major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    found += [ctypes.util.find_library("cublasLt"), f"libcublasLt.so.{major}",
              "libcublasLt.so.13", "libcublasLt.so.12"]
    return [p for p in found if p]


@functools.lru_cache(maxsize=1)
def _lib():
    """The ctypes library with argument and result types declared."""
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        return lib
    raise RuntimeError("libcublasLt not found; install the cuBLAS of CuPy's CUDA "
                       "(nvidia-cublas / nvidia-cublas-cu12); tried: " + "; ".join(errors))


def version() -> int:
    """cublasLtGetVersion(): major * 10000 + minor * 100 + patch."""
    return int(_lib().cublasLtGetVersion())


def _check(status: int, what: str):
    if status != 0:
        text = _lib().cublasLtGetStatusString(status)
        raise RuntimeError(f"cuBLASLt {what} failed: status {status} "
                           f"({text.decode() if text else '?'})")


def _set(setter, obj, attr: int, value):
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"set attribute {attr}")


# ---------------------------------------------------------------------------------------------
# per-device state and per-problem plans

@dataclass
class _Device:
    handle: ctypes.c_void_p
    workspace: object  # cupy uint8 array, kept alive here
    plans: dict


TUNE_CANDIDATES = 8
TUNE_REPS = 3
_tuned_cache: dict = {}  # "device|version" -> {plan key text: rank}, loaded once per process


@dataclass
class _Plan:
    desc: ctypes.c_void_p
    layout_a: ctypes.c_void_p  # cuBLASLt's A: our b
    layout_b: ctypes.c_void_p  # cuBLASLt's B: our a
    layout_c: ctypes.c_void_p
    algo: _Algo
    workspace: int
    bias_ptr: ctypes.c_void_p  # set per call when the epilogue takes a vector
    aux_ptr: ctypes.c_void_p
    a_scale_ptr: ctypes.c_void_p = field(default_factory=ctypes.c_void_p)  # fp8: cuBLASLt's A
    b_scale_ptr: ctypes.c_void_p = field(default_factory=ctypes.c_void_p)  # fp8: cuBLASLt's B
    candidates: list = field(default_factory=list)  # [(algo, workspace)], the heuristic's order
    key_text: str = ""   # the problem, as the tuning cache names it
    tuned: bool = False


_devices: dict = {}
_SCALARS = {}  # float -> ctypes.c_float kept alive (host pointer mode reads them in the call)


def _device(dev: int) -> _Device:
    state = _devices.get(dev)
    if state is None:
        import cupy
        lib = _lib()
        handle = ctypes.c_void_p()
        _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        state = _Device(handle, cupy.empty(WORKSPACE_BYTES, dtype=np.uint8), {})
        _devices[dev] = state
    return state


def _alignment(ptr: int) -> int:
    """Largest power of two <= 256 dividing the address (cuBLASLt's alignment preference)."""
    return 256 if ptr % 256 == 0 else ptr & -ptr


def _layout(dtype, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    """Column-major layout of a row-major (rows, cols) matrix with row stride ld; dtype is a
    NumPy dtype of _CUDA_TYPES or a cudaDataType_t number (the fp8 types)."""
    out = ctypes.c_void_p()
    cuda_type = dtype if isinstance(dtype, int) else _CUDA_TYPES[dtype]
    _check(_lib().cublasLtMatrixLayoutCreate(ctypes.byref(out), cuda_type, cols, rows, ld),
           "cublasLtMatrixLayoutCreate")
    return out


def _pick_algorithm(state: _Device, plan: _Plan, aligns: tuple, what: str) -> None:
    """The heuristic's best algorithm for the plan's descriptor and layouts (C and D alike)."""
    lib = _lib()
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference create")
    try:
        setp = lib.cublasLtMatmulPreferenceSetAttribute
        _set(setp, pref, PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(WORKSPACE_BYTES))
        for name, align in zip(("a", "b", "c", "d"), aligns):
            _set(setp, pref, PREF_MIN_ALIGNMENT[name], ctypes.c_uint32(align))
        results, count = (_Heuristic * TUNE_CANDIDATES)(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(
            state.handle, plan.desc, plan.layout_a, plan.layout_b, plan.layout_c, plan.layout_c,
            pref, TUNE_CANDIDATES, results, ctypes.byref(count))
    finally:
        lib.cublasLtMatmulPreferenceDestroy(pref)
    if status == 0:
        plan.candidates = [(results[i].algo, int(results[i].workspaceSize))
                           for i in range(count.value) if results[i].state == 0
                           and results[i].workspaceSize <= WORKSPACE_BYTES]
    if not plan.candidates:
        raise RuntimeError(f"cuBLASLt has no algorithm for {what} (heuristic status {status}, "
                           f"{count.value} results)")
    plan.algo, plan.workspace = plan.candidates[0]


def _make_plan(state: _Device, key: tuple, ptrs: dict) -> _Plan:
    _, dtype, M, N, K, trans_a, trans_b, lda, ldb, ldc, epilogue, ldaux, aligns = key
    lib = _lib()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
           "cublasLtMatmulDescCreate")
    setd = lib.cublasLtMatmulDescSetAttribute
    _set(setd, desc, DESC_TRANSA, ctypes.c_int32(CUBLAS_OP_T if trans_b else CUBLAS_OP_N))
    _set(setd, desc, DESC_TRANSB, ctypes.c_int32(CUBLAS_OP_T if trans_a else CUBLAS_OP_N))
    _set(setd, desc, DESC_EPILOGUE, ctypes.c_uint32(EPILOGUES[epilogue]))
    plan = _Plan(desc,
                 _layout(dtype, *((N, K) if trans_b else (K, N)), ldb),
                 _layout(dtype, *((K, M) if trans_a else (M, K)), lda),
                 _layout(dtype, M, N, ldc), _Algo(), 0, ctypes.c_void_p(), ctypes.c_void_p())
    if "bias" in ptrs:
        plan.bias_ptr.value = ptrs["bias"]
        _set(setd, desc, DESC_BIAS_POINTER, plan.bias_ptr)
    if ldaux is not None:
        _set(setd, desc, DESC_EPILOGUE_AUX_LD, ctypes.c_int64(ldaux))
        plan.aux_ptr.value = ptrs["aux"]
        _set(setd, desc, DESC_EPILOGUE_AUX_POINTER, plan.aux_ptr)
    _pick_algorithm(state, plan, aligns, f"epilogue {epilogue!r}, dtype {dtype}, (M, N, K) = "
                    f"{(M, N, K)}, trans_a={trans_a}, trans_b={trans_b}")
    return plan


# ---------------------------------------------------------------------------------------------

def _check_matrix(name: str, x, dtype, dev: int):
    import cupy
    if not isinstance(x, cupy.ndarray):
        raise ValueError(f"{name}: expected a cupy.ndarray, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {x.shape}")
    if x.dtype != dtype:
        raise ValueError(f"{name}: dtype must be {dtype} (that of c), got {x.dtype}")
    if x.device.id != dev:
        raise ValueError(f"{name}: expected an array on the current device {dev}, "
                         f"got device {x.device.id}")


def matmul(c, a, b, *, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0,
           epilogue: str = "default", bias=None, aux=None):
    """c (M, N) = op(a) @ op(b) (+ beta c) with a fused epilogue (module docstring); returns c.

    a: (M, K), or (K, M) with trans_a; b: (K, N), or (N, K) with trans_b; all bf16 or all fp32.
    """
    import cupy
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: expected one of {tuple(EPILOGUES)}, got {epilogue!r}")
    if not isinstance(c, cupy.ndarray) or c.dtype not in _CUDA_TYPES:
        raise ValueError(f"c: expected a bfloat16 or float32 cupy.ndarray, got "
                         f"{getattr(c, 'dtype', type(c).__name__)}")
    dev = cupy.cuda.Device().id
    for name, x in (("c", c), ("a", a), ("b", b)):
        _check_matrix(name, x, c.dtype, dev)
    M, N, Ka = product_dims(c, a, b, trans_a, trans_b)
    if Ka < 1:
        raise ValueError(f"a: the inner dimension K must be >= 1, got shape {a.shape}")
    ldc = row_stride("c", c, M, N)
    lda = row_stride("a", a, *a.shape)
    ldb = row_stride("b", b, *b.shape)

    ptrs = {}
    ldaux = None
    if epilogue in ("bias", "gelu_bias", "gelu_aux_bias"):
        if not isinstance(bias, cupy.ndarray) or bias.shape != (N,):
            raise ValueError(f"bias: epilogue {epilogue!r} needs a ({N},) cupy.ndarray, got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        if bias.dtype != c.dtype or not bias.flags.c_contiguous or bias.device.id != dev:
            raise ValueError(f"bias: expected a contiguous {c.dtype} vector on device {dev}, "
                             f"got {bias.dtype} strides {bias.strides} on device "
                             f"{bias.device.id}")
        ptrs["bias"] = bias.data.ptr
    elif bias is not None:
        raise ValueError(f"bias: epilogue {epilogue!r} takes no bias")
    if epilogue in ("dgelu", "gelu_aux_bias"):
        _check_matrix("aux", aux, c.dtype, dev)
        if aux.shape != c.shape:
            raise ValueError(f"aux: expected shape {c.shape} (that of c), got {aux.shape}")
        ldaux = row_stride("aux", aux, M, N)
        if ldaux % 8 != 0:
            raise ValueError(f"aux: the row stride must be a multiple of 8 elements, got {ldaux}")
        if beta != 0.0:
            raise ValueError(f"beta: epilogue {epilogue!r} needs beta = 0, got {beta}")
        ptrs["aux"] = aux.data.ptr
    elif aux is not None:
        raise ValueError(f"aux: epilogue {epilogue!r} takes no aux matrix")
    if c.size == 0:
        return c

    aligns = (_alignment(b.data.ptr), _alignment(a.data.ptr), _alignment(c.data.ptr),
              _alignment(c.data.ptr), _alignment(ptrs.get("bias", 0)),
              _alignment(ptrs.get("aux", 0)))
    key = (dev, c.dtype, M, N, Ka, trans_a, trans_b, lda, ldb, ldc, epilogue, ldaux, aligns)
    _run(key, c, a, b, beta, ptrs)
    return c


def _scalar(x: float):
    s = _SCALARS.get(x)
    if s is None:
        s = _SCALARS[x] = ctypes.c_float(x)
    return ctypes.byref(s)


def _run(key: tuple, c, a, b, beta: float, ptrs: dict):
    """The plan for `key` (made on first use), then `_run_plan`."""
    state = _device(key[0])
    plan = state.plans.get(key)
    if plan is None:
        plan = state.plans[key] = _make_plan(state, key, ptrs)
        plan.key_text = repr(key[1:])
    _run_plan(state, plan, c, a, b, beta, ptrs)


# ---------------------------------------------------------------------------------------------
# fp8 products (module docstring): c (M, N) bf16 = sa * sb * a (M, K) @ b (N, K).T

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
    _check_matrix("c", c, BF16, dev)
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
    ldaux = None
    if epilogue == "bias":
        if (not isinstance(bias, cupy.ndarray) or bias.shape != (N,) or bias.dtype != BF16
                or not bias.flags.c_contiguous or bias.device.id != dev):
            raise ValueError(f"bias: epilogue 'bias' needs a contiguous ({N},) bfloat16 vector "
                             f"on device {dev}, got {getattr(bias, 'dtype', type(bias).__name__)} "
                             f"{getattr(bias, 'shape', '')}")
        ptrs["bias"] = bias.data.ptr
    elif bias is not None:
        raise ValueError(f"bias: epilogue {epilogue!r} takes no bias")
    if epilogue == "dgelu":
        _check_matrix("aux", aux, BF16, dev)
        if aux.shape != c.shape:
            raise ValueError(f"aux: expected shape {c.shape} (that of c), got {aux.shape}")
        ldaux = row_stride("aux", aux, M, N)
        if ldaux % 8 != 0:
            raise ValueError(f"aux: the row stride must be a multiple of 8 elements, got {ldaux}")
        if beta != 0.0:
            raise ValueError(f"beta: epilogue 'dgelu' needs beta = 0, got {beta}")
        ptrs["aux"] = aux.data.ptr
    elif aux is not None:
        raise ValueError(f"aux: epilogue {epilogue!r} takes no aux matrix")
    if c.size == 0:
        return c
    aligns = (_alignment(b.data.ptr), _alignment(a.data.ptr), _alignment(c.data.ptr),
              _alignment(c.data.ptr))
    key = (dev, "fp8", a_format, b_format, M, N, K, lda, ldb, ldc, epilogue, ldaux,
           bool(fast_accum), aligns)
    state = _device(dev)
    plan = state.plans.get(key)
    if plan is None:
        plan = state.plans[key] = _make_fp8_plan(state, key, ptrs)
        plan.key_text = repr(key[1:])
    _run_plan(state, plan, c, a, b, beta, ptrs)
    return c


def _make_fp8_plan(state: _Device, key: tuple, ptrs: dict) -> _Plan:
    _, _, a_format, b_format, M, N, K, lda, ldb, ldc, epilogue, ldaux, fast_accum, aligns = key
    lib = _lib()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
           "cublasLtMatmulDescCreate")
    setd = lib.cublasLtMatmulDescSetAttribute
    # cuBLASLt's A is our b (N, K) row-major = column-major (K, N), used transposed: "TN"
    _set(setd, desc, DESC_TRANSA, ctypes.c_int32(CUBLAS_OP_T))
    _set(setd, desc, DESC_TRANSB, ctypes.c_int32(CUBLAS_OP_N))
    _set(setd, desc, DESC_EPILOGUE, ctypes.c_uint32(EPILOGUES[epilogue]))
    _set(setd, desc, DESC_FAST_ACCUM, ctypes.c_int8(1 if fast_accum else 0))
    plan = _Plan(desc, _layout(FP8_TYPES[b_format], N, K, ldb),
                 _layout(FP8_TYPES[a_format], M, K, lda), _layout(BF16, M, N, ldc), _Algo(), 0,
                 ctypes.c_void_p(), ctypes.c_void_p())
    plan.a_scale_ptr.value = ptrs["b_scale"]
    _set(setd, desc, DESC_A_SCALE_POINTER, plan.a_scale_ptr)
    plan.b_scale_ptr.value = ptrs["a_scale"]
    _set(setd, desc, DESC_B_SCALE_POINTER, plan.b_scale_ptr)
    if "bias" in ptrs:
        plan.bias_ptr.value = ptrs["bias"]
        _set(setd, desc, DESC_BIAS_POINTER, plan.bias_ptr)
    if ldaux is not None:
        _set(setd, desc, DESC_EPILOGUE_AUX_LD, ctypes.c_int64(ldaux))
        plan.aux_ptr.value = ptrs["aux"]
        _set(setd, desc, DESC_EPILOGUE_AUX_POINTER, plan.aux_ptr)
    _pick_algorithm(state, plan, aligns,
                    f"fp8 {a_format} x {b_format} -> bf16, epilogue {epilogue!r}, (M, N, K) = "
                    f"{(M, N, K)}, fast_accum={fast_accum}")
    return plan


def _run_plan(state: _Device, plan: _Plan, c, a, b, beta: float, ptrs: dict):
    """Point the plan's descriptor at this call's vectors and scales, enqueue cublasLtMatmul."""
    import cupy
    lib = _lib()
    setd = lib.cublasLtMatmulDescSetAttribute
    for key, slot, attr in (("bias", "bias_ptr", DESC_BIAS_POINTER),
                            ("aux", "aux_ptr", DESC_EPILOGUE_AUX_POINTER),
                            ("b_scale", "a_scale_ptr", DESC_A_SCALE_POINTER),
                            ("a_scale", "b_scale_ptr", DESC_B_SCALE_POINTER)):
        held = getattr(plan, slot)
        if key in ptrs and held.value != ptrs[key]:
            held.value = ptrs[key]
            _set(setd, plan.desc, attr, held)
    stream = cupy.cuda.get_current_stream()
    if not plan.tuned:
        _tune(state, plan, c, a, b, beta, stream)
    _check(_launch(state, plan, plan.algo, plan.workspace, c.data.ptr, a.data.ptr, b.data.ptr,
                   beta, stream.ptr), "cublasLtMatmul")


def _launch(state, plan, algo, workspace: int, c_ptr: int, a_ptr: int, b_ptr: int, beta: float,
            stream_ptr: int) -> int:
    return _lib().cublasLtMatmul(
        state.handle, plan.desc, _scalar(1.0), b_ptr, plan.layout_a, a_ptr, plan.layout_b,
        _scalar(float(beta)), c_ptr, plan.layout_c, c_ptr, plan.layout_c, ctypes.byref(algo),
        state.workspace.data.ptr, workspace, stream_ptr)


# ---------------------------------------------------------------------------------------------
# tuning (module docstring)

def tuning_enabled() -> bool:
    import os
    return os.environ.get("LLMC_MATMUL_TUNE", "1") != "0"


def tuning_cache_path():
    import os
    from pathlib import Path
    root = os.environ.get("LLMC_CACHE_DIR") or Path.home() / ".cache" / "llmc"
    return Path(root) / "cublaslt_algos.json"


def _cache_section() -> str:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"{name}|cublasLt {version()}"


def _read_cache() -> dict:
    import json
    try:
        data = json.loads(tuning_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(section: str, key_text: str, rank: int) -> None:
    """Add one choice to the cache file (re-read, first writer wins, atomic replace)."""
    import json
    import os
    path = tuning_cache_path()
    try:
        data = _read_cache()
        entries = data.setdefault(section, {})
        if key_text in entries:
            return
        entries[key_text] = rank
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: tuning still holds for this process


def _tune(state, plan, c, a, b, beta: float, stream) -> None:
    """Pick plan.algo among plan.candidates: the cached rank, else the fastest on this call's
    operands (module docstring)."""
    import cupy
    plan.tuned = True
    if len(plan.candidates) < 2 or not tuning_enabled() or stream.is_capturing():
        return
    section = _cache_section()
    if section not in _tuned_cache:
        _tuned_cache[section] = _read_cache().get(section, {})
    known = _tuned_cache[section]
    rank = known.get(plan.key_text)
    if rank is None:
        scratch = None
        if beta != 0.0:  # the product reads and writes c: time it on scratch of c's extent
            rows, ld = c.shape[0], c.strides[0] // c.itemsize
            scratch = cupy.zeros((rows - 1) * ld + c.shape[1], dtype=c.dtype)
        c_ptr = scratch.data.ptr if scratch is not None else c.data.ptr
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for i, (algo, ws) in enumerate(plan.candidates):
            if _launch(state, plan, algo, ws, c_ptr, a.data.ptr, b.data.ptr, beta,
                       stream.ptr) != 0:
                continue  # an algorithm this problem's pointers do not suit
            start.record(stream)
            for _ in range(TUNE_REPS):
                _launch(state, plan, algo, ws, c_ptr, a.data.ptr, b.data.ptr, beta, stream.ptr)
            end.record(stream)
            end.synchronize()
            times.append((cupy.cuda.get_elapsed_time(start, end), i))
        if not times:
            return
        rank = min(times)[1]
        known[plan.key_text] = rank
        _remember(section, plan.key_text, rank)
    if 0 <= rank < len(plan.candidates):
        plan.algo, plan.workspace = plan.candidates[rank]
