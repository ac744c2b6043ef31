"""Checkpoints: atomic directories that a failed run can never leave half-written.

Layout of `<out_dir>/ckpt_<step:08d>/`:
    model.npy            fp32 weights, flat (llmc.params layout): loadable by any device/world size
    optim_rank<r>.npz    rank r's optimizer state (AdamW moments; fp32 master shard on the GPU)
    state.json           format version, step, model shape, run config, world size, per-rank
                         data-loader and RNG state, and whether model.npy is the exact master copy

Writing: every rank writes its files into `ckpt_<step>.tmp/`; after a barrier rank 0 writes
state.json last and renames the directory into place (one atomic rename on POSIX). A crash at
any point leaves either the previous checkpoints untouched or a `.tmp` directory that is
ignored (and cleaned up by the next save). Only complete directories are ever named `ckpt_*`
without a suffix, so `--resume auto` never picks a broken one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from llmc.durable import fsync_dir, fsync_file

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and the fix."""


def checkpoint_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:08d}"


def save(out_dir, step: int, *, params: np.ndarray | None, optim: dict, state: dict,
         rank: int = 0, world_size: int = 1, barrier=None, keep: int = 2) -> Path:
    """Write this rank's part of checkpoint `step`; rank 0 (params not None) publishes it.

    params: fp32 (N,) on rank 0, None elsewhere. optim: name -> np.ndarray for this rank.
    state: JSON-serializable run state; rank 0's copy is written (it should already hold every
    rank's loader/RNG state). barrier: callable that waits for all ranks (None when alone).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save of the same step
        tmp.mkdir()
    if barrier is not None:
        barrier()
    optim_path = tmp / f"optim_rank{rank}.npz"
    with open(optim_path, "wb") as f:
        np.savez(f, **optim)
        f.flush()
        os.fsync(f.fileno())
    if barrier is not None:
        barrier()
    if rank == 0:
        if params is None:
            raise ValueError("rank 0 must pass the fp32 params to checkpoint.save")
        model_path = tmp / "model.npy"
        with open(model_path, "wb") as f:
            np.save(f, np.ascontiguousarray(params, dtype=np.float32))
            f.flush()
            os.fsync(f.fileno())
        meta = dict(state, format_version=FORMAT_VERSION, step=step, world_size=world_size)
        state_path = tmp / "state.json"
        state_path.write_text(json.dumps(meta, indent=1))
        fsync_file(state_path)
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming): swap atomically-enough
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fsync_dir(out_dir)
        prune(out_dir, keep)
    if barrier is not None:
        barrier()
    return final


def list_checkpoints(out_dir) -> list:
    """Complete checkpoint directories in `out_dir`, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def prune(out_dir, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints, and stale .tmp/.old directories."""
    ckpts = list_checkpoints(out_dir)
    for p in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(out_dir).glob("ckpt_*.old"):
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(spec: str | None, out_dir) -> Path | None:
    """--resume value -> checkpoint directory (None: start fresh)."""
    if spec is None:
        return None
    if spec == "auto":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"--resume {spec}: no such checkpoint directory; give a ckpt_* "
                              f"directory or 'auto' for the newest in --out-dir")
    return path


def load(path, rank: int = 0, world_size: int = 1) -> tuple:
    """(params fp32 (N,), optim dict for `rank`, state dict); validates the directory."""
    path = Path(path)
    state_path = path / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"{path}: no state.json, so this is not a complete llmc checkpoint; "
                              "resume from another ckpt_* directory")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_path}: unreadable JSON ({e}); resume from another checkpoint") from e
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format_version')} is not "
                              f"{FORMAT_VERSION}; it was written by another llmc version")
    if state.get("world_size", 1) != world_size:
        raise CheckpointError(
            f"{path}: written by {state.get('world_size')} process(es), resuming with {world_size}; "
            f"the optimizer state is sharded per rank, so resume with "
            f"--nproc-per-node/world size {state.get('world_size')}")
    try:
        params = np.load(path / "model.npy", mmap_mode=None)
        with np.load(path / f"optim_rank{rank}.npz") as z:
            optim = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read its arrays ({e}); resume from another checkpoint") from e
    if params.dtype != np.float32 or params.ndim != 1:
        raise CheckpointError(f"{path}/model.npy: expected a flat float32 array, got {params.dtype} {params.shape}")
    return params, optim, state
