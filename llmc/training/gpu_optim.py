"""AdamW on the GPU for a GPUModel: fp32 master weights and moments, one fused update launch.

    opt = GPUAdamW(model, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
                   seed=1337, shard=None)
    norm = opt.step(lr, step)          # step counts from 0 (AdamW's t = step + 1); norm is lazy

Design:
- State on the device, fp32: `master` (bf16 models only: the fp32 copy the update is applied
  to; an fp32 model's params are their own master), `m`, `v`. With `shard=(start, stop)` they
  cover only that range of the flat buffer (ZeRO-1): this rank updates model.params[start:stop]
  and another rank the rest (the distributed layer all-gathers the params afterwards).
- One step = global_norm_squared over the gradients of the range (deterministic two-pass),
  `norm_reduce(norm_sq)` (the distributed layer sums the shards' squares across ranks), then
  one `adamw_update` launch: clip factor from the device-side norm (no host sync), AdamW with
  decay only on the matrices, bf16 params written from the master by stochastic rounding whose
  bits come from (seed, t, global index): a sharded update equals the unsharded one.
- Nothing is allocated in `step`: the norm outputs are preallocated; the returned 0-d norm is
  overwritten by the next step.
- After an update of the whole buffer, `model.params_updated()` (when the model has it) refreshes
  what is derived from the weights (fp8 weight copies); a sharded update leaves that to the
  distributed layer, after its all-gather.
- `state_dict()` -> host {"master", "m", "v", "shard"}; `load_state_dict` checks shapes and the
  shard range, and leaves the working params alone (they are restored exactly from the
  checkpoint's weights; re-rounding the master would not reproduce stochastic rounding).

Tests: pytest -m gpu tests/test_gpu_model.py (10 AdamW steps against torch.optim.AdamW)
"""
from __future__ import annotations

import numpy as np

from llmc.model.gpu_model import from_host, to_host
from llmc.ops import F32, adamw, round_up
from llmc.model.params import decay_ranges


def _params_updated(model) -> None:
    """model.params_updated() where the model has one (GPUModel; test doubles may not)."""
    hook = getattr(model, "params_updated", None)
    if hook is not None:
        hook()


