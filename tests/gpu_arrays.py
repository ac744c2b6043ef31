"""Moving test arrays between host and device, and poisoning outputs, for the kernel tests.

Transfers are llmc.ops.arrays' (raw bits, so bf16 arrives bit for bit); outputs start as NaN so
an element a kernel forgets to write fails the test.
"""
import ml_dtypes
import numpy as np

from llmc.ops.arrays import to_device, to_host

DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
UINT = {2: np.uint16, 4: np.uint32}
NAN_BITS = {2: 0x7FC0, 4: 0x7FC00000}


def device(x):
    """Host array -> device array of the same dtype."""
    return to_device(x)


def host_bits(arr):
    """Device array -> host array of its raw bits (for bitwise comparisons)."""
    return to_host(arr).view(UINT[arr.itemsize])


def host(arr):
    """Device floating array -> float64 NumPy array."""
    return host_bits(arr).view(arr.dtype).astype(np.float64)


def poison(arr):
    """Fill a device array with NaN bit patterns in place and return it."""
    arr.view(UINT[arr.itemsize]).fill(NAN_BITS[arr.itemsize])
    return arr


def poisoned(shape, dtype):
    """A new device array of `shape` full of NaN; dtype is a key of DTYPES or a NumPy dtype."""
    import cupy
    dt = DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    return cupy.full(shape, NAN_BITS[dt.itemsize], dtype=UINT[dt.itemsize]).view(dt)
