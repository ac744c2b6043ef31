"""Many GPUs, many nodes: the NCCL communicator (`Dist`) and the watchdog that keeps it honest.

One process per GPU. `init_distributed()` reads the launcher's environment and meets the other
ranks (llmc.dist.rendezvous), builds one `cupy.cuda.nccl.NcclCommunicator` and returns a `Dist`:

    dist = init_distributed()            # world size 1: no NCCL, every collective a no-op
    dist.all_reduce(buf, op="avg")       # in place, on the current stream (or stream=)
    dist.reduce_scatter(send, recv) ; dist.all_gather(send, recv) ; dist.reduce(buf, root)
    dist.broadcast(buf, root) ; with dist.group(): ...  (NCCL group: one launch for many ops)
    dist.barrier() ; dist.broadcast_object(obj) ; dist.log(msg) ; dist.warn(msg) ; dist.close()

The device is chosen from the local rank (`cupy.cuda.Device(local_rank).use()`; a process that
sees a single GPU, as with `srun --gpus-per-task=1`, uses it whatever its local rank).

Failure handling: every rank runs a watchdog thread that writes a heartbeat to the store and
reads everyone's. It ends the process (NCCL communicator aborted first, exit code
`WATCHDOG_EXIT`) with "[rank R] error: rank K stopped responding ..." when a peer's heartbeat
has not changed for `timeout_s`, when the store (rank 0) has been unreachable that long, or when
a collective this rank issued has not completed after `timeout_s` (naming the ranks that never
issued it); the first rank to give up writes why into the store and the others repeat it.
timeout_s: argument, else $LLMC_DIST_TIMEOUT, else 300 s (first steps compile kernels, so not
much less). Errors before training raise `DistributedError` (an OSError: one line from llmc.train).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
from collections import deque

from llmc.dist.rendezvous import (DistributedError, LaunchEnv, _ranks, exchange_id, open_store,  # noqa: F401
                             read_env)
from llmc.dist.store import FileStore

DEFAULT_TIMEOUT_S = 300.0
WATCHDOG_EXIT = 3  # exit code of a rank that gave up on a peer


# ----------------------------------------------------------------------------------------------
# Watchdog

class Watchdog:
    """Heartbeats through the store; ends the process when a peer or a collective stalls.

    pending() -> (index, name, t_issued) of the oldest unfinished collective, or None;
    issued() -> collectives issued so far; abort() is called before exiting (NCCL abort).
    """

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, *, where: str = "",
                 interval_s: float | None = None, pending=None, issued=None, abort=None,
                 device: int | None = None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.where = float(timeout_s), where
        self.interval_s = interval_s if interval_s is not None else max(0.05, min(5.0, timeout_s / 10))
        self._pending = pending or (lambda: None)
        self._issued = issued or (lambda: 0)
        self._abort = abort
        self._device = device
        self._stop = threading.Event()
        self.failing = threading.Event()  # set once fail() runs: the process is about to exit 3
        self._thread = threading.Thread(target=self._run, name="llmc-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and tell the peers this rank left on purpose."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(OSError):
            self.store.set(f"hb/{self.rank}", f"closed {self._issued()}".encode())

    def _run(self) -> None:
        if self._device is not None:
            import cupy
            cupy.cuda.Device(self._device).use()
        peers = [r for r in range(self.world_size) if r != self.rank]
        keys = [f"hb/{r}" for r in peers] + ["abort"]
        start = time.monotonic()
        seen = {r: (None, start) for r in peers}
        issued, closed = {}, set()
        last_ok, beat = start, 0
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            beat += 1
            try:
                self.store.set(f"hb/{self.rank}", f"{beat} {self._issued()}".encode())
                values = self.store.get_many(keys)
                last_ok = now
            except (OSError, ValueError) as e:
                values = None
                if now - last_ok > self.timeout_s:
                    self.fail(f"rank 0 stopped responding: the rendezvous store at {self.where} "
                              f"has been unreachable for {now - last_ok:.0f}s ({e})", publish=False)
            if values is not None:
                if values[-1] is not None:  # another rank gave up and said why
                    self.fail(values[-1].decode(), publish=False)
                for r, v in zip(peers, values):
                    if v is not None:
                        state, _, n = v.decode().partition(" ")
                        issued[r] = int(n) if n.isdigit() else 0
                        if state == "closed":
                            closed.add(r)
                    if v != seen[r][0]:
                        seen[r] = (v, now)
            # ages as observed while the store answered: a store outage alone blames no peer
            stale = [r for r in peers if r not in closed and last_ok - seen[r][1] > self.timeout_s]
            if stale:
                age = max(last_ok - seen[r][1] for r in stale)
                self.fail(f"{_ranks(stale)} stopped responding: no heartbeat for {age:.0f}s "
                          f"(timeout {self.timeout_s:.0f}s); the process died, froze or lost its network")
            p = self._pending()
            if p is not None and now - p[2] > self.timeout_s:
                index, name, t0 = p
                behind = [r for r in peers if issued.get(r, 0) <= index]
                who = (f"{_ranks(behind)} never issued it (stuck or exited)" if behind else
                       "every rank issued it, so NCCL itself is stuck (network? NCCL_DEBUG=INFO "
                       "tells more)")
                self.fail(f"{name} (collective #{index}) has not completed after {now - t0:.0f}s: {who}")

    def fail(self, msg: str, publish: bool = True) -> None:
        """Tell the others why (through the store), abort NCCL, exit with WATCHDOG_EXIT."""
        self.failing.set()
        if publish:
            with contextlib.suppress(OSError, ValueError):
                self.store.set("abort", f"{msg} (seen by rank {self.rank})".encode())
        print(f"[rank {self.rank}] error: {msg}; aborting NCCL and exiting with code "
              f"{WATCHDOG_EXIT} (timeout: LLMC_DIST_TIMEOUT={self.timeout_s:.0f})",
              file=sys.stderr, flush=True)
        if self._abort is not None:
            t = threading.Thread(target=self._abort, daemon=True)
            t.start()
            t.join(10.0)  # an abort that hangs must not keep the process alive
        if publish and self.rank == 0:
            time.sleep(2 * self.interval_s + 0.1)  # rank 0 hosts the store: let the others read why
        os._exit(WATCHDOG_EXIT)


# ----------------------------------------------------------------------------------------------
# The communicator

def _select_device(local_rank: int) -> int:
    import cupy
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any CUDA failure here means no usable GPU
        raise DistributedError(f"no usable CUDA device ({type(e).__name__}: {e})") from e
    if n == 1:
        device = 0  # one GPU bound per task (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES)
    elif local_rank < n:
        device = local_rank
    else:
        raise DistributedError(f"local rank {local_rank} has no GPU: only {n} visible on this node; "
                               f"start at most {n} processes per node")
    cupy.cuda.Device(device).use()
    return device


class Dist:
    """This process's view of the run. World size 1: no NCCL; collectives are no-ops."""

    def __init__(self, env: LaunchEnv, *, device: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.env = env
        self.rank, self.world_size = env.rank, env.world_size
        self.local_rank, self.local_world_size = env.local_rank, env.local_world_size
        self.is_main = self.rank == 0
        self.device, self.timeout_s = device, timeout_s
        self.comm = None
        self._store = self._server = self._watchdog = None
        self._lock = threading.Lock()
        self._issued = 0
        self._pending = deque()  # (index, name, t_issued, event or None)
        self._group = None       # [stream ptr, names] while inside group()

    # ---- set-up (init_distributed) -----------------------------------------------------------
    def _connect(self, store, server, where: str, uid: bytes) -> None:
        from cupy.cuda import nccl
        self._store, self._server = store, server
        self._watchdog = Watchdog(store, self.rank, self.world_size, self.timeout_s, where=where,
                                  pending=self._oldest_pending, issued=lambda: self._issued,
                                  abort=self._abort, device=self.device).start()
        self._pending.append((0, "NCCL communicator init", time.monotonic(), None))
        self._issued = 1
        try:
            try:
                self.comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)
            except TypeError:  # CuPy < 14 takes the id as a tuple of signed chars
                self.comm = nccl.NcclCommunicator(
                    self.world_size, tuple(b - 256 if b > 127 else b for b in uid), self.rank)
        except nccl.NcclError as e:
            self._watchdog._stop.set()
            raise DistributedError(f"rank {self.rank}: NCCL could not build the communicator ({e}); "
                                   "NCCL_DEBUG=INFO shows why (network interface: NCCL_SOCKET_IFNAME)") from e
        with self._lock:
            self._pending.popleft()
        atexit.register(self._at_exit)

    def _abort(self) -> None:
        if self.comm is not None:
            self.comm.abort()

    def _yield_to_watchdog(self) -> None:
        """Once the watchdog has started failing, the abort it issued makes NCCL calls return
        with garbage; the main thread must not race it to an exit with another code or message,
        so it waits here for the watchdog's exit (code 3, with the message naming the rank)."""
        if self._watchdog is not None and self._watchdog.failing.is_set():
            while True:
                time.sleep(1.0)

    def _at_exit(self) -> None:
        """Leaving without close() (an exception, or a script that never called it): no barrier
        (the others may be elsewhere), just stop the heartbeats and abort NCCL, which never blocks."""
        self._yield_to_watchdog()
        if self.comm is not None:
            self._watchdog._stop.set()
            self._abort()
            self.comm = None

    def _oldest_pending(self):
        with self._lock:
            while self._pending and self._pending[0][3] is not None and self._pending[0][3].done:
                self._pending.popleft()
            return self._pending[0][:3] if self._pending else None

    # ---- collectives -------------------------------------------------------------------------
    _DTYPES = ("float32", "bfloat16", "float16", "float64", "int32", "int64", "uint8")
    _OPS = ("sum", "avg", "max", "min")

    def _args(self, name, buf, stream, op=None):
        """Validate; -> (NCCL dtype or None when alone, NCCL op or None, stream)."""
        import cupy
        if not isinstance(buf, cupy.ndarray):
            raise ValueError(f"{name}: expected a CuPy array, got {type(buf).__name__}")
        if not buf.flags.c_contiguous:
            raise ValueError(f"{name}: the buffer must be C-contiguous")
        if self.device is not None and buf.device.id != self.device:
            raise ValueError(f"{name}: the buffer is on GPU {buf.device.id}, this rank uses GPU {self.device}")
        if buf.dtype.name not in self._DTYPES:
            raise ValueError(f"{name}: dtype {buf.dtype} has no NCCL type; use one of {', '.join(self._DTYPES)}")
        if op is not None and op not in self._OPS:
            raise ValueError(f"{name}: op must be one of {', '.join(self._OPS)}, got {op!r}")
        stream = stream if stream is not None else cupy.cuda.get_current_stream()
        if self.world_size == 1:
            return None, None, stream
        from cupy.cuda import nccl
        dtype = getattr(nccl, "NCCL_" + buf.dtype.name.upper())
        return dtype, (getattr(nccl, "NCCL_" + op.upper()) if op is not None else None), stream

    def _issue(self, name, stream) -> None:
        """Count one collective; remember an event after it for the watchdog (groups: at the end)."""
        if self._group is not None:
            if self._group[0] not in (None, stream.ptr):
                raise ValueError("all collectives of one dist.group() must use the same stream")
            self._group[0] = stream.ptr
            self._group[1].append(name)
            self._group[2] = stream
            return
        import cupy
        event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        with self._lock:
            self._pending.append((self._issued, name, time.monotonic(), event))
            self._issued += 1
            while len(self._pending) > 1 and self._pending[0][3] is not None and self._pending[0][3].done:
                self._pending.popleft()

    @contextlib.contextmanager
    def group(self):
        """Fuse the collectives issued inside into one NCCL launch (ncclGroupStart/End)."""
        if self.world_size == 1 or self._group is not None:
            yield
            return
        from cupy.cuda import nccl
        self._group = [None, [], None]
        nccl.groupStart()
        try:
            yield
        finally:
            _, names, stream = self._group
            self._group = None
            nccl.groupEnd()
        if names:
            self._issue(f"group of {len(names)} ({names[0]}, ...)", stream)

    def all_reduce(self, buf, op: str = "sum", stream=None):
        """buf (any shape) = op over ranks of buf, in place."""
        dtype, nop, stream = self._args("all_reduce", buf, stream, op)
        if self.world_size > 1:
            self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, nop, stream.ptr)
            self._issue("all_reduce", stream)
        return buf

    def reduce(self, buf, root: int, op: str = "sum", stream=None):
        """On rank `root`: buf = op over ranks of buf, in place; elsewhere buf is only read."""
        dtype, nop, stream = self._args("reduce", buf, stream, op)
        self._check_root(root)
        if self.world_size > 1:
            self.comm.reduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, nop, root, stream.ptr)
            self._issue("reduce", stream)
        return buf

    def broadcast(self, buf, root: int = 0, stream=None):
        """buf = rank root's buf, in place."""
        dtype, _, stream = self._args("broadcast", buf, stream)
        self._check_root(root)
        if self.world_size > 1:
            self.comm.broadcast(buf.data.ptr, buf.data.ptr, buf.size, dtype, root, stream.ptr)
            self._issue("broadcast", stream)
        return buf

    def reduce_scatter(self, send, recv, op: str = "sum", stream=None):
        """recv (n,) = op over ranks of send[rank*n:(rank+1)*n]; send has world_size*n elements."""
        dtype, nop, stream = self._args("reduce_scatter send", send, stream, op)
        self._args("reduce_scatter recv", recv, stream)
        if recv.dtype != send.dtype or send.size != recv.size * self.world_size:
            raise ValueError(f"reduce_scatter: send must have world_size*recv.size = "
                             f"{self.world_size}*{recv.size} elements of recv's dtype {recv.dtype}, "
                             f"got {send.size} of {send.dtype}")
        if self.world_size > 1:
            self.comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, dtype, nop, stream.ptr)
            self._issue("reduce_scatter", stream)
        elif send.data.ptr != recv.data.ptr:  # raw bytes: no CuPy kernel has to know bfloat16
            recv.data.copy_from_device_async(send.data, send.nbytes, stream)
        return recv

    def all_gather(self, send, recv, stream=None):
        """recv[r*n:(r+1)*n] = rank r's send (n elements); recv has world_size*n elements."""
        dtype, _, stream = self._args("all_gather send", send, stream)
        self._args("all_gather recv", recv, stream)
        if recv.dtype != send.dtype or recv.size != send.size * self.world_size:
            raise ValueError(f"all_gather: recv must have world_size*send.size = "
                             f"{self.world_size}*{send.size} elements of send's dtype {send.dtype}, "
                             f"got {recv.size} of {recv.dtype}")
        if self.world_size > 1:
            self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, dtype, stream.ptr)
            self._issue("all_gather", stream)
        elif send.data.ptr != recv.data.ptr:
            recv.data.copy_from_device_async(send.data, send.nbytes, stream)
        return recv

    def _check_root(self, root):
        if not 0 <= root < self.world_size:
            raise ValueError(f"root must be a rank in [0, {self.world_size}), got {root}")

    def barrier(self) -> None:
        """Wait (host and device) until every rank got here."""
        if self.world_size == 1:
            return
        import cupy
        token = cupy.ones(1, dtype=cupy.int32)
        self.all_reduce(token)
        cupy.cuda.get_current_stream().synchronize()
        if int(token[0]) != self.world_size:
            self._yield_to_watchdog()
            raise DistributedError(f"barrier counted {int(token[0])} ranks, expected {self.world_size}")

    def broadcast_object(self, obj=None, root: int = 0):
        """A small JSON-serializable host object from rank `root` to every rank (blocks)."""
        if self.world_size == 1:
            return obj
        import cupy
        import numpy as np
        data = json.dumps(obj).encode() if self.rank == root else b""
        size = cupy.array([len(data)], dtype=cupy.int64)
        self.broadcast(size, root)
        buf = cupy.zeros(int(size[0]), dtype=cupy.uint8)
        if self.rank == root and data:
            buf.set(np.frombuffer(data, dtype=np.uint8))
        if buf.size:
            self.broadcast(buf, root)
        return json.loads(buf.get().tobytes()) if self.rank != root else obj

    # ---- logging -----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        """Print on rank 0 only (step lines, summaries)."""
        if self.is_main:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        """Print on every rank, tagged, to stderr."""
        print(f"[rank {self.rank}] {msg}", file=sys.stderr, flush=True)

    # ---- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Leave together: barrier, stop heartbeats, destroy NCCL; rank 0 stops the store last."""
        if self.world_size == 1 or self.comm is None:
            return
        self.barrier()
        self._watchdog.stop()
        if self.rank == 0:  # keep the store up until every rank has said goodbye
            deadline = time.monotonic() + min(30.0, self.timeout_s)
            keys = [f"hb/{r}" for r in range(1, self.world_size)]
            while time.monotonic() < deadline:
                if all(v is not None and v.startswith(b"closed") for v in self._store.get_many(keys)):
                    break
                time.sleep(0.05)
        self.comm.destroy()
        self.comm = None
        if self._server is not None:
            self._server.close()
        elif isinstance(self._store, FileStore) and self.rank == 0:
            for r in range(self.world_size):
                self._store.delete(f"hb/{r}")
        self._store.close()


