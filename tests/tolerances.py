"""One tolerance table for comparing GPU kernels with the NumPy reference, keyed by dtype.

Errors are norm-wise: ||got - ref|| / ||ref|| (`rel_err`), plus an element-wise bound for
outputs that must be close everywhere. fp32 kernels reorder sums (and cuBLAS may split K), so
they sit far under 1e-5; bf16 storage rounds every stored value to 8 bits of mantissa
(relative step 2^-8 = 3.9e-3), so one bf16 rounding of the output alone is ~2e-3 norm-wise.
"""
import numpy as np

# dtype -> (norm-wise relative error, element-wise atol scale relative to max|ref|)
TOLERANCES = {
    "fp32": {"rel": 1e-5, "elem": 1e-4},
    # bf16 kernels: inputs and outputs bf16, fp32 arithmetic; a few roundings in a chain.
    "bf16": {"rel": 1.5e-2, "elem": 4e-2},
}


def rel_err(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (denom if denom > 0 else 1.0))


def assert_close(got, ref, dtype: str, name: str = "output", rel=None):
    """Fail with a message naming `name` when got differs from ref beyond the dtype's table."""
    tol = TOLERANCES[dtype]
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(got)), f"{name}: {np.sum(~np.isfinite(got))} non-finite values (unwritten or NaN)"
    err = rel_err(got, ref)
    limit = tol["rel"] if rel is None else rel
    assert err <= limit, f"{name} ({dtype}): norm-wise relative error {err:.3e} > {limit:.1e}"
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    worst = float(np.max(np.abs(got - ref))) / scale
    assert worst <= tol["elem"] * (1 if rel is None else max(1.0, rel / tol["rel"])), (
        f"{name} ({dtype}): worst element error {worst:.3e} of max|ref| > {tol['elem']:.1e}")
    return err
