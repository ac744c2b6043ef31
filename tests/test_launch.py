"""llmc.launch on the CPU: the children's environment, failure propagation, signals, bad flags.

The children run tests/launch_probe.py (`--module launch_probe`), which records what it sees.

    pytest tests/test_launch.py
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(args, env_extra=None, wait=True, timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in ("NCCL_NVLS_ENABLE", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               CUDA_VISIBLE_DEVICES="0,1,2,3")  # the launcher counts GPUs from this
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "llmc.launch", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def records(out):
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def test_children_get_ranks_and_env(tmp_path):
    r = launch(["--nproc-per-node", "3", "--master-port", "29123", "--module", "launch_probe",
                "--", str(tmp_path), "--sleep", "0.1"])
    assert r.returncode == 0, r.stderr
    got = records(tmp_path)
    assert sorted(got) == [0, 1, 2]
    pids = set()
    for rank, rec in got.items():
        e = rec["env"]
        assert e["RANK"] == str(rank) and e["LOCAL_RANK"] == str(rank)
        assert e["WORLD_SIZE"] == "3" and e["LOCAL_WORLD_SIZE"] == "3" and e["GROUP_RANK"] == "0"
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == "29123"
        assert e["NCCL_NVLS_ENABLE"] == "0" and e["LLMC_RENDEZVOUS"] is None
        assert rec["argv"] == [str(tmp_path), "--sleep", "0.1"]
        pids.add(rec["pid"])
    assert len(pids) == 3


def test_second_node_ranks_and_user_nccl_setting(tmp_path):
    r = launch(["--nproc-per-node", "2", "--nnodes", "3", "--node-rank", "1", "--master-addr",
                "node0", "--module", "launch_probe", "--", str(tmp_path)],
               env_extra={"NCCL_NVLS_ENABLE": "1"})
    assert r.returncode == 0, r.stderr
    got = records(tmp_path)
    assert sorted(got) == [2, 3]
    for rank, rec in got.items():
        e = rec["env"]
        assert e["LOCAL_RANK"] == str(rank - 2) and e["WORLD_SIZE"] == "6" and e["GROUP_RANK"] == "1"
        assert e["MASTER_ADDR"] == "node0" and e["NCCL_NVLS_ENABLE"] == "1"


def test_file_rendezvous_is_passed_on(tmp_path):
    r = launch(["--nproc-per-node", "2", "--nnodes", "2", "--rendezvous", "file:///shared/rdzv",
                "--module", "launch_probe", "--", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    for rec in records(tmp_path).values():
        assert rec["env"]["LLMC_RENDEZVOUS"] == "file:///shared/rdzv"


def test_failing_child_stops_the_others(tmp_path):
    t0 = time.monotonic()
    r = launch(["--nproc-per-node", "4", "--grace-s", "5", "--module", "launch_probe", "--",
                str(tmp_path), "--fail-rank", "2", "--code", "7", "--sleep", "60"])
    assert time.monotonic() - t0 < 30
    assert r.returncode == 7, r.stderr
    assert "rank 2" in r.stderr and "exited with code 7" in r.stderr
    assert "stopping the other 3" in r.stderr
    for rank in (0, 1, 3):
        assert (tmp_path / f"rank{rank}.terminated").read_text() == str(int(signal.SIGTERM))
    assert not (tmp_path / "rank2.terminated").exists()


def test_stubborn_child_is_killed_after_grace(tmp_path):
    # a child that ignores SIGTERM: launch_probe with SIGTERM ignored via a wrapper module
    mod = tmp_path / "stubborn_probe.py"
    # rank 0 exits only once rank 1 ignores SIGTERM (its marker file), so the SIGKILL is
    # needed whatever the load, not only when rank 1 happened to start first
    ready = tmp_path / "rank1.ignoring"
    mod.write_text("import os, pathlib, signal, sys, time\n"
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   f"ready = pathlib.Path({str(ready)!r})\n"
                   "if os.environ['RANK'] == '0':\n"
                   "    while not ready.exists(): time.sleep(0.01)\n"
                   "    sys.exit(5)\n"
                   "ready.write_text('1')\n"
                   "time.sleep(60)\n")
    t0 = time.monotonic()
    r = launch(["--nproc-per-node", "2", "--grace-s", "1", "--module", "stubborn_probe"],
               env_extra={"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])})
    assert r.returncode == 5, r.stderr
    assert time.monotonic() - t0 < 60
    assert "sending SIGKILL" in r.stderr and "rank(s) 1" in r.stderr


def test_sigterm_is_forwarded(tmp_path):
    p = launch(["--nproc-per-node", "2", "--module", "launch_probe", "--", str(tmp_path),
                "--sleep", "60"], wait=False)
    try:
        deadline = time.monotonic() + 30
        while len(records(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.terminated").exists()


@pytest.mark.parametrize("args, message", [
    (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1"),
    (["--nproc-per-node", "x"], "must be a number or 'gpu'"),
    (["--nproc-per-node", "8"], "more than the 4 GPU(s)"),
    (["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"],
     "--node-rank 2 must be in [0, --nnodes 2)"),
    (["--nproc-per-node", "2", "--nnodes", "0"], "--nnodes must be >= 1"),
    (["--nproc-per-node", "2", "--nnodes", "2"], "needs --master-addr"),
    (["--nproc-per-node", "2", "--master-port", "70000"], "--master-port must be in 1..65535"),
    (["--nproc-per-node", "2", "--rendezvous", "nfs://x"], "--rendezvous must be file:///path"),
    (["--nproc-per-node", "2", "--rendezvous", "file://rel/dir"], "give an absolute path"),
    (["--nproc-per-node", "2", "--model", "d12"], "unrecognized arguments: --model d12 (training flags go after --)"),
    (["--nproc-per-node", "2", "--stop-grace-s", "-1"], "--stop-grace-s must be >= 0"),
    (["--nproc-per-node", "2", "--grace-s", "nan"], "--grace-s must be >= 0"),
])
def test_bad_flags(args, message):
    r = launch(args)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr
    assert "usage: python -m llmc.launch" in r.stderr


def test_gpu_count_from_visible_devices(tmp_path):
    r = launch(["--module", "launch_probe", "--", str(tmp_path)], env_extra={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert r.returncode == 0, r.stderr
    assert sorted(records(tmp_path)) == [0, 1]
    r = launch(["--module", "launch_probe"], env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "no GPU visible" in r.stderr
