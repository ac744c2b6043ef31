"""The training data loader: token shards -> (inputs, targets) batches for one rank of many.

Rows. A shard of N tokens holds R = (N - 1) // T rows; row i is the T+1 tokens starting at i*T
(inputs are its first T, targets its last T), so consecutive rows overlap by one token and no
token of a shard is skipped except its tail of fewer than T+1. Shards with no row (N <= T) are
skipped with a warning.

The row stream. Epoch e lists every row once: the shards in an order, and inside each shard its
rows in an order. With shuffle=True both orders are permutations drawn from (seed, e) (and the
shard's index), identical on every rank and different across epochs and seeds; shuffle=False
keeps file order (validation). Epochs follow each other without a gap: the stream is endless.

Batches. Each global step takes the next world_size*B rows of the stream; rank r gets rows
[r*B, (r+1)*B) of them, so ranks never share a row within an epoch and a run on one rank with
B' = world_size*B sees exactly the concatenation of the ranks' batches. A step that crosses the
end of an epoch finishes with the first rows of the next one.

State. The position is (epoch, cursor = rows of the epoch consumed by all ranks): a few integers,
JSON-serializable, the same on every rank. `load_state_dict` refuses a state taken with other
T, seed, shuffle or shards; with strict=True (default) also another B or world size. With
strict=False a different B or world size continues the same row stream from the same row
(useful for resuming on a different number of GPUs).

`DevicePrefetcher` puts batches on the GPU: the loader fills a pinned host buffer and an async
copy on a side stream runs while the current step computes; the consumer's stream waits on an
event, never the host. CuPy is imported only there, so this module imports without it.

Run the tests:  python -m pytest tests/test_data.py -q   (the prefetcher test needs a GPU)
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from llmc.data.shards import find_shards, open_shard

STATE_VERSION = 1
_STATE_KEYS = ("version", "epoch", "cursor", "shard_index", "position", "B", "T", "world_size",
               "rank", "seed", "shuffle", "shards")


def _check_int(name: str, value, lo: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"DataLoader: {name} must be an int, got {value!r} "
                         f"({type(value).__name__}); {fix}")
    if value < lo:
        raise ValueError(f"DataLoader: {name} must be >= {lo}, got {value}; {fix}")
    return int(value)


class DataLoader:
    """Batches of (inputs, targets), int32 (B, T), for `rank` of `world_size`, from token shards."""

    def __init__(self, paths, B: int, T: int, rank: int = 0, world_size: int = 1,
                 seed: int = 1337, shuffle: bool = True):
        self.B = _check_int("B", B, 1, "pass the micro-batch size (--batch-size)")
        self.T = _check_int("T", T, 1, "pass the sequence length (--seq-len)")
        self.world_size = _check_int("world_size", world_size, 1, "pass the number of processes")
        self.rank = _check_int("rank", rank, 0, "ranks count from 0")
        if self.rank >= self.world_size:
            raise ValueError(f"DataLoader: rank {rank} is not below world_size {world_size}; "
                             f"ranks are 0..{world_size - 1}")
        self.seed = _check_int("seed", seed, 0, "pass a non-negative seed")
        self.shuffle = bool(shuffle)
        if isinstance(paths, (str, os.PathLike)):
            paths = find_shards(paths)
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("DataLoader: no shard paths given; pass shard files, e.g. "
                             "llmc.data.shards.find_shards('data/*.arrow')")
        opened = [open_shard(p) for p in paths]
        self._fingerprint = [[p.name, len(s)] for p, s in zip(paths, opened)]
        for s in opened:
            if len(s) <= self.T:
                warnings.warn(f"{s.path}: {len(s)} tokens, fewer than T+1 = {self.T + 1}; the "
                              "shard gives no row and is skipped", stacklevel=2)
        self._shards = [s for s in opened if len(s) > self.T]
        if not self._shards:
            longest = max(len(s) for s in opened)
            raise ValueError(f"DataLoader: none of the {len(opened)} shard(s) holds T+1 = "
                             f"{self.T + 1} tokens (the longest has {longest}); use --seq-len "
                             f"{longest - 1} or less, or more data")
        self._tokens = [s.tokens for s in self._shards]
        self._rows = np.array([(len(s) - 1) // self.T for s in self._shards], dtype=np.int64)
        self.rows_per_epoch = int(self._rows.sum())
        self.num_tokens = int(sum(len(s) for s in opened))
        if self.rows_per_epoch < self.world_size * self.B:
            warnings.warn(f"DataLoader: the shards hold {self.rows_per_epoch} rows of "
                          f"{self.T + 1} tokens, fewer than one global batch of world_size*B = "
                          f"{self.world_size * self.B}; batches will repeat rows", stacklevel=2)
        self._plan = None           # (epoch, shard order, cumulative rows in that order)
        self._perms = OrderedDict()  # (epoch, shard) -> row order, a few most recent
        self.reset()

    # ------------------------------------------------------------------------------------------
    # the row stream

    @property
    def epoch(self) -> int:
        return self._epoch

    def reset(self) -> None:
        """Back to the first row of epoch 0."""
        self._epoch, self._cursor = 0, 0

    def _epoch_plan(self, epoch: int):
        if self._plan is None or self._plan[0] != epoch:
            n = len(self._shards)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, 0, 0]).permutation(n)
            else:
                order = np.arange(n)
            self._plan = (epoch, order, np.cumsum(self._rows[order]))
        return self._plan

    def _row_order(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard) if self.shuffle else (0, shard)
        perm = self._perms.get(key)
        if perm is None:
            n = int(self._rows[shard])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, 1, shard]).permutation(n)
            else:
                perm = np.arange(n)
            self._perms[key] = perm
            while len(self._perms) > 8:
                self._perms.popitem(last=False)
        return perm

    def _locate(self, epoch: int, index: int):
        """Row `index` of epoch `epoch` -> (position in the epoch's shard order, shard, row)."""
        _, order, cum = self._epoch_plan(epoch)
        j = int(np.searchsorted(cum, index, side="right"))
        shard = int(order[j])
        row = int(self._row_order(epoch, shard)[index - (int(cum[j]) - int(self._rows[shard]))])
        return j, shard, row

    def next_batch(self):
        """This rank's next (inputs, targets), each int32 (B, T); targets are inputs shifted by 1."""
        B, T, R = self.B, self.T, self.rows_per_epoch
        inputs = np.empty((B, T), dtype=np.int32)
        targets = np.empty((B, T), dtype=np.int32)
        first = self._cursor + self.rank * B
        for i in range(B):
            epoch, index = divmod(first + i, R)
            _, shard, row = self._locate(self._epoch + epoch, index)
            tokens, start = self._tokens[shard], row * T
            inputs[i] = tokens[start:start + T]
            targets[i] = tokens[start + 1:start + T + 1]
        epochs, self._cursor = divmod(self._cursor + self.world_size * B, R)
        self._epoch += epochs
        return inputs, targets

    # ------------------------------------------------------------------------------------------
    # state

    def state_dict(self) -> dict:
        """The position (epoch, cursor) plus what it is only valid for; JSON-serializable."""
        j, shard, row = self._locate(self._epoch, self._cursor)
        return {"version": STATE_VERSION, "epoch": self._epoch, "cursor": self._cursor,
                "shard_index": j, "position": row * self.T, "B": self.B, "T": self.T,
                "world_size": self.world_size, "rank": self.rank, "seed": self.seed,
                "shuffle": self.shuffle, "shards": [list(f) for f in self._fingerprint]}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue exactly where `state` was taken (see the module docstring for `strict`)."""
        if not isinstance(state, dict):
            raise ValueError(f"DataLoader state must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"DataLoader state lacks {missing}; pass a dict from "
                             "DataLoader.state_dict()")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"DataLoader state version {state['version']} is not "
                             f"{STATE_VERSION}; it was saved by another llmc version")
        for key, fix in (("T", "--seq-len"), ("seed", "--seed"), ("shuffle", "shuffle=")):
            if state[key] != getattr(self, key):
                raise ValueError(f"DataLoader state was saved with {key}={state[key]!r}, this "
                                 f"loader has {key}={getattr(self, key)!r}; resume with the "
                                 f"same {fix}")
        if [list(f) for f in state["shards"]] != self._fingerprint:
            raise ValueError(f"DataLoader state was saved over other shards "
                             f"({_describe(state['shards'])}) than this loader's "
                             f"({_describe(self._fingerprint)}); resume with the same data")
        if strict and (state["B"], state["world_size"]) != (self.B, self.world_size):
            raise ValueError(
                f"DataLoader state was saved with B={state['B']}, world_size="
                f"{state['world_size']}; this loader has B={self.B}, world_size="
                f"{self.world_size}; resume with the same --batch-size and number of processes, "
                "or call load_state_dict(state, strict=False) to continue the same row stream")
        epoch, cursor = state["epoch"], state["cursor"]
        if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0
                and 0 <= cursor < self.rows_per_epoch):
            raise ValueError(f"DataLoader state has epoch={epoch!r}, cursor={cursor!r}; expected "
                             f"epoch >= 0 and 0 <= cursor < {self.rows_per_epoch}")
        j, shard, row = self._locate(epoch, cursor)
        if (state["shard_index"], state["position"]) != (j, row * self.T):
            raise ValueError(f"DataLoader state is inconsistent: cursor {cursor} is shard_index "
                             f"{j} position {row * self.T}, the state says "
                             f"{state['shard_index']} {state['position']}; it was edited or "
                             "damaged")
        self._epoch, self._cursor = epoch, cursor


def _describe(fingerprint) -> str:
    names = [f[0] for f in fingerprint]
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} shard(s): {shown}; {sum(f[1] for f in fingerprint)} tokens"


class DevicePrefetcher:
    """GPU batches from a DataLoader: pinned host buffers, async H2D copies on a side stream.

    `next_batch()` returns CuPy int32 (B, T) arrays, ready for the current stream, valid until
    the call after next (a ring of three buffers: handed out, handed out before, prefetched).
    `state_dict()` is the loader state after the batches handed out, never the prefetched one.
    """

    def __init__(self, loader: DataLoader, device_stream=None):
        import cupy
        import cupyx
        self._cupy = cupy
        self.loader = loader
        self.stream = device_stream if device_stream is not None else \
            cupy.cuda.Stream(non_blocking=True)
        shape = (2, loader.B, loader.T)
        self._slots = [dict(host=cupyx.empty_pinned(shape, dtype=np.int32),
                            dev=cupy.empty(shape, dtype=cupy.int32),
                            ready=cupy.cuda.Event(disable_timing=True)) for _ in range(3)]
        self._fill = 0
        self._pending = None  # (slot index, loader state before its batch)
        self._prefetch()

    def _prefetch(self) -> None:
        cupy = self._cupy
        index = self._fill
        slot = self._slots[index]
        self._fill = (index + 1) % len(self._slots)
        state = self.loader.state_dict()
        inputs, targets = self.loader.next_batch()
        slot["ready"].synchronize()  # the previous copy out of this pinned buffer is done
        slot["host"][0] = inputs
        slot["host"][1] = targets
        # The device buffer last held the batch handed out two calls ago; the copy waits for
        # everything the consumer has queued so far (which may still read it).
        consumed = cupy.cuda.Event(disable_timing=True)
        consumed.record(cupy.cuda.get_current_stream())
        self.stream.wait_event(consumed)
        slot["dev"].set(slot["host"], stream=self.stream)
        slot["ready"].record(self.stream)
        self._pending = (index, state)

    def next_batch(self):
        """(inputs, targets) CuPy int32 (B, T) on the current device, ordered on the current stream."""
        slot = self._slots[self._pending[0]]
        self._cupy.cuda.get_current_stream().wait_event(slot["ready"])
        self._prefetch()
        return slot["dev"][0], slot["dev"][1]

    def state_dict(self) -> dict:
        return dict(self._pending[1])

    def _refill(self) -> None:
        self._fill = self._pending[0]  # the prefetched batch is discarded; its slot is reused
        self._prefetch()

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.loader.load_state_dict(state, strict=strict)
        self._refill()

    def reset(self) -> None:
        self.loader.reset()
        self._refill()
