"""Data parallelism: gradients averaged during the backward, and ZeRO-1 optimizer sharding.

    dp = DataParallel(dist, model, zero=1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                      grad_clip=1.0, seed=1337)
    model.zero_grad()
    for micro in range(accum):                       # hooks only in the last micro-step
        model.forward_backward(x, y, 1 / accum, on_layer_grads=dp.hook if last else None)
    dp.finish()                                      # the compute stream waits for the reductions
    norm = dp.step(lr, step)                         # 0-d cupy f32 (lazy)

Averaging: every reduction uses NCCL_AVG (the sum over ranks times 1/world_size inside NCCL),
so the model's loss_scale stays 1/accum and W ranks with batch B train exactly as one GPU with
batch W*B.

Buckets and overlap: tensors are stacked over layers (llmc.model.params), so layers [lo, hi) of all
12 per-layer tensors are 12 contiguous slices. `plan_buckets` groups consecutive layers, from
the last one down, until a bucket holds `bucket_bytes` of gradients; the bucket is launched
from `hook(lo)`, i.e. as soon as the backward has finished layer lo, on a separate
non-blocking communication stream that first waits on an event recorded on the compute stream.
One NCCL group per bucket. The backward of layers < lo and the reduction of the bucket run
concurrently. The last bucket (wte, wpe, lnfw, lnfb: launched from hook(-1), after the encoder
backward) cannot overlap: for d12 that is wte's 38.6M of 124.5M values.

What a bucket's collective is:
- zero=0: all-reduce(avg) of its slices; every rank then runs GPUAdamW over the whole buffer on
  identical gradients (identical results: the update is deterministic).
- zero=1: this rank owns `shard_range(n, rank, W)` of the flat buffer (its GPUAdamW holds fp32
  master, m, v for that range only: optimizer memory / W). Each bucket slice is cut at the
  shard boundaries and every piece is reduced(avg) to its owner (ncclReduce, in place): the
  owner ends with the averaged gradient of its range, which is what a reduce-scatter computes,
  with the same bytes on the wire, but overlapped with the backward and with no padded copy of
  the gradients. `step` computes this range's squared norm, all-reduces it (sum) so every rank
  clips by the global norm, updates its range, then every owner broadcasts its range of the
  (bf16) params to the others in one NCCL group: the all-gather, in place in model.params.
Shards (`shard_range`): the buffer is padded (logically: nothing is allocated) to a multiple of
world_size * align elements, cut into world_size equal ranges; the last range is clipped at n,
so the last rank owns up to world_size * align - 1 fewer values. align keeps every shard start
16-byte aligned (the fused AdamW's 128-bit access) and NCCL-friendly.

World size 1: no buckets, no streams, no communication: GPUAdamW on the whole buffer.
Tests: pytest tests/test_zero.py (CPU: plans, shards, the ZeRO-1 step on simulated ranks);
pytest -m multigpu tests/test_multigpu.py (2 GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmc.model.params import param_specs

ALIGN = 128  # elements: 256 B of bf16, 512 B of fp32
DEFAULT_BUCKET_BYTES = 25 * 2**20
NON_LAYER = ("wte", "wpe", "lnfw", "lnfb")  # tensors not stacked over layers


def padded_size(n: int, world_size: int, align: int = ALIGN) -> int:
    """n rounded up to a multiple of world_size * align (the logical size shards cut)."""
    if n < 1 or world_size < 1 or align < 1:
        raise ValueError(f"n, world_size and align must be >= 1, got {n}, {world_size}, {align}")
    unit = world_size * align
    return -(-n // unit) * unit


def shard_range(n: int, rank: int, world_size: int, align: int = ALIGN) -> tuple:
    """(start, stop) of rank's shard of a flat buffer of n values; stop - start may be < the rest."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per = padded_size(n, world_size, align) // world_size
    start = min(rank * per, n)
    return start, min(start + per, n)


@dataclass(frozen=True)
class Bucket:
    hook: int      # launched from hook(hook): a layer index, or -1 after the embeddings
    slices: tuple  # ((start, stop), ...): sorted, disjoint, non-adjacent ranges of the flat buffer

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.slices)


