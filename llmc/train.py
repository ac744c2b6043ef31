"""`python -m llmc.train`: train GPT-2 on the CPU or on one or many GPUs.

With no flags it is the quick demo: d12 on the bundled tiny-shakespeare on a GPU, a small d4
model for 30 steps on a CPU-only machine; either way it prints a text sample at the end.

Every run writes `<out-dir>/config.json` (the resolved config), `<out-dir>/metrics.jsonl` (one
JSON object per step: step, loss, lr, grad_norm, ms, tokens_per_s, lossz, gradz[, mfu, skipped];
and {step, val_loss, val_rows} entries) and checkpoints `<out-dir>/ckpt_<step>/`
(llmc.training.checkpoint). `--resume auto` continues from the newest intact one; on the CPU the losses
after resuming are bitwise those of an uninterrupted run. Under `python -m llmc.launch` each
process trains on its GPU; rank 0 prints and writes files.
`--init-from MODEL` starts from a model's weights (llmc.formats.load_model: a Hugging Face GPT-2,
an llm.c .bin, an llmc checkpoint) with a fresh optimizer; the shape comes from the file.

Long runs: rank 0 locks --out-dir (llmc.training.runlock) and refuses a fresh run in a directory holding
another run unless --overwrite; SIGTERM/SIGINT finish the step, checkpoint and exit 75
(llmc.training.signals); the outlier guard can skip updates (llmc.training.guard); the step line carries tokens
done, elapsed time and the ETA (llmc.training.progress). End-of-run validation, HellaSwag and the sample
run after the final checkpoint, so they can never cost the run.

Bad input (missing data, corrupt shard, impossible batch sizes, a bad checkpoint) ends the run
with one line on stderr and exit code 2; set LLMC_DEBUG=1 to see the traceback instead.

Run the tests:  python -m pytest tests/test_train.py tests/test_long_runs.py tests/test_preemption.py -q
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from llmc.training import checkpoint
from llmc.config import ConfigError, TrainConfig, grad_accum_steps, model_config, parse_args, resolve
from llmc.training.guard import OutlierGuard
from llmc.model.params import init_params, num_params
from llmc.training.progress import Progress
from llmc.training.runlock import RunLock, check_fresh
from llmc.training.signals import PREEMPTED_EXIT, Preempted, StopRequest
from llmc.training.trainer import cuda_available, device_name, flops_per_token, make_backend, peak_flops


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
    from llmc.data.shards import find_shards
    if cfg.train_data is None or cfg.val_data is None:
        from llmc.data.datasets import tinyshakespeare
        ts_train, ts_val = tinyshakespeare()
    train = [ts_train] if cfg.train_data is None else find_shards(cfg.train_data)
    val = [ts_val] if cfg.val_data is None else find_shards(cfg.val_data)
    return train, val


def _init_distributed(device: str):
    if device != "cuda":
        return None
    from llmc.dist.distributed import init_distributed
    return init_distributed()


def pick_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; 'cuda' without one is a ConfigError."""
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if requested == "cuda":
        from llmc.cuda.device import cuda_problem
        problem = cuda_problem()
        if problem is not None:
            raise ConfigError(f"--device cuda: {problem}; or train on the CPU with --device cpu")
    return requested


def _check_splits(train_paths, val_paths, log) -> None:
    """The same file for training and validation is an error; a split label that disagrees with
    its use is a warning (it may be deliberate, e.g. a quick test on a validation shard)."""
    from llmc.data.shards import read_meta
    same = {str(Path(p).resolve()) for p in train_paths} & {str(Path(p).resolve()) for p in val_paths}
    if same:
        raise ConfigError(f"{sorted(same)[0]}: used for both --train-data and --val-data, so the "
                          "validation loss would measure training data; give separate files")
    for paths, flag, want in ((train_paths, "--train-data", "train"), (val_paths, "--val-data", "val")):
        wrong = [p for p in paths if read_meta(p)["split"] != want]
        if wrong:
            log.warn(f"{flag}: {len(wrong)} of {len(paths)} shard(s) are labelled "
                     f"{read_meta(wrong[0])['split']!r}, not {want!r} (e.g. {wrong[0]}); "
                     f"check that {flag} points at the {want} shards")


