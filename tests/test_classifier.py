"""Fused classifier on the GPU (llmc/ops/classifier.py) against the NumPy reference.

Checks losses and in-place dlogits against llmc.model.reference.crossentropy_forward/backward in
float64 on the logits as stored (rounded to the storage dtype), fp32 and bf16: padded columns
hold random garbage on input and must come out exactly 0; the forward-only mode leaves the logits
bit-for-bit unchanged; results are bitwise deterministic; a target outside [0, V) gives a NaN loss
for its row only. Shapes: production (N=4096 and N=65536 rows of Vp=50304, the latter checked on
sampled rows so the 64-bit row offsets past 2^31 elements are exercised) and awkward ones (N=1,
V not a multiple of the 16-byte chunk, V == Vp, fewer columns than threads). Losses are fp32 in
both dtypes and use the fp32 tolerance: the only bf16 rounding is in the input, which the
reference sees too.

Run: pytest tests/test_classifier.py        (the gpu tests skip without a CUDA device)
"""
import numpy as np
import pytest

from llmc.model import reference
from llmc.ops.classifier import fused_classifier
from tests.gpu_arrays import DTYPES, UINT, device, host, host_bits
from tests.tolerances import assert_close

# (N, V, Vp): production, then awkward
SHAPES = [(4096, 50257, 50304), (1, 50257, 50304), (17, 999, 1008), (5, 64, 64), (33, 3, 8),
          (9, 5000, 5008)]