def _merge(slices) -> tuple:
    out = []
    for a, b in sorted(s for s in slices if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def plan_buckets(mc, bucket_bytes: int, itemsize: int) -> list:
    """The buckets in launch order: layers L-1..0 grouped to >= bucket_bytes, then the rest."""
    if bucket_bytes < 1 or itemsize < 1:
        raise ValueError(f"bucket_bytes and itemsize must be >= 1, got {bucket_bytes}, {itemsize}")
    L = mc.n_layer
    specs = param_specs(mc)
    layered = [s for s in specs if s.name not in NON_LAYER]
    per_layer = [s.size // L for s in layered]
    layer_bytes = sum(per_layer) * itemsize
    buckets, hi = [], L
    for lo in reversed(range(L)):
        if (hi - lo) * layer_bytes >= bucket_bytes or lo == 0:
            buckets.append(Bucket(lo, _merge((s.offset + lo * p, s.offset + hi * p)
                                             for s, p in zip(layered, per_layer))))
            hi = lo
    buckets.append(Bucket(-1, _merge((s.offset, s.offset + s.size) for s in specs if s.name in NON_LAYER)))
    return buckets


def split_by_owner(slices, shards) -> list:
    """[(start, stop, owner)]: every slice cut at the shard boundaries, empty pieces dropped."""
    pieces = []
    for a, b in slices:
        for owner, (s, e) in enumerate(shards):
            lo, hi = max(a, s), min(b, e)
            if lo < hi:
                pieces.append((lo, hi, owner))
    return pieces


class DataParallel:
    """Gradient averaging (+ ZeRO-1) around a GPUAdamW; see the module docstring.

    make_optimizer(shard) -> an optimizer with GPUAdamW's interface (default: GPUAdamW(model,
    shard=shard, **adamw_kwargs)); shard is None (whole buffer) or (start, stop).
    """

    def __init__(self, dist, model, *, zero: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 align: int = ALIGN, make_optimizer=None, **adamw_kwargs):
        if zero not in (0, 1):
            raise ValueError(f"zero must be 0 or 1 (ZeRO stage), got {zero!r}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.dist, self.model = dist, model
        self.world_size, self.rank = dist.world_size, dist.rank
        self.zero = zero if self.world_size > 1 else 0
        n = model.params.size
        self.num_params = n
        if self.zero:
            self.shards = [shard_range(n, r, self.world_size, align) for r in range(self.world_size)]
            if any(a >= b for a, b in self.shards):
                raise ValueError(f"ZeRO-1 over {self.world_size} ranks leaves a rank without "
                                 f"parameters ({n} values); use --zero 0 for so small a model")
            self.shard = self.shards[self.rank]
        else:
            self.shards, self.shard = [(0, n)], (0, n)
        if make_optimizer is None:
            from llmc.training.gpu_optim import GPUAdamW

            def make_optimizer(shard):
                return GPUAdamW(model, shard=shard, **adamw_kwargs)
        elif adamw_kwargs:
            raise ValueError("give either make_optimizer or AdamW keyword arguments, not both")
        self.opt = make_optimizer(self.shard if self.zero else None)
        self.buckets, self._pieces, self._by_hook = [], [], {}
        self._launched, self._finished = set(), False
        if self.world_size > 1:
            import cupy
            self.buckets = plan_buckets(model.mc, bucket_bytes, model.grads.itemsize)
            covered = sum(b.size for b in self.buckets)
            if covered != n:
                raise ValueError(f"bucket plan covers {covered} of {n} gradients: does the model "
                                 "follow the llmc.model.params layout?")
            self._by_hook = {b.hook: i for i, b in enumerate(self.buckets)}
            self._pieces = [split_by_owner(b.slices, self.shards) if self.zero
                            else [(a, e, None) for a, e in b.slices] for b in self.buckets]
            self._comm = cupy.cuda.Stream(non_blocking=True)  # never implicitly synced with compute
            self._ready = [cupy.cuda.Event(disable_timing=True) for _ in self.buckets]
            self._done = cupy.cuda.Event(disable_timing=True)

    # ---- during the backward -----------------------------------------------------------------
    def hook(self, l: int) -> None:
        """on_layer_grads: layer l's gradients (l = -1: all remaining ones) are complete."""
        i = self._by_hook.get(l)
        if i is not None:
            self._launch(i)

    def _launch(self, i: int) -> None:
        import cupy
        if i in self._launched:
            raise RuntimeError(f"gradient bucket {i} (hook {self.buckets[i].hook}) launched twice in "
                               "one step: pass dp.hook only in the last micro-step, then call finish()")
        self._ready[i].record(cupy.cuda.get_current_stream())
        self._comm.wait_event(self._ready[i])
        grads, dist = self.model.grads, self.dist
        with dist.group():
            for a, b, owner in self._pieces[i]:
                if owner is None:
                    dist.all_reduce(grads[a:b], op="avg", stream=self._comm)
                else:
                    dist.reduce(grads[a:b], root=owner, op="avg", stream=self._comm)
        self._launched.add(i)

    def finish(self) -> None:
        """Reduce the buckets no hook launched; make the compute stream wait for all of them."""
        if self.world_size == 1:
            return
        import cupy
        for i in range(len(self.buckets)):
            if i not in self._launched:
                self._launch(i)
        self._done.record(self._comm)
        cupy.cuda.get_current_stream().wait_event(self._done)
        self._launched.clear()
        self._finished = True

    # ---- the optimizer -----------------------------------------------------------------------
    def step(self, lr: float, step: int):
        """Clip by the global norm and update (this rank's shard, then all-gather); -> norm."""
        norm = self.grad_norm()
        self.update(lr, step)
        return norm

    def grad_norm(self):
        """The global pre-clip gradient norm (0-d cupy f32, lazy); `update` or `skip` follows."""
        if self.world_size > 1 and not self._finished:
            raise RuntimeError("DataParallel.step: call finish() after the backward first (the "
                               "gradients are not averaged yet)")
        if not self.zero:
            return self.opt.grad_norm()
        start, stop = self.shard
        return self.opt.grad_norm(self.model.grads[start:stop],
                                  norm_reduce=lambda norm_sq: self.dist.all_reduce(norm_sq, op="sum"))

    def update(self, lr: float, step: int) -> None:
        """Update this rank's shard with the norm from grad_norm, then share the new params."""
        self._finished = False
        if not self.zero:
            self.opt.update(lr, step)
            return
        start, stop = self.shard
        self.opt.update(lr, step, grads=self.model.grads[start:stop])
        params = self.model.params
        with self.dist.group():
            for owner, (a, b) in enumerate(self.shards):
                self.dist.broadcast(params[a:b], root=owner)
        hook = getattr(self.model, "params_updated", None)  # fp8 weight copies follow the params
        if hook is not None:
            hook()

    def skip(self) -> None:
        """Drop this step's gradients (the outlier guard): weights and moments stay as they are."""
        self._finished = False

    def init_from_params(self) -> None:
        """After model.load_params: the optimizer's fp32 master = the working params."""
        self.opt.init_from_params()

    def optimizer_bytes(self) -> int:
        """Device bytes of optimizer state on this rank (fp32 master unless fp32 model, m, v)."""
        opt = self.opt
        master = 0 if opt.master is opt.params else opt.master.nbytes
        return int(master + opt.m.nbytes + opt.v.nbytes)

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's optimizer state (host arrays) + zero, world_size, num_params."""
        d = dict(self.opt.state_dict())
        d.update(zero=np.array(self.zero, dtype=np.int64),
                 world_size=np.array(self.world_size, dtype=np.int64),
                 num_params=np.array(self.num_params, dtype=np.int64))
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore; refuses state sharded for another world size (a ZeRO-0 state fits any)."""
        d = dict(d)
        meta = {}
        for key in ("zero", "world_size", "num_params"):
            if key not in d:
                raise ValueError(f"optimizer state has no {key!r}: not written by llmc.dist.zero.DataParallel")
            meta[key] = int(np.asarray(d.pop(key)))
        if meta["num_params"] != self.num_params:
            raise ValueError(f"optimizer state is for {meta['num_params']} parameters, this model "
                             f"has {self.num_params}: was it saved for another model?")
        if meta["zero"] == 1 and (meta["world_size"] != self.world_size or not self.zero):
            raise ValueError(
                f"optimizer state was sharded over {meta['world_size']} ranks (ZeRO-1); this run "
                f"has {self.world_size} rank(s) with zero={self.zero}: resume with "
                f"{meta['world_size']} GPUs and --zero 1")
        if meta["zero"] == 0 and self.zero:  # full state: keep this rank's range
            start, stop = self.shard
            d = {k: np.asarray(d[k])[start:stop] for k in ("master", "m", "v")}
            d["shard"] = np.array(self.shard, dtype=np.int64)
        self.opt.load_state_dict(d)
