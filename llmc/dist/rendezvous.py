"""Who am I (rank, world size) and how the ranks meet: the launcher's environment, the store, the id.

Who am I, in this order (`read_env`):
1. torchrun-style RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
   (what `python -m llmc.launch` sets);
2. mpirun: OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE} (Open MPI),
   PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH, Intel MPI), MV2_COMM_WORLD_* (MVAPICH);
3. srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; the master is MASTER_ADDR or the
   first host of SLURM_STEP_NODELIST, the port MASTER_PORT or 20000 + SLURM_JOB_ID % 10000
   (a batch script itself, outside srun, is one process);
4. none of them: one process.

How the ranks meet (`open_store`; the NCCL unique id travels from rank 0 to the others):
- LLMC_RENDEZVOUS=file:///shared/dir: files on a shared filesystem (llmc.dist.store.FileStore), in a
  subdirectory named by LLMC_RUN_ID or SLURM_JOB_ID when set. Give each run a fresh directory
  otherwise: files a crashed run leaves behind are cleaned by the next rank 0, but a rank that
  starts before it could read them.
- LLMC_RENDEZVOUS=tcp://host:port, or MASTER_ADDR:MASTER_PORT: a TCP store served by rank 0.
- under mpirun without MASTER_ADDR: mpi4py (when importable) broadcasts rank 0's host name and
  the port its store listens on; then as above.

Protocol (`exchange_id`): rank 0 publishes {nonce, world size, id}; every rank acknowledges the
nonce; rank 0 releases everyone with "go". Timing out names the ranks that never arrived.
Everything raises `DistributedError`, an OSError, which `llmc.train` prints as one line.
"""
from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from llmc.dist.store import FileStore, StoreError, TCPStoreClient, TCPStoreServer

DEFAULT_PORT = 29500


class DistributedError(OSError):
    """The run cannot start or continue across processes; the message names the fix."""


# ----------------------------------------------------------------------------------------------
# Who am I

@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    master_addr: str | None
    master_port: int
    rendezvous: str | None  # "file:///dir", "tcp://host:port" or None (MASTER_ADDR:PORT)
    source: str             # "single", "torchrun", "mpi", "slurm"
    run_id: str | None = None


def _int(environ, name, lo=0):
    raw = environ.get(name)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < lo:
        raise DistributedError(f"environment variable {name}={value} must be >= {lo}")
    return value


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: "gpu[003-007,9],cpu1" -> "gpu003"."""
    head = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    host = re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", head)
    if not host or "[" in host:
        raise DistributedError(f"cannot read the first host of SLURM node list {nodelist!r}; "
                               "export MASTER_ADDR=<first node's host name>")
    return host


def _slurm_tasks_on_node(spec: str, node_id: int) -> int | None:
    """SLURM_STEP_TASKS_PER_NODE "4(x2),3" and the node's index -> tasks on that node."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


_MPI_VARS = (  # (rank, size, local rank, local size)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
)


