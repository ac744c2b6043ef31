"""GPU ops: one thin launcher module per kernel family,
kernels/<family>.cu -> llmc/ops/<family>.py, and the public op API.

    from llmc import ops
    x = ops.to_device(host_bf16)            # NumPy (ml_dtypes.bfloat16, float32, int32) -> CuPy
    y = ops.gelu(x)                         # functional forms allocate their outputs
    out, saved = ops.layernorm(x, w, b)     # ... and return what their backward needs
    dx, dw, db = ops.layernorm_grad(dout, x, w, saved)
    ops.gelu_forward(y, x)                  # out= forms write into preallocated buffers
    ops.to_host(y)                          # CuPy -> NumPy, same dtype

Every op has both forms: the functional one (`gelu`, `gelu_grad`, ...) allocates outputs,
saved arrays and scratch on each call and returns gradients as new arrays; the out= one
(`gelu_forward`, `gelu_backward`, ...) is what a training loop that allocates once calls, and
its docstring says which gradients it writes (`=`) and which it accumulates (`+=`). docs/OPS.md
lists them all with their kernels, tests and benchmarks. A family module is also callable as its
functional form (`ops.gelu(x)` is `ops.gelu.gelu(x)`), so `from llmc.ops import gelu` still
gives the module with its launchers.

Every launcher validates its arguments with `check` (shape, dtype, C-contiguity, device; a
`ValueError` naming the argument, what was expected and what came), picks the module variant
from the storage dtype (`dtype_name`), computes the grid and launches on CuPy's current stream.
Wrappers never cast, never allocate in the training step and do no math; scratch buffers are
sized by each family's `*_scratch_size(...)` so the model allocates them once.

Shapes use B, T, C, NH, HS, V, Vp, N = B*T, OC (see docs/DESIGN.md).
"""
from __future__ import annotations

import numpy as np

import ml_dtypes

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
I32 = np.dtype(np.int32)
FLOATX = (BF16, F32)
_NAMES = {BF16: "bf16", F32: "fp32"}
_ALIASES = {"bf16": BF16, "bfloat16": BF16, "fp32": F32, "f32": F32, "float32": F32,
            "int32": I32, "i32": I32}


def as_dtype(dtype) -> np.dtype:
    """np.dtype from a dtype-like or one of "bf16", "fp32", "int32"."""
    if isinstance(dtype, str) and dtype in _ALIASES:
        return _ALIASES[dtype]
    return np.dtype(dtype)


def dtype_name(arr, name: str = "array") -> str:
    """"bf16" or "fp32": the kernel module variant for a floatX array."""
    try:
        return _NAMES[arr.dtype]
    except KeyError:
        raise ValueError(f"{name}: expected dtype bfloat16 or float32, got {arr.dtype}") from None


def check(name: str, arr, shape=None, dtype=None, *, contiguous: bool = True):
    """Validate one argument of an op; raises ValueError naming `name`.

    shape: a tuple (None entries match any size) or None to skip; dtype: a dtype-like, one of
    "bf16"/"fp32"/"int32", a tuple of those (any of), or None. The array must be a cupy.ndarray
    on the current device, C-contiguous unless contiguous=False. Returns arr.
    """
    import cupy
    if not isinstance(arr, cupy.ndarray):
        raise ValueError(f"{name}: expected a cupy.ndarray, got {type(arr).__name__}")
    if shape is not None:
        shape = tuple(shape)
        if arr.ndim != len(shape) or any(s is not None and s != g
                                         for s, g in zip(shape, arr.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + \
                   ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    if dtype is not None:
        allowed = tuple(as_dtype(d) for d in (dtype if isinstance(dtype, tuple) else (dtype,)))
        if arr.dtype not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name}: expected dtype {want}, got {arr.dtype}")
    if contiguous and not arr.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {arr.strides} "
                         f"for shape {arr.shape}")
    dev = cupy.cuda.Device().id
    if arr.device.id != dev:
        raise ValueError(f"{name}: expected an array on the current device {dev}, got device "
                         f"{arr.device.id}")
    return arr


def check_same(name: str, arr, like, like_name: str):
    """`arr` must be a contiguous device array with the shape and dtype of `like`."""
    check(name, arr)
    if arr.shape != like.shape or arr.dtype != like.dtype:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} and dtype {like.dtype} "
                         f"(those of {like_name}), got {tuple(arr.shape)} {arr.dtype}")
    return arr


def check_aligned(name: str, arr, nbytes: int = 16):
    """The data pointer must be `nbytes`-aligned (128-bit vector access)."""
    if arr.data.ptr % nbytes != 0:
        raise ValueError(f"{name}: expected a {nbytes}-byte aligned data pointer for vector "
                         f"access, got address {arr.data.ptr:#x} (offset {arr.data.ptr % nbytes})")
    return arr


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pack_size(dtype) -> int:
    """Elements per 128-bit pack of the kernels' vector access (8 bf16, 4 fp32)."""
    return 16 // as_dtype(dtype).itemsize


