"""`python -m llmc.launch`: start one training process per GPU on this node.

    python -m llmc.launch --nproc-per-node 8 -- --model d12 --batch-size 64 ...
    # two nodes (run on each, node-rank 0 and 1):
    python -m llmc.launch --nproc-per-node 8 --nnodes 2 --node-rank 0 \\
        --master-addr node0 --master-port 29500 -- --model d12 ...
    # or meet through a shared filesystem instead of TCP:
    python -m llmc.launch --nproc-per-node 8 --nnodes 2 --node-rank 1 \\
        --rendezvous file:///shared/rdzv/run42 -- ...

Everything after `--` goes to `python -m llmc.train` (or `--module X`). Each child gets RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK (the node rank), MASTER_ADDR, MASTER_PORT,
LLMC_RENDEZVOUS (with --rendezvous) and NCCL_NVLS_ENABLE=0 unless the caller set it (NVLink
SHARP multicast is not available on every machine and NCCL may fail to set it up).

Supervision: SIGINT/SIGTERM are forwarded to every child (each runs in its own process group,
and gets SIGTERM should the launcher itself die); llmc.train then finishes the step, saves a
checkpoint and exits 75 on every rank, and the launcher waits up to --stop-grace-s for that
before SIGKILL, then exits 75 too when every rank saved (128 + signal otherwise). A child that
exits 75 is stopping cleanly, not failing. When a child exits with another non-zero code, the
launcher prints which rank failed, sends SIGTERM to the others, SIGKILL after --grace-s, and
exits with the failed child's code (128 + signal for a child killed by a signal). Exit 0 when
all succeed. Bad flags: a usage line and exit 2.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

from llmc.training.signals import PREEMPTED_EXIT


def _parse(argv):
    if "--" in argv:
        i = argv.index("--")
        ours, child = argv[:i], argv[i + 1:]
    else:
        ours, child = argv, []
    p = argparse.ArgumentParser(
        prog="python -m llmc.launch",
        description="Start one llmc training process per GPU; flags after -- go to the trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc-per-node", default="gpu",
                   help="processes on this node: a number, or 'gpu' for one per visible GPU")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the run")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    p.add_argument("--master-addr", default=None,
                   help="host of rank 0 (node-rank 0) [default: 127.0.0.1 on one node]")
    p.add_argument("--master-port", type=int, default=29500, help="TCP port of rank 0's store")
    p.add_argument("--rendezvous", default=None,
                   help="file:///shared/dir (a filesystem every node sees) or tcp://host:port "
                        "instead of --master-addr/--master-port")
    p.add_argument("--module", default="llmc.train", help="the Python module each process runs")
    p.add_argument("--grace-s", type=float, default=10.0,
                   help="seconds the other processes get to exit after a failure before SIGKILL")
    p.add_argument("--stop-grace-s", type=float, default=300.0,
                   help="seconds the processes get to checkpoint after a forwarded SIGINT/SIGTERM "
                        "before SIGKILL (a preemption notice is often 30 s to 2 min; set it below)")
    args, unknown = p.parse_known_args(ours)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (training flags go after --)")

    visible = visible_gpus()
    if args.nproc_per_node == "gpu":
        if visible is None:
            p.error("--nproc-per-node gpu: cannot count this node's GPUs (no nvidia-smi, no "
                    "CUDA_VISIBLE_DEVICES); give a number")
        if visible == 0:
            p.error("--nproc-per-node gpu: no GPU visible on this node")
        args.nproc_per_node = visible
    else:
        try:
            args.nproc_per_node = int(args.nproc_per_node)
        except ValueError:
            p.error(f"--nproc-per-node must be a number or 'gpu', got {args.nproc_per_node!r}")
    if args.nproc_per_node <= 0:
        p.error(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if visible is not None and args.nproc_per_node > visible:
        p.error(f"--nproc-per-node {args.nproc_per_node} is more than the {visible} GPU(s) "
                "visible on this node; one process per GPU")
    if args.nnodes < 1:
        p.error(f"--nnodes must be >= 1, got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank {args.node_rank} must be in [0, --nnodes {args.nnodes})")
    if not 0 < args.master_port < 65536:
        p.error(f"--master-port must be in 1..65535, got {args.master_port}")
    if args.rendezvous is not None:
        if not args.rendezvous.startswith(("file://", "tcp://")):
            p.error(f"--rendezvous must be file:///path or tcp://host:port, got {args.rendezvous!r}")
        if args.rendezvous.startswith("file://") and not args.rendezvous[len("file://"):].startswith("/"):
            p.error(f"--rendezvous {args.rendezvous}: give an absolute path, file:///shared/dir")
    elif args.master_addr is None:
        if args.nnodes > 1:
            p.error("--nnodes > 1 needs --master-addr (node-rank 0's host) or --rendezvous file:///shared/dir")
        args.master_addr = "127.0.0.1"
    for flag in ("grace_s", "stop_grace_s"):
        if not getattr(args, flag) >= 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    return args, child


def visible_gpus() -> int | None:
    """GPUs this node offers: CUDA_VISIBLE_DEVICES when set, else nvidia-smi; None if unknown."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def child_env(args, local_rank: int, base=None) -> dict:
    env = dict(os.environ if base is None else base)
    n = args.nproc_per_node
    env.update(RANK=str(args.node_rank * n + local_rank), LOCAL_RANK=str(local_rank),
               WORLD_SIZE=str(args.nnodes * n), LOCAL_WORLD_SIZE=str(n),
               GROUP_RANK=str(args.node_rank), MASTER_PORT=str(args.master_port))
    if args.master_addr is not None:
        env["MASTER_ADDR"] = args.master_addr
    if args.rendezvous is not None:
        env["LLMC_RENDEZVOUS"] = args.rendezvous
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    return env


