"""GELU on the GPU (llmc/ops/gelu.py) against llmc.model.reference.gelu_forward/backward.

Forward and backward in fp32 and bf16, reference in float64 on the values as stored; outputs
poisoned with NaN first. Shapes: the production MLP activation (B=4, T=1024, 4C=3072), T=1, and
sizes that are not a multiple of the 128-bit pack (the scalar tail path). Also the in-place
backward (dinp aliasing dout) and argument validation.

Run: pytest tests/test_gelu.py        (the gpu tests skip without a CUDA device)
"""
import numpy as np
import pytest

from llmc.model import reference
from tests.gpu_arrays import DTYPES, device, host, poisoned
from tests.tolerances import assert_close

SHAPES = [(4, 1024, 3072), (1, 1, 3072), (3, 5, 7), (1, 1, 1), (2, 3, 1001)]


def make(shape, dtype, seed, scale=2.0):
    x = (scale * np.random.default_rng(seed).standard_normal(shape)).astype(DTYPES[dtype])
    return x, x.astype(np.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(shape, dtype):
    from llmc.ops.gelu import gelu_forward
    x, x64 = make(shape, dtype, seed=1)
    out = poisoned(shape, dtype)
    gelu_forward(out, device(x))
    assert_close(host(out), reference.gelu_forward(x64), dtype, "out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward(shape, dtype):
    from llmc.ops.gelu import gelu_backward
    x, x64 = make(shape, dtype, seed=2)
    dy, dy64 = make(shape, dtype, seed=3, scale=1.0)
    dinp = poisoned(shape, dtype)
    gelu_backward(dinp, device(x), device(dy))
    assert_close(host(dinp), reference.gelu_backward(x64, dy64), dtype, "dinp")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_backward_in_place(dtype):
    """dinp may be dout itself (the model reuses the buffer)."""
    from llmc.ops.gelu import gelu_backward
    shape = (2, 64, 3072 + 8)
    x, x64 = make(shape, dtype, seed=4)
    dy, dy64 = make(shape, dtype, seed=5, scale=1.0)
    buf = device(dy)
    gelu_backward(buf, device(x), buf)
    assert_close(host(buf), reference.gelu_backward(x64, dy64), dtype, "dinp (aliasing dout)")


@pytest.mark.gpu
def test_validation():
    import cupy
    from llmc.ops.gelu import gelu_backward, gelu_forward
    x = cupy.ones((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="out"):
        gelu_forward(cupy.ones((4, 9), dtype=np.float32), x)
    with pytest.raises(ValueError, match="out"):
        gelu_forward(cupy.zeros((4, 8), dtype=DTYPES["bf16"]), x)
    with pytest.raises(ValueError, match="inp"):
        gelu_forward(x, cupy.ones((4, 8), dtype=np.float64))
    with pytest.raises(ValueError, match="out"):
        gelu_forward(cupy.ones((8, 4), dtype=np.float32).T, x)
    with pytest.raises(ValueError, match="dout"):
        gelu_backward(x, x, cupy.ones((4, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="inp"):
        gelu_forward(x, np.ones((4, 8), dtype=np.float32))