class GPUAdamW:
    """AdamW for `model.params` (or the `shard` range of it); see the module docstring."""

    def __init__(self, model, *, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                 weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0, shard=None):
        import cupy
        if grad_clip < 0 or weight_decay < 0:
            raise ValueError(f"grad_clip and weight_decay must be >= 0, got {grad_clip}, "
                             f"{weight_decay}")
        n = model.params.size
        start, stop = (0, n) if shard is None else (int(shard[0]), int(shard[1]))
        align = max(4, 16 // model.params.itemsize)  # 16-byte starts for the floatX and fp32 buffers
        if not (0 <= start < stop <= n) or start % align != 0:
            raise ValueError(f"shard: expected (start, stop) with 0 <= start < stop <= {n} and "
                             f"start a multiple of {align} elements, got {shard}")
        self.model, self.shard = model, (start, stop)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.weight_decay, self.grad_clip, self.seed = float(weight_decay), float(grad_clip), int(seed)
        self.params = model.params[start:stop]
        size = stop - start
        self.fp32 = model.params.dtype == F32
        # fp32 models: the params are the master. They are also passed as `master` (same buffer:
        # the kernel writes the same value through both), never None: CuPy turns a None kernel
        # argument into a garbage pointer, not NULL (cupy/cupy#9046).
        self.master = self.params if self.fp32 else cupy.empty(size, dtype=np.float32)
        self.m = cupy.zeros(size, dtype=np.float32)
        self.v = cupy.zeros(size, dtype=np.float32)
        self.ranges = adamw.decay_table(decay_ranges(model.mc))
        self.norm_sq = cupy.zeros(1, dtype=np.float32)
        self._norm = cupy.zeros((), dtype=np.float32)
        self._scratch = cupy.empty(round_up(adamw.global_norm_scratch_size(size)), dtype=np.uint8)
        self.init_from_params()

    def init_from_params(self) -> None:
        """master = the model's current working params of this range (after load_params)."""
        if self.fp32:
            return
        from_host(self.master, to_host(self.params).astype(np.float32))

    def step(self, lr: float, step: int, grads=None, norm_reduce=None):
        """Clip by the global norm and update; returns the pre-clip norm (0-d cupy f32, lazy).

        grads: the gradients of this range (default model.grads[start:stop]). norm_reduce:
        called with the (1,) f32 device array of this range's squared norm, to sum it in place
        across ranks before the update reads it.
        """
        norm = self.grad_norm(grads, norm_reduce)
        self.update(lr, step, grads)
        return norm

    def _grads(self, grads):
        start, stop = self.shard
        if grads is None:
            return self.model.grads[start:stop]
        if grads.shape != (stop - start,) or grads.dtype != self.params.dtype:
            raise ValueError(f"grads: expected shape ({stop - start},) and dtype "
                             f"{self.params.dtype} (this optimizer's range), got {grads.shape} "
                             f"{grads.dtype}")
        return grads

    def grad_norm(self, grads=None, norm_reduce=None):
        """The first half of step: the global pre-clip norm (0-d cupy f32, lazy), kept in
        norm_sq for `update`. The outlier guard reads it before deciding whether to update."""
        import cupy
        grads = self._grads(grads)
        adamw.global_norm_squared(self.norm_sq, grads, self._scratch)
        if norm_reduce is not None:
            norm_reduce(self.norm_sq)
        cupy.sqrt(self.norm_sq[0], out=self._norm)
        return self._norm

    def update(self, lr: float, step: int, grads=None) -> None:
        """The second half of step: clip by norm_sq (from grad_norm) and update this range."""
        if int(step) < 0:
            raise ValueError(f"step counts from 0, got {step}")
        start, _ = self.shard
        adamw.adamw_update(self.params, self.master, self._grads(grads), self.m, self.v,
                           self.norm_sq, lr=float(lr), beta1=self.beta1, beta2=self.beta2,
                           eps=self.eps, weight_decay=self.weight_decay, step=int(step) + 1,
                           grad_clip=self.grad_clip, seed=self.seed, ranges=self.ranges,
                           offset=start)
        if self.shard == (0, self.model.params.size):
            _params_updated(self.model)

    def state_dict(self) -> dict:
        """Host copies: {"master", "m", "v": fp32 (stop-start,), "shard": int64 [start, stop]}."""
        return {"master": to_host(self.master).astype(np.float32, copy=False),
                "m": self.m.get(), "v": self.v.get(),
                "shard": np.array(self.shard, dtype=np.int64)}

    def load_state_dict(self, d: dict) -> None:
        """Restore master, m, v; the shard range and every shape must match this optimizer."""
        for key in ("master", "m", "v", "shard"):
            if key not in d:
                raise ValueError(f"GPUAdamW state is missing {key!r}; expected keys "
                                 "'master', 'm', 'v', 'shard'")
        shard = tuple(int(x) for x in np.asarray(d["shard"]).reshape(-1))
        if shard != self.shard:
            raise ValueError(f"GPUAdamW state is for the range {shard} of the parameters, this "
                             f"optimizer holds {self.shard}: resume with the same world size "
                             "and ZeRO setting")
        size = self.shard[1] - self.shard[0]
        arrays = {}
        for key in ("master", "m", "v"):
            arr = np.asarray(d[key])
            if arr.shape != (size,) or not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"GPUAdamW state {key!r}: expected float ({size},), got "
                                 f"{arr.dtype} {arr.shape}: was it saved for another model?")
            arrays[key] = arr.astype(np.float32, copy=False)
        if not self.fp32:  # fp32: the master is the params, restored by load_params
            from_host(self.master, arrays["master"])
        from_host(self.m, arrays["m"])
        from_host(self.v, arrays["v"])
