"""ZeRO-1 sharding and data-parallel AdamW (llmc.dist.zero) on the CPU, with simulated ranks.

- shard_range: padding, coverage, disjointness, alignment, uneven sizes;
- plan_buckets: every gradient in exactly one bucket, and a bucket launched from hook(l) holds
  only gradients that are complete when the backward reaches l;
- the ZeRO-1 step in NumPy over W = 1, 2, 3, 4, 8 ranks (reduce to the owner, adamw_step on each
  shard clipped by the all-reduced norm, all-gather) equals llmc.training.optim.AdamW on the averaged
  gradients, over several steps;
- DataParallel itself, each rank a thread, with a NumPy model whose backward calls the hooks
  layer by layer, NCCL replaced by an in-process fabric and CuPy streams by no-ops: zero=0 and
  zero=1 equal one-GPU AdamW; state_dict round trip and world-size refusal.

    pytest tests/test_zero.py
"""
import contextlib
import math
import sys
import threading
import types

import numpy as np
import pytest

from llmc.config import ModelConfig
from llmc.training.optim import AdamW, adamw_step, clip_scale
from llmc.model.params import decay_mask, num_params, param_specs
from llmc.dist.zero import (ALIGN, NON_LAYER, DataParallel, padded_size, plan_buckets, shard_range,
                       split_by_owner)

MC = ModelConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=60, padded_vocab_size=64, block_size=8)
HP = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)


# ---------------------------------------------------------------------------------------------
# shards

@pytest.mark.parametrize("n", [1, 7, 1000, 4097, 124_475_904])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("align", [1, 8, ALIGN])
def test_shards_cover_disjointly(n, world, align):
    padded = padded_size(n, world, align)
    assert padded % (world * align) == 0 and n <= padded < n + world * align
    shards = [shard_range(n, r, world, align) for r in range(world)]
    pos = 0
    for start, stop in shards:
        assert start == pos and start <= stop  # consecutive: disjoint, no hole
        assert start % align == 0 or start == n
        pos = stop
    assert pos == n
    per = padded // world
    assert all(stop - start == per for start, stop in shards[:-1] if stop < n)


def test_uneven_last_shard_is_shorter():
    n, world = 1000, 3
    shards = [shard_range(n, r, world, 8) for r in range(world)]
    assert shards == [(0, 336), (336, 672), (672, 1000)]  # padded to 1008: 3 x 336
    assert shard_range(10, 3, 4, 8) == (10, 10)  # tiny buffer: rank 3 owns nothing


def test_shard_errors():
    with pytest.raises(ValueError, match="rank must be in"):
        shard_range(10, 2, 2)
    with pytest.raises(ValueError, match=">= 1"):
        padded_size(0, 2)


# ---------------------------------------------------------------------------------------------
# buckets

def _ready_hook(mc):
    """hook index at which each flat element's gradient is complete (-1: after the embeddings)."""
    ready = np.full(num_params(mc), -1, dtype=np.int64)
    for s in param_specs(mc):
        if s.name not in NON_LAYER:
            per = s.size // mc.n_layer
            for l in range(mc.n_layer):
                ready[s.offset + l * per:s.offset + (l + 1) * per] = l
    return ready


@pytest.mark.parametrize("mc", [MC, ModelConfig(12, 12, 768)])
@pytest.mark.parametrize("bucket_bytes", [1, 1000, 25 * 2**20, 10**12])
def test_bucket_plan(mc, bucket_bytes):
    buckets = plan_buckets(mc, bucket_bytes, 2)
    n = num_params(mc)
    seen = np.zeros(n, dtype=np.int64)
    ready = _ready_hook(mc)
    hooks = [b.hook for b in buckets]
    assert hooks == sorted(hooks, reverse=True) and hooks[-1] == -1 and hooks[-2] == 0
    for b in buckets:
        for a, e in b.slices:
            seen[a:e] += 1
            if b.hook >= 0:  # launched from hook(l): only layers >= l, all finished by then
                assert ready[a:e].min() >= b.hook
            else:
                assert (ready[a:e] == -1).all()
        assert all(b.slices[i][1] < b.slices[i + 1][0] for i in range(len(b.slices) - 1))
    assert (seen == 1).all()
    layer_buckets = buckets[:-2]  # all but the one at layer 0 and the embeddings reach the size
    assert all(b.size * 2 >= bucket_bytes for b in layer_buckets)
    if bucket_bytes == 1:
        assert len(buckets) == mc.n_layer + 1
    if bucket_bytes == 10**12:
        assert len(buckets) == 2


