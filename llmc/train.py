"""`python -m llmc.train`: train GPT-2 on the CPU or on one or many GPUs.

With no flags it is the quick demo: d12 on the bundled tiny-shakespeare on a GPU, a small d4
model for 30 steps on a CPU-only machine; either way it prints a text sample at the end.

Every run writes `<out-dir>/config.json` (the resolved config), `<out-dir>/metrics.jsonl` (one
JSON object per step: step, loss, lr, grad_norm, ms, tokens_per_s[, mfu]; and {step, val_loss}
entries) and checkpoints `<out-dir>/ckpt_<step>/` (llmc.checkpoint). `--resume auto` continues
from the newest; on the CPU the losses after resuming are bitwise those of an uninterrupted run.
Under `python -m llmc.launch` each process trains on its GPU; rank 0 prints and writes files.

Bad input (missing data, corrupt shard, impossible batch sizes, a bad checkpoint) ends the run
with one line on stderr and exit code 2; set LLMC_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from llmc import checkpoint
from llmc.config import ConfigError, TrainConfig, grad_accum_steps, parse_args, resolve
from llmc.params import init_params, num_params
from llmc.trainer import cuda_available, device_name, flops_per_token, make_backend, peak_flops


class _Log:
    """Prints and writes files on rank 0 only; warnings on every rank, tagged with the rank."""

    def __init__(self, rank: int, world_size: int, out_dir: Path | None):
        self.rank, self.world_size = rank, world_size
        self.main = rank == 0
        self.metrics = None
        if self.main and out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def info(self, msg: str):
        if self.main:
            print(msg, flush=True)

    def warn(self, msg: str):
        tag = f"[rank {self.rank}] " if self.world_size > 1 else ""
        print(f"{tag}warning: {msg}", file=sys.stderr, flush=True)

    def open_metrics(self, path: Path, start_step: int):
        """Append to metrics.jsonl, first dropping entries from steps a resume will redo."""
        if not self.main:
            return
        kept = []
        if start_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) < start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        path.write_text("".join(k + "\n" for k in kept))
        self.metrics = open(path, "a")

    def metric(self, **entry):
        if self.metrics is not None:
            self.metrics.write(json.dumps(entry) + "\n")
            self.metrics.flush()


def _data_paths(cfg: TrainConfig):
    from llmc.shards import find_shards
    if cfg.train_data is None or cfg.val_data is None:
        from llmc.datasets import tinyshakespeare
        ts_train, ts_val = tinyshakespeare()
    train = [ts_train] if cfg.train_data is None else find_shards(cfg.train_data)
    val = [ts_val] if cfg.val_data is None else find_shards(cfg.val_data)
    return train, val


def _init_distributed(device: str):
    if device != "cuda":
        return None
    from llmc.distributed import init_distributed
    return init_distributed()


def _pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if requested == "cuda":
        from llmc.device import cuda_problem
        problem = cuda_problem()
        if problem is not None:
            raise ConfigError(f"--device cuda: {problem}; or train on the CPU with --device cpu")
    return requested


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (final losses, steps, sample)."""
    device = _pick_device(cfg.device)
    dist = _init_distributed(device)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    cfg = resolve(cfg, device, world)
    mc = cfg.model_config()
    out_dir = Path(cfg.out_dir)
    log = _Log(rank, world, out_dir)
    accum = grad_accum_steps(cfg, world)
    B, T = cfg.batch_size, cfg.seq_len

    if device == "cpu" and cfg.device == "auto" and cfg.model == "d4":
        log.info("note: no GPU found, so this demo trains the small d4 model on the CPU "
                 "(on a GPU the same command trains d12)")
    log.info("config: " + json.dumps(cfg.to_dict()))
    if log.main:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    from llmc.data import DataLoader
    train_paths, val_paths = _data_paths(cfg)
    train_loader = DataLoader(train_paths, B, T, rank=rank, world_size=world, seed=cfg.seed)
    val_loader = DataLoader(val_paths, B, T, rank=rank, world_size=world, seed=cfg.seed, shuffle=False)

    if cfg.hellaswag:
        from llmc.eval import load_examples
        load_examples(cfg.hellaswag)  # a missing or damaged file fails now, not after training
    backend = make_backend(cfg, mc, dist)
    n_params = num_params(mc)
    dev_label = device_name() if device == "cuda" else "cpu"
    log.info(f"model {cfg.model}: {n_params:,} parameters (L={mc.n_layer}, NH={mc.n_head}, "
             f"C={mc.n_embd}, Vp={mc.padded_vocab_size}) on {dev_label} x{world}, {cfg.dtype}; "
             f"B={B}, T={T}, grad accum {accum} -> {B * T * world * accum:,} tokens/step")
    if device == "cuda":
        from llmc import kernels
        log.info("kernels: " + ", ".join(f"{f}/{d} {s:.2f}s" for (f, d), s in kernels.compile_times.items()))

    rng = np.random.default_rng(cfg.seed)
    start_step = 0
    resume = checkpoint.resolve_resume(cfg.resume, out_dir)
    if resume is not None:
        params, optim, state = checkpoint.load(resume, rank, world)
        _check_same_model(state, cfg, resume)
        backend.load_params(params)
        extra = {k: optim.pop(k) for k in ("loader_state", "rng_state") if k in optim}
        backend.load_optim_state(optim)
        train_loader.load_state_dict(json.loads(str(extra["loader_state"])))
        rng.bit_generator.state = json.loads(str(extra["rng_state"]))
        start_step = state["step"]
        log.info(f"resumed from {resume} at step {start_step}")
    else:
        backend.load_params(init_params(mc, cfg.seed))
    log.open_metrics(out_dir / "metrics.jsonl", start_step)

    from llmc.optim import lr_at
    peak = peak_flops(dev_label, cfg.dtype) if device == "cuda" else None
    fpt = flops_per_token(n_params, mc, T)
    tokens_per_step = B * T * world * accum
    summary = {"steps": cfg.max_steps, "start_step": start_step}
    val_steps = min(cfg.val_steps, max(1, val_loader.rows_per_epoch // (B * world)))

    def save(step_done: int):
        optim = dict(backend.optim_state())
        optim["loader_state"] = np.array(json.dumps(backend.loader_state(train_loader)))
        optim["rng_state"] = np.array(json.dumps(rng.bit_generator.state))
        params = backend.params_for_checkpoint() if rank == 0 else None
        state = {"config": cfg.to_dict(), "model": [mc.n_layer, mc.n_head, mc.n_embd,
                                                    mc.padded_vocab_size, mc.block_size]}
        path = checkpoint.save(out_dir, step_done, params=params, optim=optim, state=state,
                               rank=rank, world_size=world,
                               barrier=backend.barrier if world > 1 else None,
                               keep=cfg.keep_checkpoints)
        log.info(f"saved {path}")

    def sample(step_done: int):
        from llmc.sample import sample_text
        text = sample_text(backend.model, cfg.sample_tokens, T, rng)
        log.info(f"sample at step {step_done}:\n{text}\n---")
        return text

    loss = float("nan")
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        t0 = time.perf_counter()
        loss, norm = backend.train_step(train_loader, accum, lr, step)
        ms = (time.perf_counter() - t0) * 1000
        tps = tokens_per_step / (ms / 1000)
        entry = dict(step=step, loss=loss, lr=lr, grad_norm=norm, ms=ms, tokens_per_s=tps)
        line = (f"step {step + 1:5d}/{cfg.max_steps} | loss {loss:.6f} | norm {norm:7.4f} | "
                f"lr {lr:.2e} | {ms:8.1f} ms | {tps:11,.0f} tok/s")
        if peak is not None:
            entry["mfu"] = fpt * tps / world / peak
            line += f" | MFU {100 * entry['mfu']:.1f}%"
        log.metric(**entry)
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            log.info(line)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr or raise --grad-clip")
        done = step + 1
        last = done == cfg.max_steps
        if (cfg.val_every and done % cfg.val_every == 0) or last:
            val = backend.eval_loss(val_loader, val_steps)
            log.metric(step=step, val_loss=val)
            log.info(f"val loss {val:.6f} ({val_steps} batches)")
            summary["val_loss"] = val
            if cfg.hellaswag and rank == 0:
                from llmc.eval import hellaswag_eval
                hs = hellaswag_eval(backend.model, cfg.hellaswag, limit=cfg.hellaswag_limit)
                log.metric(step=step, hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"])
                log.info(f"hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f} ({hs['n']} examples)")
                summary["hellaswag"] = hs
        if (cfg.sample_every and done % cfg.sample_every == 0) or last:
            summary["sample"] = sample(done)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or last:
            save(done)
    summary["loss"] = loss
    if dist is not None:
        dist.close()
    return summary


def _check_same_model(state: dict, cfg: TrainConfig, path) -> None:
    mc = cfg.model_config()
    want = [mc.n_layer, mc.n_head, mc.n_embd, mc.padded_vocab_size, mc.block_size]
    if state.get("model") != want:
        raise checkpoint.CheckpointError(
            f"{path}: holds a model with (L, NH, C, Vp, maxT) = {state.get('model')}, but this run "
            f"builds {want}; pass the same --model/--n-layer/--n-head/--n-embd as the saved run")
    saved = state.get("config", {})
    for key in ("batch_size", "seq_len", "seed"):
        if saved.get(key) != getattr(cfg, key):
            raise checkpoint.CheckpointError(
                f"{path}: saved with --{key.replace('_', '-')} {saved.get(key)}, this run uses "
                f"{getattr(cfg, key)}; resume with the same value to continue the same data order")


def main(argv=None) -> int:
    cfg = parse_args(argv)  # argparse prints usage and exits 2 on unknown flags / bad types
    try:
        run(cfg)
    except (ValueError, OSError, FloatingPointError) as e:  # ConfigError, ShardError, CheckpointError...
        if os.environ.get("LLMC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