def _die_with_parent():
    """In the child before exec: SIGTERM when the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _signal_all(procs, sig):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def run(args, child_args) -> int:
    n = args.nproc_per_node
    procs, ranks = [], []
    cmd = [sys.executable, "-m", args.module, *child_args]
    for local in range(n):
        env = child_env(args, local)
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        ranks.append(int(env["RANK"]))

    received = []

    def forward(signum, _frame):
        received.append(signum)
        _signal_all(procs, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = None  # (rank, code)
    kill_at = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if failed is None:
                for rank, rc in zip(ranks, codes):
                    if rc is not None and rc not in (0, PREEMPTED_EXIT):
                        failed = (rank, _code(rc))
                        others = sum(c is None for c in codes)
                        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
                        print(f"llmc.launch: rank {rank} (pid {procs[ranks.index(rank)].pid}) {how}"
                              + (f"; stopping the other {others} process(es)" if others else ""),
                              file=sys.stderr, flush=True)
                        _signal_all(procs, signal.SIGTERM)
                        kill_at = time.monotonic() + args.grace_s
                        break
            if received and kill_at is None:
                kill_at = time.monotonic() + args.stop_grace_s
            if all(c is not None for c in codes):
                break
            if kill_at is not None and time.monotonic() > kill_at:
                alive = [r for r, p in zip(ranks, procs) if p.poll() is None]
                grace = args.grace_s if failed is not None else args.stop_grace_s
                print(f"llmc.launch: rank(s) {', '.join(map(str, alive))} still running after "
                      f"{grace:.0f}s; sending SIGKILL", file=sys.stderr, flush=True)
                _signal_all(procs, signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if failed is not None:
        return failed[1]
    codes = [p.returncode for p in procs]
    if any(c == PREEMPTED_EXIT for c in codes) and all(c in (0, PREEMPTED_EXIT) for c in codes):
        print("llmc.launch: every rank stopped cleanly after a checkpoint (exit 75: requeue and "
              "resume with --resume auto)", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    if received:
        return 128 + received[0]
    return 0


def main(argv=None) -> int:
    args, child_args = _parse(sys.argv[1:] if argv is None else list(argv))
    return run(args, child_args)


if __name__ == "__main__":
    sys.exit(main())
