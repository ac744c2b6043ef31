"""One llmc op dropped into a plain CuPy program: LayerNorm of fp32 CuPy arrays.

The program normalizes a batch of feature rows with llmc's kernel (llmc.ops.layernorm works on
any C-contiguous CuPy array of float32 or bfloat16 rows) and checks the result, and its
gradient, against the same math written in CuPy. Needs a CUDA GPU.
Run:  python examples/op_in_cupy.py
"""
import cupy as cp

from llmc import ops

rng = cp.random.default_rng(0)
x = rng.standard_normal((4096, 768), dtype=cp.float32) * 3 + 1
w = rng.standard_normal(768, dtype=cp.float32)
b = rng.standard_normal(768, dtype=cp.float32)

y, (mean, rstd) = ops.layernorm(x, w, b)           # llmc's kernel; mean, rstd per row (fp32)

mu = x.mean(axis=1, keepdims=True)                  # the same in CuPy
xhat = (x - mu) / cp.sqrt(x.var(axis=1, keepdims=True) + 1e-5)
print("forward  max |llmc - cupy| =", float(cp.abs(y - (xhat * w + b)).max()))
assert cp.allclose(y, xhat * w + b, rtol=1e-4, atol=1e-4)

dy = rng.standard_normal(y.shape, dtype=cp.float32)
dx, dw, db = ops.layernorm_grad(dy, x, w, (mean, rstd))
g = dy * w                                          # d(loss)/d(xhat)
dx_cupy = (g - g.mean(axis=1, keepdims=True)
           - xhat * (g * xhat).mean(axis=1, keepdims=True)) * rstd[:, None]
print("backward max |llmc - cupy| =", float(cp.abs(dx - dx_cupy).max()))
assert cp.allclose(dx, dx_cupy, rtol=1e-3, atol=1e-3)
assert cp.allclose(dw, (dy * xhat).sum(axis=0), rtol=1e-3, atol=1e-2)
assert cp.allclose(db, dy.sum(axis=0), rtol=1e-3, atol=1e-2)
print("ok")
