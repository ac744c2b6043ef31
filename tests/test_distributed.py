"""Rendezvous and environment parsing (llmc.dist.rendezvous, llmc.dist.store) and the watchdog of
llmc.dist.distributed, on the CPU.

Real subprocesses (tests/dist_probe.py) meet on localhost through the TCP store and through a
shared directory, exchanging a fake NCCL id; a rank that never arrives, dies or freezes makes the
others fail within a short timeout with a message naming it. NCCL itself is covered by
tests/test_multigpu.py on a GPU machine.

    pytest tests/test_distributed.py
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from llmc.dist.distributed import WATCHDOG_EXIT, Watchdog
from llmc.dist.rendezvous import (DistributedError, _slurm_tasks_on_node, exchange_id, first_host,
                             open_store, read_env)
from llmc.dist.store import FileStore, StoreError, TCPStoreClient, TCPStoreServer

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "dist_probe.py"
FAKE_ID = bytes((7 * i + 3) % 256 for i in range(128)).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out, rank, world, timeout, action="id", extra_env=None, port=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MV2_", "LLMC_"))}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port or 29500), PYTHONPATH=str(ROOT))
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, str(PROBE), str(out), str(timeout), action],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, limit=60):
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"a rank hung past {limit}s; stderr: {err}")
        results.append((p.returncode, err))
    return results


# ---------------------------------------------------------------------------------------------
# rendezvous across processes

@pytest.mark.parametrize("world", [2, 4])
def test_tcp_rendezvous_exchanges_the_id(tmp_path, world):
    port = free_port()
    # start the others first: they must wait for rank 0's store to come up
    procs = [spawn(tmp_path, r, world, 30, port=port) for r in range(world - 1, -1, -1)]
    for rc, err in finish(procs):
        assert rc == 0, err
    for r in range(world):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["id"] == FAKE_ID and got["rank"] == r and got["world_size"] == world
        assert got["source"] == "torchrun"


def test_file_rendezvous_exchanges_the_id(tmp_path):
    rdzv = tmp_path / "rdzv"
    # a crashed earlier run's leftovers: an id and acks under another nonce, no "go"
    old = FileStore(rdzv)
    old.set("id", json.dumps({"nonce": "stale", "world_size": 3, "id": ""}).encode())
    old.set("ack/1", b"stale")
    extra = {"LLMC_RENDEZVOUS": f"file://{rdzv}", "MASTER_ADDR": "", "MASTER_PORT": ""}
    procs = [spawn(tmp_path, r, 3, 30, extra_env=extra) for r in (2, 1, 0)]
    for rc, err in finish(procs):
        assert rc == 0, err
    for r in range(3):
        assert json.loads((tmp_path / f"rank{r}.json").read_text())["id"] == FAKE_ID


def test_file_rendezvous_run_id_subdirectory(tmp_path):
    extra = {"LLMC_RENDEZVOUS": f"file://{tmp_path / 'rdzv'}", "LLMC_RUN_ID": "job42"}
    procs = [spawn(tmp_path, r, 2, 30, extra_env=extra) for r in (1, 0)]
    for rc, err in finish(procs):
        assert rc == 0, err
    assert (tmp_path / "rdzv" / "job42").is_dir()


@pytest.mark.parametrize("store", ["tcp", "file"])
def test_missing_rank_is_named(tmp_path, store):
    extra = {"LLMC_RENDEZVOUS": f"file://{tmp_path / 'rdzv'}"} if store == "file" else {}
    port = free_port()
    t0 = time.monotonic()
    procs = [spawn(tmp_path, r, 3, 2, extra_env=extra, port=port) for r in (0, 1)]  # rank 2 never starts
    results = finish(procs, limit=30)
    assert time.monotonic() - t0 < 20
    for rc, err in results:
        assert rc != 0
        assert "rank 2" in err and ("never arrived" in err or "had not arrived" in err), err


def test_rank0_missing_tcp(tmp_path):
    procs = [spawn(tmp_path, 1, 2, 2, port=free_port())]
    (rc, err), = finish(procs, limit=30)
    assert rc != 0 and "could not reach the rendezvous store of rank 0" in err, err


def test_rank0_missing_file(tmp_path):
    extra = {"LLMC_RENDEZVOUS": f"file://{tmp_path / 'rdzv'}"}
    (rc, err), = finish([spawn(tmp_path, 1, 2, 2, extra_env=extra)], limit=30)
    assert rc != 0 and "rank 0 never published the NCCL id" in err, err


def test_world_size_mismatch(tmp_path):
    rdzv = {"LLMC_RENDEZVOUS": f"file://{tmp_path / 'rdzv'}"}
    p0 = spawn(tmp_path, 0, 2, 3, extra_env=rdzv)
    p1 = spawn(tmp_path, 1, 3, 3, extra_env=rdzv)
    (_, _), (rc1, err1) = finish([p0, p1], limit=30)
    assert rc1 != 0 and "world size 2" in err1 and "with 3" in err1, err1


# ---------------------------------------------------------------------------------------------
# watchdog across processes

def _wait_files(tmp_path, n, limit=30):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all((tmp_path / f"rank{r}.json").exists() for r in range(n)):
            return
        time.sleep(0.05)
    raise AssertionError("ranks did not get through the rendezvous")


def test_watchdog_dead_rank(tmp_path):
    port = free_port()
    procs = [spawn(tmp_path, 0, 3, 2, "watch", port=port), spawn(tmp_path, 1, 3, 2, "die", port=port),
             spawn(tmp_path, 2, 3, 2, "watch", port=port)]
    t0 = time.monotonic()
    (rc0, err0), (rc1, _), (rc2, err2) = finish(procs, limit=40)
    assert time.monotonic() - t0 < 25
    assert rc1 == 9
    for rc, err in ((rc0, err0), (rc2, err2)):  # whoever notices first tells the other
        assert rc == WATCHDOG_EXIT, err
        assert "rank 1 stopped responding" in err and "no heartbeat" in err, err
        assert "rank 0 stopped responding" not in err, err


def test_watchdog_frozen_rank(tmp_path):
    port = free_port()
    procs = [spawn(tmp_path, r, 2, 2, "watch", port=port) for r in (0, 1)]
    try:
        _wait_files(tmp_path, 2)
        os.kill(procs[1].pid, signal.SIGSTOP)  # a hang: alive, but nothing runs
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=30)
        assert time.monotonic() - t0 < 15
        assert procs[0].returncode == WATCHDOG_EXIT, err
        assert "[rank 0] error: rank 1 stopped responding" in err, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_watchdog_rank0_gone(tmp_path):
    port = free_port()
    procs = [spawn(tmp_path, r, 2, 2, "watch", port=port) for r in (0, 1)]
    try:
        _wait_files(tmp_path, 2)
        procs[0].kill()
        out, err = procs[1].communicate(timeout=30)
        assert procs[1].returncode == WATCHDOG_EXIT, err
        assert "rank 0 stopped responding" in err, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


class _Recording(Watchdog):
    def fail(self, msg, publish=True):
        self.failed = msg
        self._stop.set()


def _wait_for_heartbeats(store, ranks, limit_s=30.0):
    """Until every rank in `ranks` has written a heartbeat (a loaded machine may take a while)."""
    deadline = time.monotonic() + limit_s
    while any(v is None for v in store.get_many([f"hb/{r}" for r in ranks])):
        assert time.monotonic() < deadline, f"ranks {ranks} wrote no heartbeat in {limit_s}s"
        time.sleep(0.01)


def test_watchdog_names_rank_behind_a_collective():
    """Rank 0 waits on collective #5 that rank 1 issued and rank 2 did not.

    Rank 0's watchdog starts only after ranks 1 and 2 have published how many collectives they
    issued, so its first look at the store already knows both counts: the message it gives is
    fixed, whatever the load (before, a slow start of rank 1 made it "ranks 1, 2").
    """
    server = TCPStoreServer(0)
    try:
        store = server.local()
        old = time.monotonic() - 100
        w0 = _Recording(store, 0, 3, 1.0, interval_s=0.05, issued=lambda: 6,
                        pending=lambda: (5, "all_reduce", old))
        w1 = _Recording(store, 1, 3, 1.0, interval_s=0.05, issued=lambda: 6)  # issued #5
        w2 = _Recording(store, 2, 3, 1.0, interval_s=0.05, issued=lambda: 5)  # stuck before #5
        for w in (w0, w1, w2):
            w.failed = None
        w1.start(), w2.start()
        _wait_for_heartbeats(store, [1, 2])
        w0.start()
        w0._thread.join(30)
        assert w0.failed is not None
        assert "all_reduce (collective #5)" in w0.failed, w0.failed
        assert "rank 2 never issued it" in w0.failed, w0.failed
        for w in (w1, w2):  # they wait on no collective; at most they see rank 0 go silent
            assert w.failed is None or "collective" not in w.failed, w.failed
    finally:
        for w in (w0, w1, w2):
            w._stop.set()
        server.close()


def test_watchdog_ignores_a_rank_that_closed():
    """A rank that closed its watchdog (finished) is never blamed, however long it is silent."""
    server = TCPStoreServer(0)
    try:
        store = server.local()
        w0 = _Recording(store, 0, 2, 0.5, interval_s=0.05)
        w1 = _Recording(store, 1, 2, 0.5, interval_s=0.05)
        w0.failed = w1.failed = None
        w1.start()
        _wait_for_heartbeats(store, [1])
        w1.stop()  # writes "closed" before w0 ever looks, so no heartbeat age can count
        assert store.get("hb/1").startswith(b"closed")
        w0.start()
        time.sleep(1.5)  # three timeouts
        assert w0.failed is None, w0.failed
        w0.stop()
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# stores

def test_tcp_store_roundtrip_and_errors():
    server = TCPStoreServer(0)
    try:
        c = TCPStoreClient("127.0.0.1", server.port, connect_timeout_s=5)
        c.set("a/b", b"\x00\xffhello")
        assert c.get("a/b") == b"\x00\xffhello" and server.local().get("a/b") == b"\x00\xffhello"
        assert c.get_many(["a/b", "nope"]) == [b"\x00\xffhello", None]
        c.delete("a/b")
        assert c.get("a/b") is None
        threads = [threading.Thread(target=lambda i=i: c.set(f"k{i}", bytes([i]))) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert c.get_many([f"k{i}" for i in range(20)]) == [bytes([i]) for i in range(20)]
        with pytest.raises(StoreError, match="in use|cannot listen"):
            TCPStoreServer(server.port)
    finally:
        server.close()
    with pytest.raises(StoreError, match="unreachable|rendezvous store"):
        c.get("x")


def test_tcp_client_gives_up_with_address():
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:\d+ within 1s"):
        TCPStoreClient("127.0.0.1", free_port(), connect_timeout_s=1)
    assert time.monotonic() - t0 < 10


def test_exchange_id_in_threads_file_store(tmp_path):
    store = FileStore(tmp_path)
    got = {}

    def rank(r):
        got[r] = exchange_id(FileStore(tmp_path), r, 3, lambda: (1, -1, 127, -128), 10)
    threads = [threading.Thread(target=rank, args=(r,)) for r in (2, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {r: bytes([1, 255, 127, 128]) for r in range(3)}  # tuple ids (CuPy < 14) too
    assert store.get("go") is not None


# ---------------------------------------------------------------------------------------------
# environment parsing

def test_env_single_process():
    e = read_env({})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (0, 1, 0, "single")


def test_env_torchrun():
    e = read_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                  "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (5, 8, 1, 4)
    assert (e.master_addr, e.master_port, e.source) == ("node0", 1234, "torchrun")
    one_node = read_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert one_node.master_addr == "127.0.0.1" and one_node.master_port == 29500


def test_env_torchrun_errors():
    with pytest.raises(DistributedError, match="WORLD_SIZE is unset"):
        read_env({"RANK": "0"})
    with pytest.raises(DistributedError, match="not an integer"):
        read_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="rank 2 is not below the world size 2"):
        read_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="MASTER_ADDR is unset"):
        read_env({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(DistributedError, match="LLMC_RENDEZVOUS"):
        read_env({"RANK": "0", "WORLD_SIZE": "2", "LLMC_RENDEZVOUS": "nfs:/x"})
    with pytest.raises(DistributedError, match="local rank 4 is not below"):
        read_env({"RANK": "4", "WORLD_SIZE": "8", "LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "4",
                  "MASTER_ADDR": "h"})


def test_env_slurm():
    env = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0",
           "SLURM_STEP_TASKS_PER_NODE": "4(x4)", "SLURM_NODEID": "2", "SLURM_NTASKS": "16"}
    e = read_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (9, 16, 1, 4)
    assert (e.master_addr, e.master_port, e.source) == ("gpu007", 20000 + 123456 % 10000, "slurm")
    assert e.run_id == "123456.0"
    e2 = read_env(dict(env, MASTER_ADDR="login1", MASTER_PORT="4000"))
    assert (e2.master_addr, e2.master_port) == ("login1", 4000)


def test_env_slurm_batch_script_is_one_process():
    # sbatch sets these for the batch script; only srun sets the SLURM_STEP_* ones
    e = read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
                  "SLURM_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7"})
    assert (e.world_size, e.source) == (1, "single")


@pytest.mark.parametrize("env, want", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (3, 4, 1, 2)),
    ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}, (2, 3, 2, 3)),
    ({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "0"},
     (1, 2, 0, None)),
])
def test_env_mpi(env, want):
    e = read_env(dict(env, SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1"))  # mpirun inside an allocation
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == want
    assert e.source == "mpi" and e.master_addr is None
    assert read_env(dict(env, MASTER_ADDR="h0")).master_addr == "h0"


def test_mpi_without_mpi4py_or_master_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    e = read_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="pip install mpi4py"):
        open_store(e, 1)


@pytest.mark.parametrize("nodes, first", [
    ("gpu[003-007,9],cpu1", "gpu003"), ("a,b", "a"), ("rack[1-2]-n[01-04]", "rack1-n01"),
    ("node7", "node7"), ("n[5,2]", "n5"), ("x-[01-02]", "x-01")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_slurm_tasks_per_node():
    assert _slurm_tasks_on_node("4(x2),3", 2) == 3
    assert _slurm_tasks_on_node("4(x2),3", 1) == 4
    assert _slurm_tasks_on_node("bad", 0) is None


# ---------------------------------------------------------------------------------------------
# Dist's bookkeeping around NCCL, with CuPy and NCCL replaced by recorders

class _Arr:
    def __init__(self, size, dtype="float32", contiguous=True, ptr=1000, device=0):
        import numpy as np
        self.size, self.dtype = size, np.dtype(dtype)
        self.flags = types.SimpleNamespace(c_contiguous=contiguous)
        self.data = types.SimpleNamespace(ptr=ptr)
        self.device = types.SimpleNamespace(id=device)


class _Ev:
    def __init__(self, **kw):
        self.done = False

    def record(self, stream=None):
        self.stream = stream


class _Comm:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


@pytest.fixture
def fake_nccl(monkeypatch):
    nccl = types.SimpleNamespace(NCCL_FLOAT32=7, NCCL_BFLOAT16=9, NCCL_INT32=2, NCCL_SUM=0,
                                 NCCL_AVG=4, NCCL_MAX=2, NCCL_MIN=3, groups=[])
    nccl.groupStart = lambda: nccl.groups.append("start")
    nccl.groupEnd = lambda: nccl.groups.append("end")
    stream = types.SimpleNamespace(ptr=0)
    cuda = types.SimpleNamespace(nccl=nccl, Event=_Ev, get_current_stream=lambda: stream)
    cupy = types.SimpleNamespace(ndarray=_Arr, cuda=cuda)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    return nccl


def _dist(world=2, rank=1):
    from llmc.dist.distributed import Dist
    from llmc.dist.rendezvous import LaunchEnv
    d = Dist(LaunchEnv(rank, world, rank, world, "h", 1, None, "torchrun"), device=0)
    d.comm = _Comm()
    return d


def test_dist_calls_nccl_with_the_right_arguments(fake_nccl):
    d = _dist()
    side = types.SimpleNamespace(ptr=55)
    d.all_reduce(_Arr(10, ptr=1), op="avg")
    d.reduce(_Arr(6, "bfloat16", ptr=2), root=0, op="sum", stream=side)
    d.broadcast(_Arr(4, "int32", ptr=3), root=1)
    d.reduce_scatter(_Arr(8, ptr=4), _Arr(4, ptr=5), op="max")
    d.all_gather(_Arr(3, ptr=6), _Arr(6, ptr=7))
    assert d.comm.calls == [
        ("allReduce", (1, 1, 10, 7, 4, 0)),
        ("reduce", (2, 2, 6, 9, 0, 0, 55)),
        ("broadcast", (3, 3, 4, 2, 1, 0)),
        ("reduceScatter", (4, 5, 4, 7, 2, 0)),
        ("allGather", (6, 7, 3, 7, 0)),
    ]
    assert d._issued == 5 and [p[0] for p in d._pending] == [0, 1, 2, 3, 4]


def test_dist_group_is_one_pending_collective(fake_nccl):
    d = _dist()
    side = types.SimpleNamespace(ptr=55)
    with d.group():
        d.reduce(_Arr(6), root=0, stream=side)
        d.reduce(_Arr(6), root=1, stream=side)
    assert fake_nccl.groups == ["start", "end"] and len(d.comm.calls) == 2
    assert d._issued == 1 and d._pending[0][3].stream is side
    with pytest.raises(ValueError, match="same stream"):
        with d.group():
            d.reduce(_Arr(6), root=0, stream=side)
            d.reduce(_Arr(6), root=1)
    assert fake_nccl.groups[-1] == "end"  # the group is closed even when it fails


def test_dist_oldest_pending_skips_finished(fake_nccl):
    d = _dist()
    for _ in range(3):
        d.all_reduce(_Arr(1))
    d._pending[0][3].done = True
    assert d._oldest_pending()[:2] == (1, "all_reduce")
    for p in list(d._pending):
        p[3].done = True
    assert d._oldest_pending() is None


def test_dist_validates_buffers(fake_nccl):
    d = _dist()
    with pytest.raises(ValueError, match="expected a CuPy array"):
        d.all_reduce([1.0])
    with pytest.raises(ValueError, match="C-contiguous"):
        d.all_reduce(_Arr(4, contiguous=False))
    with pytest.raises(ValueError, match="on GPU 1, this rank uses GPU 0"):
        d.all_reduce(_Arr(4, device=1))
    with pytest.raises(ValueError, match="has no NCCL type"):
        d.all_reduce(_Arr(4, "complex64"))
    with pytest.raises(ValueError, match="op must be one of"):
        d.all_reduce(_Arr(4), op="mean")
    with pytest.raises(ValueError, match="root must be a rank"):
        d.broadcast(_Arr(4), root=2)
    with pytest.raises(ValueError, match="world_size\\*recv.size = 2\\*4"):
        d.reduce_scatter(_Arr(7), _Arr(4))
    with pytest.raises(ValueError, match="world_size\\*send.size = 2\\*3"):
        d.all_gather(_Arr(3), _Arr(5))
    assert d.comm.calls == []


def test_dist_alone_issues_nothing(fake_nccl):
    d = _dist(world=1, rank=0)
    d.all_reduce(_Arr(4), op="avg")
    d.reduce(_Arr(4), root=0)
    d.broadcast(_Arr(4))
    with d.group():
        d.all_reduce(_Arr(4))
    d.barrier()
    assert d.broadcast_object({"a": 1}) == {"a": 1}
    assert d.comm.calls == [] and fake_nccl.groups == [] and d._issued == 0