def init_distributed(timeout_s: float | None = None, device: str = "cuda") -> Dist:
    """Meet the other ranks and build the communicator (see the module docstring)."""
    if timeout_s is None:
        raw = os.environ.get("LLMC_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(raw)
        except ValueError:
            raise DistributedError(f"LLMC_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if timeout_s <= 0:
        raise DistributedError(f"the distributed timeout must be positive, got {timeout_s}")
    env = read_env()
    if env.world_size == 1:
        return Dist(env, device=_select_device(env.local_rank) if device == "cuda" else None,
                    timeout_s=timeout_s)
    if device != "cuda":
        raise DistributedError(f"{env.world_size} processes ({env.source}): multi-process training "
                               "runs on GPUs only; use --device cuda")
    from cupy.cuda import nccl
    if not nccl.available:
        raise DistributedError("CuPy cannot load NCCL (libnccl.so.2); pip install nvidia-nccl-cu12 "
                               "(or -cu13 to match your CuPy)")
    dist = Dist(env, device=_select_device(env.local_rank), timeout_s=timeout_s)
    store, server, where = open_store(env, timeout_s)
    uid = exchange_id(store, env.rank, env.world_size, nccl.get_unique_id, timeout_s, where)
    dist._connect(store, server, where, uid)
    dist.barrier()  # the first collective proves the communicator works
    if dist.rank == 0 and isinstance(store, FileStore):
        for key in ["id", "go"] + [f"ack/{r}" for r in range(1, env.world_size)]:
            store.delete(key)  # everyone is past the rendezvous: no stale id for the next run
    return dist
