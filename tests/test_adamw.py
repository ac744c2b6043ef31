"""Optimizer kernels on the GPU (llmc/ops/adamw.py): gradient norm and fused AdamW.

global_norm_squared against a float64 NumPy sum of squares (sizes 1, 7, a tail, 10M and the
124M of GPT-2 d12), bitwise deterministic. adamw_update against llmc.training.optim.adamw_step in float64
on the host (same clip factor from the device norm): fp32 master, m, v and the size of the
update in fp32 tolerance; bf16 params are one of the two bf16 neighbours of the new master
(stochastic rounding). Also: fp32 mode (master=None, in place), a buffer whose length is not a
multiple of the pack, weight decay exactly on the decayed ranges and nowhere else, a ZeRO split
(two shards with their offsets give bit-for-bit the unsharded result), and stochastic rounding
being unbiased (the mean of a million rounded copies of a value is that value) with bits that
change with the step.

Run: pytest tests/test_adamw.py        (the gpu tests skip without a CUDA device)
"""
import math

import numpy as np
import pytest

from llmc.training import optim

from llmc.model import params
from llmc.config import ModelConfig
from tests.gpu_arrays import DTYPES, device, host_bits
from tests.tolerances import assert_close

MC = ModelConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=500, padded_vocab_size=512,
                 block_size=64)
HP = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def norm_sq(grads):
    """Device fp32 (1,) sum of squares of a device gradient buffer."""
    import cupy
    from llmc.ops.adamw import global_norm_scratch_size, global_norm_squared
    out = cupy.full(1, np.nan, dtype=np.float32)
    scratch = cupy.full(global_norm_scratch_size(grads.size) // 4, np.nan, dtype=np.float32)
    global_norm_squared(out, grads, scratch)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 7, 4099, 10_000_003,
                               params.num_params(ModelConfig(n_layer=12, n_head=12, n_embd=768))])
def test_global_norm_squared(n, dtype):
    g = np.random.default_rng(n).standard_normal(n, dtype=np.float32).astype(DTYPES[dtype])
    d = device(g)
    got = norm_sq(d)
    want = optim.global_norm(g.astype(np.float32)) ** 2
    assert_close(got.get(), np.array([want]), "fp32", "norm_sq")
    again = norm_sq(d)
    assert got.get().view(np.uint32)[0] == again.get().view(np.uint32)[0], \
        "norm_sq not deterministic"


def make_state(n, dtype, seed, grad_scale=1.0):
    rng = np.random.default_rng(seed)
    master = (0.5 * rng.standard_normal(n)).astype(np.float32)
    grads = (grad_scale * rng.standard_normal(n)).astype(DTYPES[dtype])
    m = (0.01 * rng.standard_normal(n)).astype(np.float32)
    v = (1e-4 * rng.random(n)).astype(np.float32)
    return master, grads, m, v


def run_update(master, grads, m, v, dtype, *, step, grad_clip, seed, ranges, keep_master=True):
    """Upload, run one adamw_update over the whole buffer; returns the device arrays."""
    import cupy
    from llmc.ops.adamw import adamw_update, decay_table
    d_params = device(master.astype(DTYPES[dtype]))
    d_master = cupy.asarray(master) if keep_master else None
    d_grads, d_m, d_v = device(grads), cupy.asarray(m), cupy.asarray(v)
    ns = norm_sq(d_grads)
    adamw_update(d_params, d_master, d_grads, d_m, d_v, ns, step=step, grad_clip=grad_clip,
                 seed=seed, ranges=decay_table(ranges), **HP)
    return d_params, d_master, d_m, d_v, float(ns.get()[0])


def reference_update(master, grads, m, v, ns, *, step, grad_clip, decay):
    p64, m64, v64 = (a.astype(np.float64) for a in (master, m, v))
    scale = optim.clip_scale(math.sqrt(ns), grad_clip)
    optim.adamw_step(p64, grads.astype(np.float64), m64, v64, t=step, decay=decay,
                     grad_scale=scale, **HP)
    return p64, m64, v64


def assert_stochastically_rounded(params_bf16_bits, master_f32):
    """Each bf16 value is the truncation of its fp32 master or the next bf16 away from zero."""
    mb = master_f32.view(np.uint32)
    lo = mb & np.uint32(0xFFFF0000)
    hi = lo + np.uint32(0x10000)
    got = params_bf16_bits.astype(np.uint32) << np.uint32(16)
    exact = (mb & np.uint32(0xFFFF)) == 0
    ok = np.where(exact, got == lo, (got == lo) | (got == hi))
    assert np.all(ok), f"params: {np.sum(~ok)} values are not a neighbour of their master"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("grad_clip", [1.0, 0.0], ids=["clip1", "noclip"])