def _open_out_dir(cfg: TrainConfig, out_dir: Path, log):
    """Rank 0: lock --out-dir, refuse (or with --overwrite clear) another run's files on a fresh
    start, and remove what crashed saves left. -> the RunLock (None on other ranks)."""
    if cfg.overwrite and cfg.resume is not None:
        raise ConfigError("--overwrite deletes the run that --resume would continue; give one of them")
    if not log.main:
        return None
    lock = RunLock(out_dir).acquire()
    try:
        if cfg.resume is None:
            gone = check_fresh(out_dir, cfg.overwrite)
            if gone:
                log.info(f"--overwrite: deleted the previous run's {', '.join(gone)}")
        gone = checkpoint.clean(out_dir)
        if gone:
            log.info(f"removed what an interrupted save left: {', '.join(gone)}")
    except BaseException:
        lock.release()
        raise
    return lock


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (final losses, steps, sample)."""
    device = pick_device(cfg.device)
    dist = _init_distributed(device)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    init = None
    if cfg.init_from is not None:
        cfg, init = _init_from(cfg)
    cfg = resolve(cfg, device, world)
    mc = cfg.model_config() if init is None else init.config
    if init is not None and cfg.seq_len > mc.block_size:
        raise ConfigError(f"--seq-len {cfg.seq_len} is above the context of {cfg.init_from} "
                          f"({mc.block_size} tokens); use --seq-len {mc.block_size} or less")
    out_dir = Path(cfg.out_dir)
    log = _Log(rank, world, out_dir)
    stop = StopRequest().install()
    lock = None
    try:
        lock = _open_out_dir(cfg, out_dir, log)
        if dist is not None and world > 1:
            dist.barrier()  # rank 0's cleanup is done before any rank looks for a checkpoint
        return _train(cfg, mc, init, device, dist, rank, world, out_dir, log, stop)
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()
        if dist is not None:
            dist.close()


def _train(cfg, mc, init, device, dist, rank, world, out_dir, log, stop) -> dict:
    accum = grad_accum_steps(cfg, world)
    B, T = cfg.batch_size, cfg.seq_len

    if device == "cpu" and cfg.device == "auto" and cfg.model == "d4":
        log.info("note: no GPU found, so this demo trains the small d4 model on the CPU "
                 "(on a GPU the same command trains d12)")
    log.info("config: " + json.dumps(cfg.to_dict()))
    if log.main:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    from llmc.data.loader import DataLoader
    train_paths, val_paths = _data_paths(cfg)
    _check_splits(train_paths, val_paths, log)
    train_loader = DataLoader(train_paths, B, T, rank=rank, world_size=world, seed=cfg.seed)
    val_loader = DataLoader(val_paths, B, T, rank=rank, world_size=world, seed=cfg.seed, shuffle=False)

    if cfg.hellaswag:
        from llmc.eval import load_examples
        load_examples(cfg.hellaswag)  # a missing or damaged file fails now, not after training
    backend = make_backend(cfg, mc, dist)
    n_params = num_params(mc)
    dev_label = device_name() if device == "cuda" else "cpu"
    label = cfg.model if init is None else f"from {cfg.init_from}"
    log.info(f"model {label}: {n_params:,} parameters (L={mc.n_layer}, NH={mc.n_head}, "
             f"C={mc.n_embd}, Vp={mc.padded_vocab_size}) on {dev_label} x{world}, {cfg.dtype}; "
             f"B={B}, T={T}, grad accum {accum} -> {B * T * world * accum:,} tokens/step")
    if device == "cuda":
        from llmc import kernels
        log.info("kernels: " + ", ".join(f"{f}/{d} {s:.2f}s" for (f, d), s in kernels.compile_times.items()))

    rng = np.random.default_rng(cfg.seed)
    guard = OutlierGuard(cfg.skip_update_lossz, cfg.skip_update_gradz)
    start_step = 0
    resume = checkpoint.resolve_resume(cfg.resume, out_dir, world,
                                       report=log.warn if log.main else None)
    if resume is not None:
        start_step = _resume(resume, cfg, rank, world, backend, train_loader, rng, guard)
        log.info(f"resumed from {resume} at step {start_step}")
        if init is not None:
            log.info(f"--init-from {cfg.init_from} not used: the resumed run has its own weights")
    elif init is not None:
        backend.load_params(init.params)
        log.info(f"weights from {init.path} ({init.format}); the optimizer starts fresh")
    else:
        if cfg.resume == "auto":
            log.info(f"--resume auto: no checkpoint in {out_dir} yet; starting from step 0")
        backend.load_params(init_params(mc, cfg.seed))
    init = None  # the host copy of the file's weights is not needed any more
    summary = {"steps": cfg.max_steps, "start_step": start_step}
    if start_step >= cfg.max_steps:
        log.info(f"{resume} is at step {start_step}, at or past --max-steps {cfg.max_steps}: "
                 f"nothing to train; raise --max-steps to train on")
        return summary
    log.open_metrics(out_dir / "metrics.jsonl", start_step)

    from llmc.training.optim import lr_at
    peak = peak_flops(dev_label, cfg.dtype) if device == "cuda" else None
    fpt = flops_per_token(n_params, mc, T)
    tokens_per_step = B * T * world * accum
    progress = Progress(cfg.max_steps, tokens_per_step, start_step)
    val_steps = min(cfg.val_steps, max(1, val_loader.rows_per_epoch // (B * world)))
    val_rows = min(val_steps * B * world, val_loader.rows_per_epoch)
    val_cover = (f"{val_steps} batches: {val_rows} of the split's {val_loader.rows_per_epoch} "
                 f"rows ({100 * val_rows / val_loader.rows_per_epoch:.0f}%)")

    def save(step_done: int) -> Path:
        optim = dict(backend.optim_state())
        params = backend.params_for_checkpoint() if rank == 0 else None
        problem = checkpoint.check_finite(params, optim)
        if backend.any_rank(problem is not None):
            newest = checkpoint.list_checkpoints(out_dir)
            raise FloatingPointError(
                f"step {step_done} not checkpointed: {problem or 'another rank holds non-finite state'}; "
                "the run diverged (lower --lr, raise --eps or --grad-clip); "
                + (f"the newest good checkpoint is {newest[-1]}" if newest else "no checkpoint was written"))
        optim["loader_state"] = np.array(json.dumps(backend.loader_state(train_loader)))
        optim["rng_state"] = np.array(json.dumps(rng.bit_generator.state))
        state = {"config": cfg.to_dict(), "model": [mc.n_layer, mc.n_head, mc.n_embd,
                                                    mc.padded_vocab_size, mc.block_size],
                 "guard": guard.state_dict()}
        path = checkpoint.save(out_dir, step_done, params=params, optim=optim, state=state,
                               rank=rank, world_size=world,
                               barrier=backend.barrier if world > 1 else None,
                               keep=cfg.keep_checkpoints)
        log.info(f"saved {path}")
        return path

    def validate(step: int):
        val = backend.eval_loss(val_loader, val_steps)
        log.metric(step=step, val_loss=val, val_rows=val_rows)
        log.info(f"val loss {val:.6f} ({val_cover})")
        fp8 = backend.model.fp8_stats() if cfg.fp8 else None
        if fp8 is not None:  # the scale bookkeeping, watched by bench/fp8_quality.py
            log.metric(step=step, **{f"fp8_{k}": v for k, v in fp8.items()})
            log.info(f"fp8 amax max {fp8['amax_max']:.4g}, scales [{fp8['scale_min']:.4g}, "
                     f"{fp8['scale_max']:.4g}], non-finite {fp8['nonfinite']}")
        summary["val_loss"] = val
        if cfg.hellaswag and rank == 0:
            from llmc.eval import hellaswag_eval
            hs = hellaswag_eval(backend.model, cfg.hellaswag, limit=cfg.hellaswag_limit)
            log.metric(step=step, hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"])
            log.info(f"hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f} ({hs['n']} examples)")
            summary["hellaswag"] = hs

    def sample(step_done: int):
        from llmc.inference.sample import sample_text
        text = sample_text(backend.model, cfg.sample_tokens, T, rng)
        log.info(f"sample at step {step_done}:\n{text}\n---")
        summary["sample"] = text

    loss = float("nan")
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        verdict = {}

        def skip(loss_, norm_):
            verdict["skip"], verdict["lossz"], verdict["gradz"] = guard.check(loss_, norm_)
            return verdict["skip"]
        t0 = time.perf_counter()
        loss, norm = backend.train_step(train_loader, accum, lr, step,
                                        skip=skip if guard.active else None)
        if not guard.active:
            skip(loss, norm)  # z-scores are logged (and their windows kept) either way
        ms = (time.perf_counter() - t0) * 1000
        progress.step(ms / 1000)
        tps = tokens_per_step / (ms / 1000)
        entry = dict(step=step, loss=loss, lr=lr, grad_norm=norm, ms=ms, tokens_per_s=tps,
                     lossz=_finite_or_none(verdict["lossz"]), gradz=_finite_or_none(verdict["gradz"]))
        line = (f"step {step + 1:5d}/{cfg.max_steps} | loss {loss:.6f} | norm {norm:7.4f} | "
                f"lr {lr:.2e} | {ms:8.1f} ms | {tps:11,.0f} tok/s")
        if peak is not None:
            entry["mfu"] = fpt * tps / world / peak
            line += f" | MFU {100 * entry['mfu']:.1f}%"
        if guard.active:
            entry["skipped"] = verdict["skip"]
        if verdict["skip"]:
            line += f" | update SKIPPED (loss z {verdict['lossz']:.1f}, norm z {verdict['gradz']:.1f})"
        log.metric(**entry)
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1 or verdict["skip"]:
            log.info(line + progress.line())
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr or raise "
                                     "--grad-clip, then continue from the last checkpoint "
                                     "with --resume auto")
        done = step + 1
        last = done == cfg.max_steps
        stopping = backend.any_rank(stop.requested)
        if cfg.val_every and done % cfg.val_every == 0 and not last:
            validate(step)
        if cfg.sample_every and done % cfg.sample_every == 0 and not last:
            sample(done)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or last or stopping:
            path = save(done)
        if stopping and not last:
            raise Preempted(f"stopped by {stop.name or 'a signal on another rank'} after step "
                            f"{done} of {cfg.max_steps}; saved {path}; run the same command with "
                            "--resume auto to continue")
    summary["loss"] = loss
    # End-of-run work comes after the final checkpoint: nothing here can cost the run.
    for what, work in (("validation", lambda: validate(cfg.max_steps - 1)),
                       ("sample", lambda: sample(cfg.max_steps))):
        if backend.any_rank(stop.requested):
            raise Preempted(f"stopped by {stop.name} after the final checkpoint {path}, before "
                            f"the end-of-run {what}; the training is complete")
        work()
    log.info(f"done: {progress.summary()} | final loss {loss:.4f}"
             + (f" | val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""))
    return summary


def _init_from(cfg: TrainConfig):
    """--init-from: read the model; the shape flags take the file's shape (different ones are
    refused). Returns (cfg with n_layer/n_head/n_embd set, ModelFile)."""
    from llmc.formats import load_model
    init = load_model(cfg.init_from)
    fm = init.config
    have = (fm.n_layer, fm.n_head, fm.n_embd)
    if fm.vocab_size != 50257:
        raise ConfigError(f"--init-from {cfg.init_from}: vocab_size {fm.vocab_size}, but llmc "
                          "trains with the GPT-2 tokenizer's 50257; start from a GPT-2 model")
    base = model_config(cfg.model) if cfg.model is not None else fm
    want = tuple(given if given is not None else default for given, default in
                 zip((cfg.n_layer, cfg.n_head, cfg.n_embd), (base.n_layer, base.n_head, base.n_embd)))
    if want != have:
        raise ConfigError(f"--init-from {cfg.init_from} holds (n_layer, n_head, n_embd) = {have}, "
                          f"but --model/--n-layer/--n-head/--n-embd ask for {want}; drop those "
                          "flags to take the file's shape, or make them match it")
    return dataclasses.replace(cfg, n_layer=have[0], n_head=have[1], n_embd=have[2]), init


def _finite_or_none(x: float):
    return x if np.isfinite(x) else None


def _resume(path, cfg, rank, world, backend, train_loader, rng, guard) -> int:
    """Load checkpoint `path` into the backend, loader, RNG and outlier guard; -> its step."""
    params, optim, state = checkpoint.load(path, rank, world)
    _check_same_model(state, cfg, path, backend.model.mc)
    backend.load_params(params)
    try:
        extra = {k: optim.pop(k) for k in ("loader_state", "rng_state")}
        backend.load_optim_state(optim)
        train_loader.load_state_dict(json.loads(str(extra["loader_state"])))
        rng.bit_generator.state = json.loads(str(extra["rng_state"]))
        if "guard" in state:
            guard.load_state_dict(state["guard"])
    except (KeyError, ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{path}: its run state does not fit this run ({e}); "
                                         "resume from another checkpoint") from None
    return state["step"]


def _check_same_model(state: dict, cfg: TrainConfig, path, mc) -> None:
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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv=None) -> int:
    cfg = parse_args(argv)  # argparse prints usage and exits 2 on unknown flags / bad types
    if not os.environ.get("LLMC_DEBUG"):
        warnings.formatwarning = _one_line_warning  # a warning is one line, like an error
    try:
        run(cfg)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return PREEMPTED_EXIT
    except (ValueError, OSError, FloatingPointError, MemoryError) as e:  # ConfigError, ShardError, CheckpointError...
        if os.environ.get("LLMC_DEBUG"):
            raise
        if isinstance(e, MemoryError):
            e = f"out of host memory ({str(e) or 'an allocation failed'}); use a smaller --model, --batch-size or --seq-len"
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        newest = checkpoint.list_checkpoints(cfg.out_dir)
        print("interrupted without saving (a second Ctrl-C); " +
              (f"the newest checkpoint is {newest[-1]}" if newest else "no checkpoint was written"),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