def test_split_by_owner_partitions():
    n, world = num_params(MC), 3
    shards = [shard_range(n, r, world, 8) for r in range(world)]
    for b in plan_buckets(MC, 500, 4):
        pieces = split_by_owner(b.slices, shards)
        covered = np.zeros(n, dtype=np.int64)
        for a, e, owner in pieces:
            s, t = shards[owner]
            assert s <= a < e <= t
            covered[a:e] += 1
        want = np.zeros(n, dtype=np.int64)
        for a, e in b.slices:
            want[a:e] = 1
        assert (covered == want).all()


# ---------------------------------------------------------------------------------------------
# the ZeRO-1 step, as math over simulated ranks

@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zero1_step_equals_single_rank(world):
    rng = np.random.default_rng(world)
    n = num_params(MC)
    p0 = rng.standard_normal(n)
    decay = decay_mask(MC)
    ref = AdamW(p0.copy(), MC, **HP)
    shards = [shard_range(n, r, world, 8) for r in range(world)]
    params = [p0.copy() for _ in range(world)]       # every rank's full working copy
    m = [np.zeros(e - s) for s, e in shards]           # each rank's moments: its shard only
    v = [np.zeros(e - s) for s, e in shards]
    for step in range(4):
        lr = 1e-2 * (step + 1)
        scale = 0.3 if step == 1 else 3.0  # one step under the clip, the others clipped
        grads = [rng.standard_normal(n) * scale for _ in range(world)]  # each rank's own batch
        ref_norm = ref.step(sum(grads) / world, lr, step)
        # reduce-scatter: each rank receives the averaged gradient of its shard
        shard_grads = [sum(g[s:e] for g in grads) / world for s, e in shards]
        # the norm: local squares, all-reduced
        norm = math.sqrt(sum(float(np.dot(g, g)) for g in shard_grads))
        assert norm == pytest.approx(ref_norm, rel=1e-12)
        for r, (s, e) in enumerate(shards):
            adamw_step(params[r][s:e], shard_grads[r], m[r], v[r], lr=lr, beta1=HP["beta1"],
                       beta2=HP["beta2"], eps=HP["eps"], weight_decay=HP["weight_decay"],
                       t=step + 1, decay=decay[s:e], grad_scale=clip_scale(norm, HP["grad_clip"]))
        # all-gather: every rank takes each owner's updated shard
        for r in range(world):
            for owner, (s, e) in enumerate(shards):
                params[r][s:e] = params[owner][s:e]
        for r in range(world):
            np.testing.assert_allclose(params[r], ref.params, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.concatenate(m), ref.m, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# DataParallel on threads: fake CuPy streams, an in-process NCCL, a NumPy model and optimizer

class _FakeStream:
    ptr = 1

    def wait_event(self, event):
        pass


class _FakeEvent:
    def record(self, stream=None):
        pass


def _fake_cupy():
    cuda = types.SimpleNamespace(Stream=lambda non_blocking=False: _FakeStream(),
                                 Event=lambda disable_timing=False: _FakeEvent(),
                                 get_current_stream=_FakeStream)
    return types.SimpleNamespace(cuda=cuda)


class _Fabric:
    """What NCCL does, for W threads: each collective meets at a barrier, rank 0 computes."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots = [None] * world
        self.log = []

    def run(self, rank, op):
        self.slots[rank] = op
        self.barrier.wait()
        if rank == 0:
            kinds = {(o[0], o[1].size, o[2], o[3]) for o in self.slots}
            assert len(kinds) == 1, f"ranks issued different collectives: {kinds}"
            kind, _, root, red = self.slots[0]
            bufs = [o[1] for o in self.slots]
            self.log.append((kind, bufs[0].size, root, red))
            if kind == "broadcast":
                for b in bufs:
                    if b is not bufs[root]:
                        b[...] = bufs[root]
            else:
                total = sum(b.astype(np.float64) for b in bufs)
                out = total / self.world if red == "avg" else total
                for r, b in enumerate(bufs):
                    if kind == "all_reduce" or r == root:
                        b[...] = out
        self.barrier.wait()


class _FakeDist:
    def __init__(self, fabric, rank):
        self.fabric, self.rank, self.world_size = fabric, rank, fabric.world
        self._group = None

    def _do(self, op):
        if self._group is not None:
            self._group.append(op)
        else:
            self.fabric.run(self.rank, op)

    @contextlib.contextmanager
    def group(self):
        self._group = []
        yield
        ops, self._group = self._group, None
        for op in ops:
            self.fabric.run(self.rank, op)

    def all_reduce(self, buf, op="sum", stream=None):
        self._do(("all_reduce", buf, None, op))

    def reduce(self, buf, root, op="sum", stream=None):
        self._do(("reduce", buf, root, op))

    def broadcast(self, buf, root=0, stream=None):
        self._do(("broadcast", buf, root, None))


class _NumpyModel:
    """Flat float64 params/grads; backward writes each rank's gradient layer by layer."""

    def __init__(self, mc, params):
        self.mc = mc
        self.params = params.copy()
        self.grads = np.zeros_like(params)
        self.ready = _ready_hook(mc)

    def backward(self, full_grad, hook):
        for l in list(reversed(range(self.mc.n_layer))) + [-1]:
            sel = self.ready == l
            self.grads[sel] += full_grad[sel]
            if hook is not None:
                hook(l)


class _NumpyAdamW:
    """GPUAdamW's interface over NumPy (llmc.training.optim.adamw_step on the shard)."""

    def __init__(self, model, shard, **hp):
        n = model.params.size
        self.model, self.shard = model, (0, n) if shard is None else tuple(shard)
        s, e = self.shard
        self.params = self.master = model.params[s:e]
        self.m, self.v = np.zeros(e - s), np.zeros(e - s)
        self.decay = decay_mask(model.mc)[s:e]
        self.hp = hp

    def init_from_params(self):
        pass

    def step(self, lr, step, grads=None, norm_reduce=None):
        norm = self.grad_norm(grads, norm_reduce)
        self.update(lr, step, grads)
        return norm

    def grad_norm(self, grads=None, norm_reduce=None):
        s, e = self.shard
        g = self.model.grads[s:e] if grads is None else grads
        norm_sq = np.array([float(np.dot(g, g))])
        if norm_reduce is not None:
            norm_reduce(norm_sq)
        self.norm = math.sqrt(norm_sq[0])
        return self.norm

    def update(self, lr, step, grads=None):
        s, e = self.shard
        g = self.model.grads[s:e] if grads is None else grads
        hp = self.hp
        adamw_step(self.params, g, self.m, self.v, lr=lr, beta1=hp["beta1"], beta2=hp["beta2"],
                   eps=hp["eps"], weight_decay=hp["weight_decay"], t=step + 1, decay=self.decay,
                   grad_scale=clip_scale(self.norm, hp["grad_clip"]))

    def state_dict(self):
        return {"master": self.master.copy(), "m": self.m.copy(), "v": self.v.copy(),
                "shard": np.array(self.shard, dtype=np.int64)}

    def load_state_dict(self, d):
        assert tuple(np.asarray(d["shard"])) == self.shard, "shard mismatch"
        self.master[...] = d["master"]
        self.m[...] = d["m"]
        self.v[...] = d["v"]


def _run_ranks(world, zero, steps, p0, grads_per_step, bucket_bytes=300, accum=1, align=8,
               skip_steps=()):
    fabric = _Fabric(world)
    results = [None] * world
    errors = []

    def rank_main(rank):
        try:
            model = _NumpyModel(MC, p0)
            dp = DataParallel(_FakeDist(fabric, rank), model, zero=zero, bucket_bytes=bucket_bytes,
                              align=align, make_optimizer=lambda shard: _NumpyAdamW(model, shard, **HP))
            norms = []
            for step in range(steps):
                model.grads[...] = 0
                for micro in range(accum):
                    g = grads_per_step[step][rank][micro]
                    model.backward(g / accum, dp.hook if micro == accum - 1 else None)
                dp.finish()
                if step in skip_steps:  # the outlier guard's path: norm, then skip
                    norms.append(dp.grad_norm())
                    dp.skip()
                else:
                    norms.append(dp.step(1e-2, step))
            results[rank] = (model.params.copy(), norms, dp)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors.append((rank, e))
            fabric.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0][1]
    return results, fabric