def test_update_matches_reference(grad_clip, dtype):
    n = params.num_params(MC)
    master, grads, m, v = make_state(n, dtype, seed=1)
    d_params, d_master, d_m, d_v, ns = run_update(
        master, grads, m, v, dtype, step=3, grad_clip=grad_clip, seed=42,
        ranges=params.decay_ranges(MC))
    p64, m64, v64 = reference_update(master, grads, m, v, ns, step=3, grad_clip=grad_clip,
                                     decay=params.decay_mask(MC))
    got_master = d_master.get()
    assert_close(got_master, p64, "fp32", "master")
    assert_close(got_master.astype(np.float64) - master, p64 - master, "fp32", "master update")
    assert_close(d_m.get(), m64, "fp32", "m")
    assert_close(d_v.get(), v64, "fp32", "v")
    if dtype == "bf16":
        assert_stochastically_rounded(host_bits(d_params), got_master)
    else:
        assert np.array_equal(d_params.get(), got_master), "fp32 params must equal the master"


@pytest.mark.gpu
def test_fp32_in_place_and_tail():
    """master=None in fp32 mode; n = 1003 leaves a partial pack at the end."""
    n = 1003
    master, grads, m, v = make_state(n, "fp32", seed=2)
    ranges = [(0, 500, True), (500, 700, False), (700, n, True)]
    decay = np.zeros(n, dtype=bool)
    decay[:500] = decay[700:] = True
    d_params, _, d_m, d_v, ns = run_update(master, grads, m, v, "fp32", step=1, grad_clip=1.0,
                                           seed=0, ranges=ranges, keep_master=False)
    p64, m64, v64 = reference_update(master, grads, m, v, ns, step=1, grad_clip=1.0, decay=decay)
    assert_close(d_params.get(), p64, "fp32", "params")
    assert_close(d_params.get().astype(np.float64) - master, p64 - master, "fp32", "update")
    assert_close(d_m.get(), m64, "fp32", "m")
    assert_close(d_v.get(), v64, "fp32", "v")


@pytest.mark.gpu
def test_weight_decay_only_on_decayed_ranges():
    """Zero gradients and moments: the update is exactly the decay term, nowhere else."""
    n = params.num_params(MC)
    master, grads, m, v = make_state(n, "fp32", seed=3)
    grads[:] = 0
    m[:] = 0
    v[:] = 0
    d_params, _, _, _, _ = run_update(master, grads, m, v, "fp32", step=5, grad_clip=1.0, seed=0,
                                      ranges=params.decay_ranges(MC), keep_master=False)
    got = d_params.get()
    mask = params.decay_mask(MC)
    assert np.array_equal(got[~mask], master[~mask]), "undecayed tensors must not move"
    shrink = master[mask].astype(np.float64) * (1 - HP["lr"] * HP["weight_decay"])
    assert_close(got[mask], shrink, "fp32", "decayed tensors")
    moved = master[mask] != 0
    assert np.all(got[mask][moved] != master[mask][moved]), "a decayed weight did not move"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weight_decay_on_awkward_ranges(dtype):
    """Ranges shorter than a pack, several inside one pack, given out of order, one at the
    very end: decay lands exactly on them (zero gradients: the update is the decay alone)."""
    n = 211
    ranges = [(150, 211, True), (1, 2, True), (3, 5, True), (5, 6, True), (7, 19, True),
              (19, 40, False), (40, 41, True), (100, 149, True)]
    decay = np.zeros(n, dtype=bool)
    for a, b, d in ranges:
        decay[a:b] = d
    master, grads, m, v = make_state(n, dtype, seed=5)
    grads[:] = 0
    m[:] = 0
    v[:] = 0
    _, d_master, _, _, _ = run_update(master, grads, m, v, dtype, step=2, grad_clip=0.0, seed=0,
                                      ranges=ranges)
    got = d_master.get()
    assert np.array_equal(got[~decay], master[~decay]), \
        f"undecayed elements moved: {np.flatnonzero(got[~decay] != master[~decay])}"
    shrink = master[decay].astype(np.float64) * (1 - HP["lr"] * HP["weight_decay"])
    assert_close(got[decay], shrink, "fp32", "decayed elements")