def read_env(environ=None) -> LaunchEnv:
    """This process's place in the run, from the launcher's environment variables."""
    env = os.environ if environ is None else environ
    rdzv = env.get("LLMC_RENDEZVOUS") or None
    if rdzv is not None and not rdzv.startswith(("file://", "tcp://")):
        raise DistributedError(f"LLMC_RENDEZVOUS={rdzv!r}: expected file:///shared/dir or tcp://host:port")
    port = _int(env, "MASTER_PORT", 1) if env.get("MASTER_PORT") else None
    addr = env.get("MASTER_ADDR") or None
    run_id = env.get("LLMC_RUN_ID") or None

    if "RANK" in env or "WORLD_SIZE" in env:
        for name in ("RANK", "WORLD_SIZE"):
            if name not in env:
                raise DistributedError(f"{name} is unset while {'WORLD_SIZE' if name == 'RANK' else 'RANK'} "
                                       "is set; a launcher must set both (llmc.launch does)")
        world = _int(env, "WORLD_SIZE", 1)
        rank = _int(env, "RANK")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE", 1) if "LOCAL_WORLD_SIZE" in env else None
        if addr is None and world > 1 and rdzv is None:
            if local_world is not None and local_world < world:
                raise DistributedError(f"WORLD_SIZE={world} spans several nodes "
                                       f"(LOCAL_WORLD_SIZE={local_world}) but MASTER_ADDR is unset; "
                                       "export MASTER_ADDR=<rank 0's host> on every node")
            addr = "127.0.0.1"
        source = "torchrun"
    else:
        mpi = next((v for v in _MPI_VARS if v[0] in env and v[1] in env), None)
        if mpi is not None:
            rank, world = _int(env, mpi[0]), _int(env, mpi[1], 1)
            local = _int(env, mpi[2]) if mpi[2] in env else 0
            local_world = _int(env, mpi[3], 1) if mpi[3] in env else None
            source = "mpi"
        elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
            rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS", 1)
            local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
            local_world = None
            if "SLURM_STEP_TASKS_PER_NODE" in env and "SLURM_NODEID" in env:
                local_world = _slurm_tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"], _int(env, "SLURM_NODEID"))
            if addr is None:
                nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
                if nodes is None and world > 1 and rdzv is None:
                    raise DistributedError("srun did not set SLURM_STEP_NODELIST; export MASTER_ADDR")
                addr = first_host(nodes) if nodes else "127.0.0.1"
            if port is None and env.get("SLURM_JOB_ID", "").isdigit():
                port = 20000 + int(env["SLURM_JOB_ID"]) % 10000
            if run_id is None and env.get("SLURM_JOB_ID"):
                run_id = f"{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
            source = "slurm"
        else:
            rank, world, local, local_world, source = 0, 1, 0, 1, "single"
        if source == "mpi" and run_id is None and env.get("SLURM_JOB_ID"):
            run_id = env["SLURM_JOB_ID"]
    if rank >= world:
        raise DistributedError(f"rank {rank} is not below the world size {world} ({source} variables)")
    if local_world is not None and local >= local_world:
        raise DistributedError(f"local rank {local} is not below the local world size {local_world}")
    return LaunchEnv(rank=rank, world_size=world, local_rank=local, local_world_size=local_world,
                     master_addr=addr, master_port=port if port is not None else DEFAULT_PORT,
                     rendezvous=rdzv, source=source, run_id=run_id)


# ----------------------------------------------------------------------------------------------
# Rendezvous

def open_store(env: LaunchEnv, timeout_s: float):
    """(store, server or None, address): rank 0 serves a TCP store; or the shared directory."""
    if env.rendezvous and env.rendezvous.startswith("file://"):
        base = Path(env.rendezvous[len("file://"):])
        path = base / env.run_id if env.run_id else base
        return FileStore(path), None, f"file://{path}"
    if env.rendezvous:
        hostport = env.rendezvous[len("tcp://"):]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"LLMC_RENDEZVOUS={env.rendezvous!r}: expected tcp://host:port")
        addr, port = host, int(port)
    elif env.master_addr is None and env.source == "mpi":
        return _open_store_mpi(env, timeout_s)
    else:
        addr, port = env.master_addr, env.master_port
    if env.rank == 0:
        server = TCPStoreServer(port)
        return server.local(), server, f"{addr}:{port}"
    return TCPStoreClient(addr, port, connect_timeout_s=timeout_s), None, f"{addr}:{port}"


