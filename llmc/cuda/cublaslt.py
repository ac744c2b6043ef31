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

Tuning (on unless LLMC_MATMUL_TUNE=0): a plan's first call picks the fastest of the heuristic's
first TUNE_CANDIDATES algorithms, each timed in a CUDA graph of back-to-back launches,
remembered across processes (llmc/cuda/cublaslt_tuning.py).

The workspace is shared by every call on the device, so products must not run on two streams at
once (llmc runs them all on the compute stream).

Supported layouts: 2-D arrays whose last dimension is contiguous (row strides may exceed the
width), a contiguous bias vector, aux shaped like c with a row stride that is a multiple of 8.
Anything else is a ValueError naming the argument.

fp8 products (Hopper / Ada) share this module's plans and launch: llmc/cuda/cublaslt_fp8.py.

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

from llmc.cuda import cublaslt_tuning
from llmc.cuda.cublas import (BF16, CUBLAS_COMPUTE_32F, CUBLAS_OP_N, CUBLAS_OP_T, CUDA_R_16BF,
                         CUDA_R_32F, F32, product_dims, row_stride)

WORKSPACE_BYTES = 32 << 20

DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
DESC_EPILOGUE_AUX_POINTER, DESC_EPILOGUE_AUX_LD = 11, 12
DESC_A_SCALE_POINTER, DESC_B_SCALE_POINTER, DESC_FAST_ACCUM = 17, 18, 25
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


TUNE_CANDIDATES = 8  # algorithms asked of the heuristic per plan (timed by cublaslt_tuning)


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


def set_vectors(plan: _Plan, ptrs: dict, ldaux) -> None:
    """A new plan's bias and aux pointers (and the aux row stride) on its descriptor."""
    setd = _lib().cublasLtMatmulDescSetAttribute
    if "bias" in ptrs:
        plan.bias_ptr.value = ptrs["bias"]
        _set(setd, plan.desc, DESC_BIAS_POINTER, plan.bias_ptr)
    if ldaux is not None:
        _set(setd, plan.desc, DESC_EPILOGUE_AUX_LD, ctypes.c_int64(ldaux))
        plan.aux_ptr.value = ptrs["aux"]
        _set(setd, plan.desc, DESC_EPILOGUE_AUX_POINTER, plan.aux_ptr)


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
    set_vectors(plan, ptrs, ldaux)
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
    ldaux = epilogue_args(ptrs, epilogue, bias, aux, c, beta, dev)
    if c.size == 0:
        return c

    aligns = (_alignment(b.data.ptr), _alignment(a.data.ptr), _alignment(c.data.ptr),
              _alignment(c.data.ptr), _alignment(ptrs.get("bias", 0)),
              _alignment(ptrs.get("aux", 0)))
    key = (dev, c.dtype, M, N, Ka, trans_a, trans_b, lda, ldb, ldc, epilogue, ldaux, aligns)
    _run(key, c, a, b, beta, ptrs)
    return c


def epilogue_args(ptrs: dict, epilogue: str, bias, aux, c, beta: float, dev: int):
    """Check the epilogue's vectors against c (M, N) and add their pointers to ptrs; returns
    aux's row stride (None without aux). bias (N,) for the bias epilogues, aux (M, N) for those
    that read or write it (then beta must be 0); each in c's dtype."""
    import cupy
    M, N = c.shape
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
    if epilogue not in ("dgelu", "gelu_aux_bias"):
        if aux is not None:
            raise ValueError(f"aux: epilogue {epilogue!r} takes no aux matrix")
        return None
    _check_matrix("aux", aux, c.dtype, dev)
    if aux.shape != c.shape:
        raise ValueError(f"aux: expected shape {c.shape} (that of c), got {aux.shape}")
    ldaux = row_stride("aux", aux, M, N)
    if ldaux % 8 != 0:
        raise ValueError(f"aux: the row stride must be a multiple of 8 elements, got {ldaux}")
    if beta != 0.0:
        raise ValueError(f"beta: epilogue {epilogue!r} needs beta = 0, got {beta}")
    ptrs["aux"] = aux.data.ptr
    return ldaux


def _scalar(x: float):
    s = _SCALARS.get(x)
    if s is None:
        s = _SCALARS[x] = ctypes.c_float(x)
    return ctypes.byref(s)


def _run(key: tuple, c, a, b, beta: float, ptrs: dict):
    run_plan(key, _make_plan, c, a, b, beta, ptrs)


def run_plan(key: tuple, make, c, a, b, beta: float, ptrs: dict):
    """The plan for `key` (key[0] the device; made by make(state, key, ptrs) on first use),
    then `_run_plan`."""
    state = _device(key[0])
    plan = state.plans.get(key)
    if plan is None:
        plan = state.plans[key] = make(state, key, ptrs)
        plan.key_text = repr(key[1:])
    _run_plan(state, plan, c, a, b, beta, ptrs)


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
        cublaslt_tuning.tune(plan, c, a, b, beta, stream,
                             lambda algo, ws, c_ptr, stream_ptr: _launch(
                                 state, plan, algo, ws, c_ptr, a.data.ptr, b.data.ptr, beta,
                                 stream_ptr))
    _check(_launch(state, plan, plan.algo, plan.workspace, c.data.ptr, a.data.ptr, b.data.ptr,
                   beta, stream.ptr), "cublasLtMatmul")


def _launch(state, plan, algo, workspace: int, c_ptr: int, a_ptr: int, b_ptr: int, beta: float,
            stream_ptr: int) -> int:
    return _lib().cublasLtMatmul(
        state.handle, plan.desc, _scalar(1.0), b_ptr, plan.layout_a, a_ptr, plan.layout_b,
        _scalar(float(beta)), c_ptr, plan.layout_c, c_ptr, plan.layout_c, ctypes.byref(algo),
        state.workspace.data.ptr, workspace, stream_ptr)