def test_decay_table_rejects_bad_ranges():
    from llmc.ops.adamw import decay_table
    with pytest.raises(ValueError, match="overlap"):
        decay_table([(0, 10, True), (5, 20, True)])
    with pytest.raises(ValueError, match="start < stop"):
        decay_table([(10, 10, True)])
    with pytest.raises(ValueError, match="start < stop"):
        decay_table([(-1, 4, True)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_shards_equal_unsharded(dtype):
    import cupy
    from llmc.ops.adamw import adamw_update, decay_table
    n = params.num_params(MC)
    split = (params.param_specs(MC)[4].offset + 8 * 101)  # inside qkvw (decayed)
    master, grads, m, v = make_state(n, dtype, seed=4)
    ranges = params.decay_ranges(MC)
    full = run_update(master, grads, m, v, dtype, step=2, grad_clip=1.0, seed=9, ranges=ranges)
    d_params = device(master.astype(DTYPES[dtype]))
    d_master, d_grads = cupy.asarray(master), device(grads)
    d_m, d_v = cupy.asarray(m), cupy.asarray(v)
    ns = norm_sq(d_grads)
    table = decay_table(ranges)
    for lo, hi in ((0, split), (split, n)):
        adamw_update(d_params[lo:hi], d_master[lo:hi], d_grads[lo:hi], d_m[lo:hi], d_v[lo:hi], ns,
                     step=2, grad_clip=1.0, seed=9, ranges=table, offset=lo, **HP)
    for name, a, b in (("params", full[0], d_params), ("master", full[1], d_master),
                       ("m", full[2], d_m), ("v", full[3], d_v)):
        assert np.array_equal(host_bits(a), host_bits(b)), f"{name}: sharded != unsharded"


@pytest.mark.gpu
@pytest.mark.parametrize("x", [1.0 + 2.0 ** -7 / 3, -(1.0 + 0.75 * 2.0 ** -7), 3.0e-3])
def test_stochastic_rounding_unbiased(x):
    """lr = 0 keeps the master at x; a million bf16 copies must average to x."""
    import cupy
    from llmc.ops.adamw import adamw_update, decay_table
    n = 1 << 20
    x32 = np.float32(x)
    master = cupy.full(n, x32, dtype=np.float32)
    p = cupy.zeros(n, dtype=DTYPES["bf16"])
    grads = device(np.random.default_rng(0).standard_normal(n).astype(DTYPES["bf16"]))
    m, v = cupy.zeros(n, np.float32), cupy.zeros(n, np.float32)
    ns = norm_sq(grads)
    hp = dict(HP, lr=0.0)
    table = decay_table([(0, n, True)])
    adamw_update(p, master, grads, m, v, ns, step=1, grad_clip=1.0, seed=1, ranges=table, **hp)
    first = host_bits(p)
    vals = first.view(DTYPES["bf16"]).astype(np.float64)
    assert np.all(master.get() == x32), "lr = 0 must leave the master unchanged"
    assert_stochastically_rounded(first, master.get())
    lo, hi = np.min(vals), np.max(vals)
    step_size = abs(hi - lo)
    frac = abs(float(x32) - lo) / step_size
    sd = step_size * math.sqrt(frac * (1 - frac) / n)
    assert abs(vals.mean() - float(x32)) < 6 * sd, (
        f"mean of rounded values {vals.mean():.8g} vs {float(x32):.8g} (sd {sd:.2e}): biased")
    adamw_update(p, master, grads, m, v, ns, step=2, grad_clip=1.0, seed=1, ranges=table, **hp)
    assert not np.array_equal(first, host_bits(p)), "rounding bits must change with the step"


@pytest.mark.gpu
def test_validation():
    import cupy
    from llmc.ops.adamw import adamw_update, decay_table, global_norm_squared
    f32, bf16 = np.float32, DTYPES["bf16"]
    n = 64
    p, g = cupy.zeros(n, bf16), cupy.zeros(n, bf16)
    master, m, v = cupy.zeros(n, f32), cupy.zeros(n, f32), cupy.zeros(n, f32)
    ns = cupy.zeros(1, f32)
    table = decay_table([(0, n, True)])
    kw = dict(step=1, grad_clip=1.0, seed=0, ranges=table, **HP)
    with pytest.raises(ValueError, match="master"):
        adamw_update(p, None, g, m, v, ns, **kw)
    with pytest.raises(ValueError, match="grads"):
        adamw_update(p, master, cupy.zeros(n, f32), m, v, ns, **kw)
    with pytest.raises(ValueError, match="^m:"):
        adamw_update(p, master, g, cupy.zeros(n - 1, f32), v, ns, **kw)
    with pytest.raises(ValueError, match="ranges"):
        adamw_update(p, master, g, m, v, ns, **dict(kw, ranges=[(0, n, True)]))
    with pytest.raises(ValueError, match="step"):
        adamw_update(p, master, g, m, v, ns, **dict(kw, step=0))
    with pytest.raises(ValueError, match="aligned"):
        adamw_update(p[1:9], master[1:9], g[1:9], m[1:9], v[1:9], ns, **kw)
    with pytest.raises(ValueError, match="scratch"):
        global_norm_squared(ns, g, cupy.zeros(0, f32))
