"""Causal flash attention kernels (llmc/ops/flash_attention.py) against the NumPy reference.

Every check runs for the (forward, backward) implementation pairs of IMPLS: "sm80" (mma.sync,
any device) and "sm90" (wgmma, skipped unless the device is compute capability 9.0), each backward
from that forward's out and lse (and the sm80 backward from the sm90 forward). Checks: out, lse
and dqkv against llmc.model.reference.attention_forward/attention_backward (and a float64
log-sum-exp) evaluated in float64 on the bf16 values the kernels see; shapes with NH=12, HS=64,
B=2..8 and T in {1, 17, 64, 100, 1024} (T=1, tiles not filled, 36 heads of 3 batches; T=1000 on
12 heads of one). Outputs and scratch are poisoned with NaN first. The forward and backward are
bitwise identical across two runs. On the production shape (B=64, T=1024) the results are
compared with PyTorch's scaled_dot_product_attention when torch with CUDA is importable. Every
sm90 forward variant agrees with the sm80 forward, the sm90 backward with the sm80 backward.
Argument validation.

Run: pytest tests/test_flash_attention.py        (the gpu tests skip without a CUDA device)
"""
import ml_dtypes
import numpy as np
import pytest

from llmc.model import reference
from tests.gpu_arrays import UINT, device, host, poison
from tests.tolerances import assert_close

BF16 = np.dtype(ml_dtypes.bfloat16)
HS = 64
NH = 12
# (B, T): T=1, T below / at / not a multiple of the 64-row tiles, the GPT-2 length
SHAPES = [(2, 1), (3, 17), (2, 64), (8, 100), (1, 1000), (2, 1024)]
IMPLS = [("sm80", "sm80"), ("sm90", "sm80"), ("sm90", "sm90")]  # (forward, backward)
IMPL_IDS = ["-".join(p) for p in IMPLS]
REL = 1e-2  # norm-wise relative error allowed for bf16 outputs


def need(*impls):
    """Skip an sm90 case on a device that is not compute capability 9.0."""
    import cupy
    cc = cupy.cuda.Device().compute_capability
    if any(i.startswith("sm90") for i in impls) and cc != "90":
        pytest.skip(f"the sm90 (wgmma) kernels need compute capability 9.0, this device is {cc}")


