"""Moving arrays between the host and the device, bf16 included, and allocating op buffers.

    to_device(x)            NumPy array (float32, ml_dtypes.bfloat16, int32, ...) -> CuPy array
    to_host(arr)            CuPy array -> contiguous NumPy array of the same dtype
    from_host(dst, x)       copy a host array into an existing device array (same size, dtype)
    empty(shape, dtype)     cupy.empty with the dtype names of the ops ("bf16", "fp32", "int32")
    zeros(shape, dtype)     the same, zero-filled (for gradients that ops accumulate into)
    scratch(nbytes)         a 256-byte aligned 1-D byte buffer for the ops' `scratch=` argument

bf16 arrays travel as their raw bits (uint16 views; float32 as uint32), so no CuPy kernel has
to know bfloat16 and the values arrive bit for bit. Make bf16 host arrays with ml_dtypes:
`x.astype(ml_dtypes.bfloat16)` (round to nearest even); read them back with
`to_host(y).astype(np.float32)` (exact).
"""
from __future__ import annotations

import numpy as np

from llmc.ops import as_dtype

_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def to_device(x):
    """Host array -> new C-contiguous device array of the same shape and dtype (bits copied)."""
    import cupy
    x = np.ascontiguousarray(x)
    raw = _RAW[x.itemsize]
    return cupy.asarray(x.view(raw)).view(x.dtype)


def to_host(arr) -> np.ndarray:
    """Device array (any strides) -> contiguous host array of the same dtype (bits copied)."""
    import cupy
    raw = _RAW[arr.itemsize]
    return np.ascontiguousarray(cupy.asnumpy(arr.view(raw))).view(arr.dtype)


def from_host(dst, host: np.ndarray) -> None:
    """Contiguous host array -> contiguous device `dst` of the same dtype and size (raw bits).

    Synchronizes the current stream before returning: the host buffer may be pageable and freed
    once this returns.
    """
    import cupy
    host = np.ascontiguousarray(host)
    if host.dtype != dst.dtype or host.size != dst.size:
        raise ValueError(f"host: expected {dst.size} values of {dst.dtype} (those of dst), got "
                         f"shape {host.shape} {host.dtype}")
    raw = _RAW[dst.itemsize]
    stream = cupy.cuda.get_current_stream()
    dst.view(raw).set(host.view(raw).reshape(dst.shape), stream=stream)
    stream.synchronize()


def empty(shape, dtype):
    """Uninitialized device array; dtype a dtype-like or "bf16" / "fp32" / "int32"."""
    import cupy
    return cupy.empty(shape, dtype=as_dtype(dtype))


def zeros(shape, dtype):
    """Zero-filled device array (memset, so bf16 needs no CuPy arithmetic)."""
    out = empty(shape, dtype)
    out.data.memset_async(0, out.nbytes)
    return out


def scratch(nbytes: int):
    """A 1-D uint8 device buffer of at least `nbytes` bytes (at least 256), 256-byte aligned.

    CuPy's memory pool hands out 512-byte aligned blocks; ops check the alignment.
    """
    import cupy
    return cupy.empty(max(int(nbytes), 256), dtype=np.uint8)
