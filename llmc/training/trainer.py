"""The two ways a training step runs: on the CPU (NumPy reference) or on GPUs (our kernels).

`make_backend(cfg, mc, dist)` returns an object with one interface, so `llmc.train` holds the
loop once:
    backend.model                      CPUModel or GPUModel
    backend.train_step(loader, accum, lr, step, skip=None) -> (loss, grad_norm)   host floats,
                                       one sync; skip(loss, norm) -> True drops the update
                                       (the outlier guard), called before the update
    backend.any_rank(flag) -> bool     True on every rank when flag is True on any (stop, NaN)
    backend.eval_loss(loader, steps) -> float                          mean over ranks
    backend.params_for_checkpoint() -> fp32 (N,)   exact working weights (bf16 values on the GPU)
    backend.loader_state(loader) -> dict           the data position the finished steps consumed
    backend.optim_state() / load_optim_state(d)    this rank's optimizer state
    backend.load_params(flat)
On the GPU nothing synchronizes inside a step until the step is queued: losses accumulate in a
device scalar and the host reads it once.
"""
from __future__ import annotations

import numpy as np

from llmc.cuda.device import cuda_available  # noqa: F401 - where llmc.train looks for it


def device_name() -> str:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


# Dense peak FLOP/s for MFU (llm.c's convention: bf16 tensor-core peak of the card).
_PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
          "L40S": 362e12, "4090": 165e12}


def peak_flops(name: str, dtype: str) -> float | None:
    for key, bf16_peak in _PEAKS.items():
        if key in name:
            return bf16_peak if dtype == "bf16" else bf16_peak / 2  # tf32-class peak for fp32
    return None


def flops_per_token(num_params: int, mc, T: int) -> float:
    """llm.c's count: 6N for the weights + 6·L·C·T for attention (fwd + bwd)."""
    return 6.0 * num_params + 6.0 * mc.n_layer * mc.n_embd * T