def _open_store_mpi(env: LaunchEnv, timeout_s: float):
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError(
            "running under mpirun without MASTER_ADDR and without mpi4py: pip install mpi4py, or "
            "export MASTER_ADDR/MASTER_PORT to every rank (mpirun -x), or set "
            "LLMC_RENDEZVOUS=file:///shared/dir") from None
    comm = MPI.COMM_WORLD
    if comm.Get_rank() != env.rank or comm.Get_size() != env.world_size:
        raise DistributedError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, the "
                               f"environment rank {env.rank} of {env.world_size}")
    server = TCPStoreServer(0) if env.rank == 0 else None
    host, port = comm.bcast((socket.gethostname(), server.port) if server else None, root=0)
    if server is not None:
        return server.local(), server, f"{host}:{port}"
    return TCPStoreClient(host, port, connect_timeout_s=timeout_s), None, f"{host}:{port}"


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    shown = ", ".join(map(str, ranks[:16])) + (f" (+{len(ranks) - 16} more)" if len(ranks) > 16 else "")
    return ("rank " if len(ranks) == 1 else "ranks ") + shown


def exchange_id(store, rank: int, world_size: int, make_id, timeout_s: float, where: str = "") -> bytes:
    """Rank 0 calls make_id() -> bytes and every rank returns those bytes (see the docstring)."""
    deadline = time.monotonic() + timeout_s
    peers = range(1, world_size)
    missing = None
    try:
        if rank == 0:
            for key in ["go", "abort", "hb/0"] + [f"{k}/{r}" for r in peers for k in ("ack", "hb")]:
                store.delete(key)  # what a crashed earlier run left (file store)
            nonce = secrets.token_hex(8)
            uid = make_id()  # CuPy >= 14: bytes; older: a tuple of signed chars
            uid = bytes(uid) if isinstance(uid, (bytes, bytearray)) else bytes(v & 0xFF for v in uid)
            store.set("id", json.dumps({"nonce": nonce, "world_size": world_size,
                                        "id": base64.b64encode(uid).decode()}).encode())
            missing = list(peers)
            while missing:
                acks = store.get_many([f"ack/{r}" for r in missing])
                missing = [r for r, a in zip(missing, acks) if a != nonce.encode()]
                if missing and time.monotonic() > deadline:
                    raise DistributedError(
                        f"rendezvous at {where} timed out after {timeout_s:.0f}s: {_ranks(missing)} "
                        f"of {world_size} never arrived; start every rank with the same WORLD_SIZE "
                        "and rendezvous address (a node may have failed to start)")
                time.sleep(0.02 if missing else 0)
            store.set("go", nonce.encode())
            return uid
        acked, uid, missing, polls = None, None, None, 0
        while True:
            raw = store.get("id")
            if raw is not None:
                msg = json.loads(raw)
                if msg["world_size"] != world_size:
                    raise DistributedError(f"rank 0 runs with world size {msg['world_size']}, this "
                                           f"rank with {world_size}; start every rank with the same one")
                if msg["nonce"] != acked:
                    store.set(f"ack/{rank}", msg["nonce"].encode())
                    acked, uid = msg["nonce"], base64.b64decode(msg["id"])
                if store.get("go") == acked.encode():
                    return uid
                polls += 1
                if polls % 20 == 1:  # who rank 0 still waits for, should rank 0 vanish
                    acks = store.get_many([f"ack/{r}" for r in peers])
                    missing = [r for r, a in zip(peers, acks) if a != acked.encode()]
            if time.monotonic() > deadline:
                if acked is None:
                    raise DistributedError(f"rendezvous at {where} timed out after {timeout_s:.0f}s: "
                                           "rank 0 never published the NCCL id; is rank 0 running?")
                acks = store.get_many([f"ack/{r}" for r in peers])
                missing = [r for r, a in zip(peers, acks) if a != acked.encode()]
                raise DistributedError(
                    f"rendezvous at {where} timed out after {timeout_s:.0f}s: "
                    + (f"{_ranks(missing)} of {world_size} never arrived" if missing
                       else "rank 0 never released the others"))
            time.sleep(0.05)
    except StoreError as e:
        waiting = f" while {_ranks(missing)} had not arrived" if rank and missing else ""
        raise DistributedError(f"rendezvous failed on rank {rank}{waiting}: {e}") from e