def make_case(N, V, Vp, dtype, seed, scale=3.0):
    """Logits (N, Vp) in the storage dtype (garbage in the padded columns), targets, float64 copy."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((N, Vp), dtype=np.float32)).astype(DTYPES[dtype])
    targets = rng.integers(0, V, size=N).astype(np.int32)
    targets[0] = V - 1  # the last real column, next to the padding
    if N > 1:
        targets[1] = 0
    return logits, targets, logits.astype(np.float64)


def reference_case(logits64, targets, V, dloss):
    losses, probs = reference.crossentropy_forward(logits64, targets, V)
    dlogits = reference.crossentropy_backward(probs, targets, np.full(len(targets), dloss))
    return losses, dlogits


def run(logits, targets, V, dloss, write_dlogits=True):
    import cupy
    d_logits = device(logits)
    losses = cupy.full(len(targets), np.nan, dtype=np.float32)
    fused_classifier(d_logits, losses, cupy.asarray(targets), V, dloss, write_dlogits)
    cupy.cuda.get_current_stream().synchronize()
    return d_logits, losses


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%dV%dVp%d" % s)
def test_loss_and_dlogits(shape, dtype):
    N, V, Vp = shape
    logits, targets, logits64 = make_case(N, V, Vp, dtype, seed=N + V)
    dloss = 1.0 / (N * 3)
    d_logits, losses = run(logits, targets, V, dloss)
    ref_losses, ref_dlogits = reference_case(logits64, targets, V, dloss)
    assert_close(losses.get(), ref_losses, "fp32", "losses")
    got = host(d_logits)
    assert_close(got, ref_dlogits, dtype, "dlogits")
    assert np.all(host_bits(d_logits)[:, V:] == 0), "dlogits: padded columns must be exactly +0"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_production_rows_beyond_2_31_elements(dtype):
    """N=65536 x Vp=50304 (3.3e9 elements): sampled rows, including the last ones, vs the reference."""
    import cupy
    N, V, Vp = 65536, 50257, 50304
    base, _, _ = make_case(1024, V, Vp, dtype, seed=11)
    bits = cupy.asarray(base.view(UINT[base.itemsize]))
    rows = cupy.empty((N, Vp), dtype=bits.dtype)
    for j in range(N // 1024):  # distinct rows from 1024 random ones: rotate the real columns
        rows[j * 1024:(j + 1) * 1024, :V] = cupy.roll(bits[:, :V], 37 * j, axis=1)
        rows[j * 1024:(j + 1) * 1024, V:] = bits[:, V:]
    d_logits = rows.view(base.dtype)
    rng = np.random.default_rng(12)
    targets = rng.integers(0, V, size=N).astype(np.int32)
    sample = np.unique(np.concatenate([rng.integers(0, N, 200), np.arange(N - 8, N), [0, 1]]))
    before = cupy.asnumpy(rows[cupy.asarray(sample)]).view(base.dtype).astype(np.float64)
    losses = cupy.full(N, np.nan, dtype=np.float32)
    dloss = 1.0 / N
    fused_classifier(d_logits, losses, cupy.asarray(targets), V, dloss)
    after = cupy.asnumpy(rows[cupy.asarray(sample)]).view(base.dtype).astype(np.float64)
    ref_losses, ref_dlogits = reference_case(before, targets[sample], V, dloss)
    all_losses = losses.get()
    assert np.all(np.isfinite(all_losses)), "losses: rows left unwritten"
    assert_close(all_losses[sample], ref_losses, "fp32", "losses")
    assert_close(after, ref_dlogits, dtype, "dlogits")
    assert np.all(after[:, V:] == 0), "dlogits: padded columns must be exactly 0"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_forward_only_leaves_logits(dtype):
    N, V, Vp = 256, 50257, 50304
    logits, targets, logits64 = make_case(N, V, Vp, dtype, seed=5)
    d_logits, losses = run(logits, targets, V, 1.0, write_dlogits=False)
    assert np.array_equal(host_bits(d_logits), logits.view(UINT[logits.itemsize])), \
        "logits: the forward-only mode must not write them"
    ref_losses, _ = reference_case(logits64, targets, V, 1.0)
    assert_close(losses.get(), ref_losses, "fp32", "losses")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_deterministic(dtype):
    N, V, Vp = 8192, 50257, 50304
    logits, targets, _ = make_case(N, V, Vp, dtype, seed=9)
    a_logits, a_losses = run(logits, targets, V, 1.0 / N)
    b_logits, b_losses = run(logits, targets, V, 1.0 / N)
    assert np.array_equal(a_losses.get().view(np.uint32), b_losses.get().view(np.uint32))
    assert np.array_equal(host_bits(a_logits), host_bits(b_logits))


@pytest.mark.gpu
def test_target_out_of_range_gives_nan_loss():
    N, V, Vp = 4, 100, 104
    logits, targets, logits64 = make_case(N, V, Vp, "fp32", seed=3)
    bad = targets.copy()
    bad[2] = V  # a padded column: not a real class
    bad[3] = -1
    d_logits, losses = run(logits, bad, V, 0.5)
    got = losses.get()
    assert np.isnan(got[2]) and np.isnan(got[3]), "out-of-range targets must give NaN losses"
    ref_losses, ref_dlogits = reference_case(logits64[:2], targets[:2], V, 0.5)
    assert_close(got[:2], ref_losses, "fp32", "losses of the valid rows")
    assert_close(host(d_logits)[:2], ref_dlogits, "fp32", "dlogits of the valid rows")
    # no one-hot term for the bad rows: 0.5 * softmax, a valid distribution times 0.5
    _, probs = reference.crossentropy_forward(logits64[2:], np.zeros(2, np.int32), V)
    assert_close(host(d_logits)[2:], 0.5 * probs, "fp32", "dlogits of the bad rows")


@pytest.mark.gpu
def test_validation():
    import cupy
    f32 = np.float32
    losses = cupy.empty(4, dtype=f32)
    targets = cupy.zeros(4, dtype=np.int32)
    with pytest.raises(ValueError, match="logits"):  # rows of 20 bytes: no 128-bit access
        fused_classifier(cupy.zeros((4, 5), f32), losses, targets, 5, 1.0)
    with pytest.raises(ValueError, match="V"):
        fused_classifier(cupy.zeros((4, 8), f32), losses, targets, 9, 1.0)
    with pytest.raises(ValueError, match="targets"):
        fused_classifier(cupy.zeros((4, 8), f32), losses, targets.astype(np.int64), 8, 1.0)
    with pytest.raises(ValueError, match="losses"):
        fused_classifier(cupy.zeros((4, 8), f32), cupy.empty(3, f32), targets, 8, 1.0)
    with pytest.raises(ValueError, match="logits"):
        fused_classifier(cupy.zeros((4, 8), np.float16), losses, targets, 8, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 17, 1024, 1025, 65536])
def test_mean_loss(N):
    """The one-block mean of the losses: the float64 mean within fp32 summation rounding, the
    same bits on every call, written into a 0-d or a (1,) output."""
    import cupy
    from llmc.ops.classifier import mean_loss
    rng = np.random.default_rng(N)
    losses = (10 + rng.standard_normal(N)).astype(np.float32)
    d = device(losses)
    for shape in ((), (1,)):
        out = cupy.full(shape, np.nan, dtype=np.float32)
        first = float(mean_loss(out, d).reshape(()))
        assert first == pytest.approx(losses.astype(np.float64).mean(), rel=1e-6)
        assert float(mean_loss(out, d).reshape(())) == first
    with pytest.raises(ValueError, match="mean"):
        mean_loss(cupy.zeros(2, dtype=np.float32), d)