def make_inputs(B, T, seed):
    """qkv (B, T, 3C) and dout (B, T, C), N(0, 1) rounded to bf16 (host arrays)."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * NH * HS)).astype(BF16)
    dout = rng.standard_normal((B, T, NH * HS)).astype(BF16)
    return qkv, dout


def run(qkv_h, dout_h, impls=("sm80", "sm80")):
    """Forward and backward (by impls = (forward, backward)) on freshly poisoned buffers; returns
    device (out, lse, dqkv)."""
    import cupy
    from llmc.ops.flash_attention import (flash_attention_backward, flash_attention_forward,
                                          flash_scratch_shapes)
    B, T, C3 = qkv_h.shape
    C = C3 // 3
    qkv, dout = device(qkv_h), device(dout_h)
    out = poison(cupy.empty((B, T, C), dtype=BF16))
    lse = poison(cupy.empty((B, NH, T), dtype=np.float32))
    dqkv = poison(cupy.empty((B, T, 3 * C), dtype=BF16))
    scratch = {name: poison(cupy.empty(shape, dtype=dt))
               for name, (shape, dt) in flash_scratch_shapes(B, T, C, NH).items()}
    flash_attention_forward(out, lse, qkv, NH, impl=impls[0])
    flash_attention_backward(dqkv, dout, qkv, out, lse, NH, scratch, impl=impls[1])
    cupy.cuda.get_current_stream().synchronize()
    return out, lse, dqkv


def reference_lse(qkv, T):
    """log sum_{u <= t} exp(q_t . k_u / sqrt(HS)) in float64: (B, NH, T)."""
    B = qkv.shape[0]
    C = NH * HS
    q = qkv[..., :C].reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    k = qkv[..., C:2 * C].reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HS)  # (B, NH, T, T)
    s[..., np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.mark.gpu
@pytest.mark.parametrize("impls", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%d" % s)
def test_against_reference(shape, impls):
    need(*impls)
    B, T = shape
    qkv_h, dout_h = make_inputs(B, T, seed=B * 1000 + T)
    out, lse, dqkv = run(qkv_h, dout_h, impls)
    qkv, dout = qkv_h.astype(np.float64), dout_h.astype(np.float64)
    out_ref, att = reference.attention_forward(qkv, NH)
    dqkv_ref = reference.attention_backward(dout, qkv, att, NH)
    assert_close(host(out), out_ref, "bf16", "out", rel=REL)
    assert_close(host(lse), reference_lse(qkv, T), "fp32", "lse")
    C = NH * HS
    got = host(dqkv)
    assert_close(got, dqkv_ref, "bf16", "dqkv", rel=REL)
    dq, dk, dv = (got[..., i * C:(i + 1) * C] for i in range(3))
    dq_ref, dk_ref, dv_ref = (dqkv_ref[..., i * C:(i + 1) * C] for i in range(3))
    assert_close(dv, dv_ref, "bf16", "dv", rel=REL)
    if T == 1:  # one key: P = 1, dS = P (dP - D) = 0 exactly, so dq = dk = 0 up to rounding
        for name, part in (("dq", dq), ("dk", dk)):
            worst = np.max(np.abs(part)) / np.max(np.abs(dv_ref))
            assert worst <= 1e-3, f"{name} must vanish for T = 1: max|{name}|/max|dv| {worst:.1e}"
    else:
        assert_close(dq, dq_ref, "bf16", "dq", rel=REL)
        assert_close(dk, dk_ref, "bf16", "dk", rel=REL)


@pytest.mark.gpu
@pytest.mark.parametrize("impls", IMPLS, ids=IMPL_IDS)
def test_bitwise_deterministic(impls):
    import cupy
    need(*impls)
    qkv_h, dout_h = make_inputs(4, 300, seed=7)
    first = run(qkv_h, dout_h, impls)
    second = run(qkv_h, dout_h, impls)
    for name, a, b in zip(("out", "lse", "dqkv"), first, second):
        assert bool(cupy.array_equal(a.view(UINT[a.itemsize]), b.view(UINT[b.itemsize]))), \
            f"{name}: differs between two runs"


@pytest.mark.gpu
@pytest.mark.parametrize("impls", IMPLS, ids=IMPL_IDS)
def test_against_torch_sdpa(impls):
    """Production shape B=64, T=1024: ours and PyTorch SDPA agree to bf16 accuracy."""
    need(*impls)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    import cupy
    import torch.nn.functional as F
    B, T = 64, 1024
    C = NH * HS
    qkv_h, dout_h = make_inputs(B, T, seed=11)
    out, lse, dqkv = run(qkv_h, dout_h, impls)

    def as_torch(a):  # a device bf16 array seen by torch (raw bits through DLPack)
        return torch.from_dlpack(a.view(np.uint16)).view(torch.bfloat16)

    qkv_t = as_torch(device(qkv_h))
    heads = [qkv_t[..., i * C:(i + 1) * C].reshape(B, T, NH, HS).transpose(1, 2).detach()
             .requires_grad_() for i in range(3)]
    y = F.scaled_dot_product_attention(*heads, is_causal=True)  # (B, NH, T, HS)
    y.backward(as_torch(device(dout_h)).reshape(B, T, NH, HS).transpose(1, 2))
    torch.cuda.synchronize()
    cupy.cuda.get_current_stream().synchronize()

    def rel(ours, theirs):
        a, b = ours.double(), theirs.double()
        return float((a - b).norm() / b.norm())

    ours_out = as_torch(out).reshape(B, T, NH, HS).transpose(1, 2)
    assert rel(ours_out, y.detach()) <= REL, f"out vs SDPA: {rel(ours_out, y.detach()):.3e}"
    ours = as_torch(dqkv)
    for i, name in enumerate(("dq", "dk", "dv")):
        mine = ours[..., i * C:(i + 1) * C].reshape(B, T, NH, HS).transpose(1, 2)
        err = rel(mine, heads[i].grad)
        assert err <= REL, f"{name} vs SDPA: norm-wise relative difference {err:.3e} > {REL}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["w1n128"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (2, 1024)], ids=lambda s: "B%dT%d" % s)
def test_sm90_variants_match_sm80(variant, shape):
    """Each wgmma variant's out and lse agree with the mma.sync forward (same math, fp32
    accumulation in a different order): out to bf16 accuracy, lse to fp32 rounding."""
    import cupy
    from llmc.ops.flash_attention import SM90_VARIANTS, flash_attention_forward
    need("sm90")
    assert variant in SM90_VARIANTS
    B, T = shape
    qkv = device(make_inputs(B, T, seed=T + 5)[0])
    res = {}
    for impl in ("sm80", f"sm90:{variant}"):
        out = poison(cupy.empty((B, T, NH * HS), dtype=BF16))
        lse = poison(cupy.empty((B, NH, T), dtype=np.float32))
        flash_attention_forward(out, lse, qkv, NH, impl=impl)
        res[impl] = host(out), host(lse)
    (out80, lse80), (out90, lse90) = res.values()
    assert_close(out90, out80, "bf16", "out vs sm80", rel=REL)
    assert np.all(np.isfinite(lse90)), "lse: unwritten or non-finite values"
    assert np.max(np.abs(lse90 - lse80)) <= 1e-3, f"lse vs sm80: {np.max(np.abs(lse90 - lse80))}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (3, 1000), (2, 1024)],
                         ids=lambda s: "B%dT%d" % s)
def test_sm90_backward_matches_sm80(shape):
    """The wgmma backward's dq, dk, dv agree with the mma.sync backward's from the same forward
    output (same math, fp32 accumulation in a different order) to bf16 accuracy."""
    need("sm90")
    B, T = shape
    qkv_h, dout_h = make_inputs(B, T, seed=T + 9)
    g80 = host(run(qkv_h, dout_h, ("sm80", "sm80"))[2]).astype(np.float64)
    g90 = host(run(qkv_h, dout_h, ("sm80", "sm90"))[2]).astype(np.float64)
    assert np.all(np.isfinite(g90)), "dqkv: unwritten or non-finite values"
    C = NH * HS
    for i, name in enumerate(("dq", "dk", "dv")):
        a, b = g90[..., i * C:(i + 1) * C], g80[..., i * C:(i + 1) * C]
        if T == 1 and name != "dv":  # both ~0 (see test_against_reference)
            continue
        assert_close(a, b, "bf16", f"{name} vs sm80", rel=REL)


@pytest.mark.gpu
def test_impl_selection(monkeypatch):
    """None follows $LLMC_FLASH_IMPL ($LLMC_FLASH_BWD_IMPL for the backward), else the device;
    unknown names and sm90 off Hopper fail."""
    import cupy
    from llmc.ops import flash_attention as fa
    hopper = cupy.cuda.Device().compute_capability == "90"
    monkeypatch.delenv("LLMC_FLASH_IMPL", raising=False)
    monkeypatch.delenv("LLMC_FLASH_BWD_IMPL", raising=False)
    assert fa.resolve_bwd_impl("sm80") == "sm80"
    assert fa.resolve_bwd_impl(None) == ("sm90" if hopper else "sm80")
    monkeypatch.setenv("LLMC_FLASH_BWD_IMPL", "sm80")
    assert fa.resolve_bwd_impl(None) == "sm80"
    with pytest.raises(ValueError, match="impl"):
        fa.resolve_bwd_impl("sm90:w1n128")
    if not hopper:
        with pytest.raises(ValueError, match="compute capability 9.0"):
            fa.resolve_bwd_impl("sm90")
    assert fa.resolve_impl("sm80") == "sm80"
    assert fa.resolve_impl(None) == (f"sm90:{fa.SM90_DEFAULT}" if hopper else "sm80")
    monkeypatch.setenv("LLMC_FLASH_IMPL", "sm80")
    assert fa.resolve_impl(None) == "sm80"
    with pytest.raises(ValueError, match="impl"):
        fa.resolve_impl("sm75")
    with pytest.raises(ValueError, match="impl"):
        fa.resolve_impl("sm90:w9n9")
    if not hopper:
        with pytest.raises(ValueError, match="compute capability 9.0"):
            fa.resolve_impl("sm90")


@pytest.mark.gpu
def test_validation():
    import cupy
    from llmc.ops.flash_attention import flash_attention_backward, flash_attention_forward
    B, T, C = 2, 8, NH * HS
    qkv = cupy.zeros((B, T, 3 * C), dtype=BF16)
    out = cupy.zeros((B, T, C), dtype=BF16)
    lse = cupy.zeros((B, NH, T), dtype=np.float32)
    with pytest.raises(ValueError, match="qkv.*bfloat16.*matmul"):
        flash_attention_forward(cupy.zeros((B, T, C), np.float32), lse,
                                cupy.zeros((B, T, 3 * C), np.float32), NH)
    with pytest.raises(ValueError, match="head size 64.*matmul"):
        flash_attention_forward(out, cupy.zeros((B, NH // 2, T), np.float32), qkv, NH // 2)
    with pytest.raises(ValueError, match="n_head"):
        flash_attention_forward(out, lse, qkv, 5)
    with pytest.raises(ValueError, match="out"):
        flash_attention_forward(cupy.zeros((B, T + 1, C), BF16), lse, qkv, NH)
    with pytest.raises(ValueError, match="lse"):
        flash_attention_forward(out, cupy.zeros((B, NH, T), BF16), qkv, NH)
    with pytest.raises(ValueError, match="qkv.*aligned"):
        flash_attention_forward(out, lse, cupy.zeros(B * T * 3 * C + 1, BF16)[1:]
                                .reshape(B, T, 3 * C), NH)
    dqkv = cupy.zeros_like(qkv)
    with pytest.raises(ValueError, match="scratch"):
        flash_attention_backward(dqkv, out, qkv, out, lse, NH, {})
    with pytest.raises(ValueError, match="scratch\\['D'\\]"):
        flash_attention_backward(dqkv, out, qkv, out, lse, NH,
                                 {"D": cupy.zeros((B, NH, T + 1), np.float32)})
    with pytest.raises(ValueError, match="dout"):
        flash_attention_backward(dqkv, qkv, qkv, out, lse, NH,
                                 {"D": cupy.zeros((B, NH, T), np.float32)})