def round_up(n: int, k: int = 256) -> int:
    return ceil_div(n, k) * k


def check_scratch(name: str, scratch, nbytes: int):
    """A scratch buffer: 1-D C-contiguous device array (any dtype) of at least `nbytes` bytes.

    Ops run one after another on a stream, so one buffer sized to the largest
    `*_scratch_size(...)` serves every op. Returns scratch.data (a MemoryPointer; add byte offsets).
    """
    check(name, scratch)
    if scratch.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D buffer, got shape {scratch.shape}")
    if scratch.nbytes < nbytes:
        raise ValueError(f"{name}: expected at least {nbytes} bytes, got {scratch.nbytes} "
                         f"(size it with the op's *_scratch_size function)")
    check_aligned(name, scratch, 256)
    return scratch.data


def set_dynamic_smem(kernel, nbytes: int):
    """Opt a kernel into more than 48 KiB of dynamic shared memory when it needs it."""
    if nbytes > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < nbytes:
        kernel.max_dynamic_shared_size_bytes = nbytes


# ---------------------------------------------------------------------------------------------
# The public API. Imported last: the family modules import the helpers above.

import importlib as _importlib  # noqa: E402
import inspect as _inspect  # noqa: E402
import types as _types  # noqa: E402

from llmc.ops.arrays import empty, from_host, scratch, to_device, to_host, zeros  # noqa: E402
from llmc.ops.adamw import (adamw_update, decay_table, global_norm,  # noqa: E402
                            global_norm_scratch_size, global_norm_squared)
from llmc.ops.attention import (attention_backward, attention_buffers,  # noqa: E402
                                attention_forward, attention_grad, attention_scratch,
                                resolve_method)
from llmc.ops.classifier import (cross_entropy, cross_entropy_grad, fused_classifier,  # noqa: E402
                                 mean_loss)
from llmc.ops.encoder import (encoder_backward, encoder_backward_scratch_size,  # noqa: E402
                              encoder_forward, encoder_grad)
from llmc.ops.flash_attention import (flash_attention_backward,  # noqa: E402
                                      flash_attention_forward, flash_attention_grad,
                                      flash_scratch_shapes)
from llmc.ops.gelu import gelu_backward, gelu_forward, gelu_grad  # noqa: E402
from llmc.ops.layernorm import (fused_residual_layernorm_forward, layernorm_backward,  # noqa: E402
                                layernorm_backward_scratch_size, layernorm_forward,
                                layernorm_grad, residual, residual_forward, residual_layernorm)
from llmc.ops.matmul import (bias_backward, matmul_backward,  # noqa: E402
                             matmul_backward_scratch_size, matmul_forward, matmul_grad, matvec,
                             matvec_forward, matvec_layernorm_forward)
from llmc.ops.decode import (decode_attention, decode_embed, decode_scratch,  # noqa: E402
                             embed_at, gather_rows, kv_append, kv_attention)
from llmc.ops.sampling import sample, sample_tokens  # noqa: E402


class _Family(_types.ModuleType):
    """A family module that is also its functional form: ops.gelu(x) calls ops.gelu.gelu(x)."""

    def __call__(self, *args, **kwargs):
        return self._functional(*args, **kwargs)


# family modules whose functional form carries the family's name
CALLABLE_FAMILIES = ("encoder", "layernorm", "matmul", "gelu", "attention", "flash_attention")
for _name in CALLABLE_FAMILIES:
    _module = _importlib.import_module(f"llmc.ops.{_name}")
    _module.__class__ = _Family
    _module._functional = getattr(_module, _name)
    _module.__signature__ = _inspect.signature(_module._functional)
del _name, _module

FUNCTIONAL = ("encoder", "encoder_grad", "layernorm", "layernorm_grad", "residual",
              "residual_layernorm", "matmul", "matmul_grad", "gelu", "gelu_grad", "attention",
              "attention_grad", "flash_attention", "flash_attention_grad", "cross_entropy",
              "cross_entropy_grad", "global_norm", "matvec", "embed_at", "kv_attention", "sample")
OUT_FORMS = ("encoder_forward", "encoder_backward", "layernorm_forward",
             "fused_residual_layernorm_forward", "residual_forward", "layernorm_backward",
             "matmul_forward", "matmul_backward", "bias_backward", "gelu_forward",
             "gelu_backward", "attention_forward", "attention_backward",
             "flash_attention_forward", "flash_attention_backward", "fused_classifier",
             "mean_loss", "global_norm_squared", "adamw_update", "matvec_forward", "matvec_layernorm_forward",
             "decode_embed", "gather_rows", "kv_append", "decode_attention", "sample_tokens")