@pytest.fixture
def fake_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("accum, bucket_bytes", [(1, 300), (2, 300), (1, 40_000)])
def test_data_parallel_equals_one_gpu(fake_cupy, world, zero, accum, bucket_bytes):
    """bucket_bytes 300: a bucket per layer; 40000: layers 1-2 share one, launched from hook(1)."""
    rng = np.random.default_rng(10 * world + zero)
    n = num_params(MC)
    p0 = rng.standard_normal(n)
    steps = 3
    grads = [[[rng.standard_normal(n) * (0.2 if s == 0 else 2.0) for _ in range(accum)]
              for _ in range(world)] for s in range(steps)]
    results, fabric = _run_ranks(world, zero, steps, p0, grads, accum=accum, bucket_bytes=bucket_bytes)
    ref = AdamW(p0.copy(), MC, **HP)
    ref_norms = [ref.step(sum(sum(g) / accum for g in grads[s]) / world, 1e-2, s) for s in range(steps)]
    for params, norms, dp in results:
        np.testing.assert_allclose(params, ref.params, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(norms, ref_norms, rtol=1e-10)
        if world > 1:
            assert dp.zero == zero and len(dp.buckets) > 2  # several buckets: real overlap plan
    if world > 1:
        kinds = {k for k, *_ in fabric.log}
        want = {"reduce", "all_reduce", "broadcast"} if zero else {"all_reduce"}
        assert kinds == want
        assert all(red in ("avg", None) for k, _, _, red in fabric.log if k != "all_reduce" or not zero)
    else:
        assert fabric.log == []


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("world", [1, 3])
def test_skipped_step_keeps_weights(fake_cupy, world, zero):
    """grad_norm + skip (the outlier guard): the global norm is still reported, the weights and
    moments stay, and the next step runs as if the skipped one had not happened."""
    rng = np.random.default_rng(7 + world)
    n = num_params(MC)
    p0 = rng.standard_normal(n)
    grads = [[[rng.standard_normal(n)] for _ in range(world)] for _ in range(3)]
    results, _ = _run_ranks(world, zero, 3, p0, grads, skip_steps=(1,))
    ref = AdamW(p0.copy(), MC, **HP)
    ref_norms = []
    for s in range(3):
        g = sum(gr[0] for gr in grads[s]) / world
        if s == 1:
            from llmc.training.optim import global_norm
            ref_norms.append(global_norm(g))
        else:
            ref_norms.append(ref.step(g, 1e-2, s))
    for params, norms, _ in results:
        np.testing.assert_allclose(params, ref.params, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(norms, ref_norms, rtol=1e-10)


def test_zero1_optimizer_memory_shrinks(fake_cupy):
    n = num_params(MC)
    p0 = np.zeros(n)
    grads = [[[np.ones(n)] for _ in range(4)]]
    (res1, _), (res4, _) = _run_ranks(1, 0, 1, p0, [[[np.ones(n)]]]), _run_ranks(4, 1, 1, p0, grads)
    one = res1[0][2].optimizer_bytes()
    per_rank = [r[2].optimizer_bytes() for r in res4]
    assert one == 2 * n * 8  # m, v (float64 here; the master is the params)
    assert sum(per_rank) == one and max(per_rank) <= one / 4 + 2 * 8 * 8 * 4


def test_state_dict_roundtrip_and_refusals(fake_cupy):
    n = num_params(MC)
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(n)
    grads = [[[rng.standard_normal(n)] for _ in range(2)] for _ in range(2)]
    results, _ = _run_ranks(2, 1, 2, p0, grads)
    states = [r[2].state_dict() for r in results]
    assert int(states[0]["world_size"]) == 2 and int(states[0]["zero"]) == 1
    assert tuple(states[1]["shard"]) == results[1][2].shard

    # the same world size restores exactly
    fabric = _Fabric(2)
    model = _NumpyModel(MC, p0)
    dp = DataParallel(_FakeDist(fabric, 1), model, zero=1, bucket_bytes=300, align=8,
                      make_optimizer=lambda shard: _NumpyAdamW(model, shard, **HP))
    dp.load_state_dict(states[1])
    np.testing.assert_array_equal(dp.opt.m, results[1][2].opt.m)

    # another world size, or ZeRO-1 state into a zero=0 run: refused, naming the fix
    fabric3 = _Fabric(3)
    model3 = _NumpyModel(MC, p0)
    dp3 = DataParallel(_FakeDist(fabric3, 0), model3, zero=1, bucket_bytes=300, align=8,
                       make_optimizer=lambda shard: _NumpyAdamW(model3, shard, **HP))
    with pytest.raises(ValueError, match="sharded over 2 ranks.*resume with 2 GPUs and --zero 1"):
        dp3.load_state_dict(states[0])
    with pytest.raises(ValueError, match="for 5 parameters"):
        dp3.load_state_dict(dict(states[0], num_params=np.array(5)))

    # a zero=0 state (full buffer) loads into a ZeRO-1 rank: it keeps its range
    full, _ = _run_ranks(1, 0, 1, p0, [[[rng.standard_normal(n)]]])
    state0 = full[0][2].state_dict()
    dp3.load_state_dict(state0)
    s, e = dp3.shard
    np.testing.assert_array_equal(dp3.opt.m, state0["m"][s:e])


def test_misuse_is_reported(fake_cupy):
    n = num_params(MC)
    p0 = np.zeros(n)
    fabric = _Fabric(1)
    model = _NumpyModel(MC, p0)
    with pytest.raises(ValueError, match="zero must be 0 or 1"):
        DataParallel(_FakeDist(fabric, 0), model, zero=2, make_optimizer=lambda s: None)

    class Two(_FakeDist):  # world size 2, only this rank: fails before any collective
        world_size = 2

    d = Two(_Fabric(1), 0)
    d.world_size = 2
    dp = DataParallel(d, model, zero=0, bucket_bytes=300,
                      make_optimizer=lambda shard: _NumpyAdamW(model, shard, **HP))
    with pytest.raises(RuntimeError, match="call finish"):
        dp.step(1e-3, 0)
    tiny = _NumpyModel(MC, p0)
    d8 = Two(_Fabric(1), 0)
    d8.world_size = 8
    with pytest.raises(ValueError, match="leaves a rank without parameters"):
        DataParallel(d8, tiny, zero=1, align=n, make_optimizer=lambda s: None)