class CPUBackend:
    """NumPy reference model and AdamW, fp32."""

    def __init__(self, cfg, mc):
        from llmc.model.cpu_model import CPUModel
        from llmc.training.optim import AdamW
        self.model = CPUModel(mc, cfg.batch_size, cfg.seq_len)
        self.opt = AdamW(self.model.params, mc, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
        self.world_size, self.rank = 1, 0

    def load_params(self, flat):
        self.model.load_params(flat)

    def train_step(self, loader, accum, lr, step, skip=None):
        self.model.zero_grad()
        loss = 0.0
        for _ in range(accum):
            x, y = loader.next_batch()
            loss += float(self.model.forward_backward(x, y, 1.0 / accum))
        if skip is not None:
            from llmc.training.optim import global_norm
            norm = global_norm(self.model.grads)  # what opt.step would return, computed first
            if skip(loss / accum, norm):
                return loss / accum, float(norm)
        norm = self.opt.step(self.model.grads, lr, step)
        return loss / accum, float(norm)

    def any_rank(self, flag: bool) -> bool:
        return bool(flag)

    def eval_loss(self, loader, steps):
        loader.reset()
        total = 0.0
        for _ in range(steps):
            x, y = loader.next_batch()
            total += float(self.model.forward(x, y))
        return total / steps

    def params_for_checkpoint(self):
        return np.array(self.model.params, dtype=np.float32)

    def loader_state(self, loader):
        return loader.state_dict()

    def optim_state(self):
        return self.opt.state_dict()

    def load_optim_state(self, d):
        self.opt.load_state_dict(d)

    def barrier(self):
        pass


class GPUBackend:
    """GPUModel + data-parallel AdamW (ZeRO-1 when cfg.zero == 1) over `dist`."""

    def __init__(self, cfg, mc, dist):
        import cupy
        from llmc.model.gpu_model import GPUModel
        from llmc.dist.zero import DataParallel
        self.cupy = cupy
        self.dist = dist
        self.world_size, self.rank = dist.world_size, dist.rank
        self.model = GPUModel(mc, cfg.batch_size, cfg.seq_len, dtype=cfg.dtype,
                              recompute=cfg.recompute, attention=cfg.attention,
                              classifier_chunks=cfg.classifier_chunks, graphs=cfg.graphs,
                              fp8=cfg.fp8, fp8_wgrad=bool(cfg.fp8_wgrad),
                              fp8_fast_accum=bool(cfg.fp8_fast_accum))
        self.dp = DataParallel(dist, self.model, zero=cfg.zero, beta1=cfg.beta1, beta2=cfg.beta2,
                               eps=cfg.eps, weight_decay=cfg.weight_decay,
                               grad_clip=cfg.grad_clip, seed=cfg.seed)
        self._loss = cupy.zeros((), dtype=cupy.float32)
        self._prefetchers = {}

    def _prefetcher(self, loader):
        from llmc.data.loader import DevicePrefetcher
        pf = self._prefetchers.get(id(loader))
        if pf is None:
            pf = self._prefetchers[id(loader)] = DevicePrefetcher(loader)
        return pf

    def load_params(self, flat):
        self.model.load_params(flat)
        self.dp.init_from_params()

    def train_step(self, loader, accum, lr, step, skip=None):
        cp = self.cupy
        pf = self._prefetcher(loader)
        self.model.zero_grad()
        self._loss.fill(0)
        for micro in range(accum):
            x, y = pf.next_batch()
            # only data parallelism needs the hook (the last micro-step starts the reductions);
            # without it the micro-step can replay as a CUDA graph
            hook = self.dp.hook if micro == accum - 1 and self.world_size > 1 else None
            loss = self.model.forward_backward(x, y, 1.0 / accum, on_layer_grads=hook)
            cp.add(self._loss, loss, out=self._loss)
        self.dp.finish()
        if skip is None:
            norm = self.dp.step(lr, step)
            self.dist.all_reduce(self._loss, op="avg")
            return float(self._loss) / accum, float(norm)
        # The outlier guard decides on the host from the loss and the norm, so the step's one
        # host sync moves before the update instead of after it: the GPU idles while the host
        # decides and queues the update (tens of microseconds), but no sync is added.
        norm = self.dp.grad_norm()
        self.dist.all_reduce(self._loss, op="avg")
        loss, norm = float(self._loss) / accum, float(norm)
        if skip(loss, norm):
            self.dp.skip()
        else:
            self.dp.update(lr, step)
        return loss, norm

    def any_rank(self, flag: bool) -> bool:
        """One tiny all-reduce (max) of a flag; a host read, after the step's own sync."""
        if self.world_size == 1:
            return bool(flag)
        buf = self.cupy.array([1 if flag else 0], dtype=self.cupy.int32)
        self.dist.all_reduce(buf, op="max")
        return bool(int(buf[0]))

    def eval_loss(self, loader, steps):
        cp = self.cupy
        loader.reset()
        self._prefetchers.pop(id(loader), None)  # a reset loader must not hand out stale prefetches
        pf = self._prefetcher(loader)
        total = cp.zeros((), dtype=cp.float32)
        for _ in range(steps):
            x, y = pf.next_batch()
            cp.add(total, self.model.forward(x, y), out=total)
        self.dist.all_reduce(total, op="avg")
        return float(total) / steps

    def params_for_checkpoint(self):
        return self.model.params_fp32()

    def loader_state(self, loader):
        """What the step consumed: the prefetcher's view, not the batch already in flight."""
        pf = self._prefetchers.get(id(loader))
        return pf.state_dict() if pf is not None else loader.state_dict()

    def optim_state(self):
        return self.dp.state_dict()

    def load_optim_state(self, d):
        self.dp.load_state_dict(d)

    def barrier(self):
        self.dist.barrier()


def make_backend(cfg, mc, dist=None):
    if cfg.device == "cpu":
        return CPUBackend(cfg, mc)
    return GPUBackend(cfg, mc, dist)
