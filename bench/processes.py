"""Commands under supervision, for bench/eight_gpus.py: a timeout, a log, a signal at step N.

    runner = Runner(work_dir, log_path, dry_run=False)
    res = runner.run(cmd, timeout_s, env={"X": "1"}, stop=(metrics_path, 80), note="...")
    # res: rc (None when dry or timed out), wall_s, timed_out, signalled_after, err, out_tail

A command's timeout is cut to what is left before `runner.deadline` (a whole call's budget).
Each command runs in its own session with stdout and stderr in <work>/logs/NN.out|err; the
runner prints (and appends to log_path) the command, its exit and the end of its output.
stop=(metrics.jsonl, k): SIGTERM once k step lines are logged (llmc.launch forwards it, the
ranks checkpoint and exit 75). On a timeout the process gets SIGTERM, then after a grace
SIGKILL together with every process below it, found through /proc before the first signal
(llmc.launch starts its ranks in sessions of their own, so a process group would miss them).
Dry: the command is printed, nothing runs.

kill_one_rank starts the ranks of a run itself (llmc.launch reports only the first failure;
here every rank's exit code and time is wanted), SIGKILLs one once the run is ready (e.g. has
a checkpoint) and times how long each other rank takes to exit.

split_passthrough(argv) -> (own, extra): the script's own arguments and those after a "--",
which bench/eight_gpus.py and bench/scaling.py hand on to `python -m llmc.train`.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def split_passthrough(argv) -> tuple:
    """(arguments before a "--", arguments after it): ([...], []) when there is none."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def _descendants(pid: int) -> list:
    """PIDs of every process below `pid` (from /proc; empty where there is no /proc)."""
    children = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Runner:
    """Runs (or, dry, prints) commands under a timeout; logs each one and the end of its output."""

    def __init__(self, work, log_path: Path | None, dry_run: bool = False):
        self.dry = dry_run
        self.logs = Path(work) / "logs"
        self.log_path = log_path
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), self.env.get("PYTHONPATH", "")])
        self.env.setdefault("NCCL_NVLS_ENABLE", "0")
        self.count = 0
        self.deadline = float("inf")  # time.monotonic() past which no command may run

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(msg + "\n")

    def show(self, cmd, env=None) -> str:
        pre = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        return (pre + " " if pre else "") + shlex.join(str(c) for c in cmd)

    def run(self, cmd, timeout: float, env=None, stop=None, note: str = "") -> dict:
        """-> rc (None when dry or timed out), wall_s, timed_out, err (end of stderr), out_tail,
        signalled_after. stop=(metrics_path, steps): SIGTERM once that many steps are logged."""
        self.say(f"$ {self.show(cmd, env)}" + (f"    # {note}" if note else ""))
        if self.dry:
            return {"rc": None, "dry": True, "wall_s": 0.0, "timed_out": False, "err": ""}
        timeout = min(timeout, max(1.0, self.deadline - time.monotonic()))
        self.count += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        out_p, err_p = self.logs / f"{self.count:02d}.out", self.logs / f"{self.count:02d}.err"
        t0 = time.monotonic()
        with open(out_p, "w") as fo, open(err_p, "w") as fe:
            p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=dict(self.env, **(env or {})),
                                 stdout=fo, stderr=fe, start_new_session=True)
            signalled, timed_out = None, False
            while p.poll() is None:
                if stop is not None and signalled is None and _steps_logged(stop[0]) >= stop[1]:
                    signalled = _steps_logged(stop[0])
                    p.send_signal(signal.SIGTERM)
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                    _stop_tree(p)
                    break
                time.sleep(0.05)
        res = {"rc": None if timed_out else p.returncode, "wall_s": time.monotonic() - t0,
               "timed_out": timed_out, "signalled_after": signalled,
               "err": tail(err_p, 3000), "out_tail": tail(out_p, 1500)}
        self.say(f"  -> exit {res['rc']}{' (TIMED OUT after %.0f s)' % timeout if timed_out else ''}"
                 f" in {res['wall_s']:.1f} s; logs {out_p}, {err_p}")
        end = (res["out_tail"][-600:] + "\n" + res["err"][-900:]).strip()
        if end:
            self.say("  | " + end.replace("\n", "\n  | "))
        return res


def tail(path: Path, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _steps_logged(metrics: Path) -> int:
    try:
        return sum('"loss"' in line for line in Path(metrics).read_text().splitlines())
    except OSError:
        return 0


def _stop_tree(p: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process (the launcher forwards it), then SIGKILL it and everything below it."""
    below = _descendants(p.pid)
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid in [p.pid] + below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    p.wait()


def kill_one_rank(cmd, envs, logs: Path, ready, victim: int, delay_s: float, wait_s: float,
                  start_timeout_s: float = 300.0) -> dict:
    """Start one `cmd` per env (a rank each), wait until ready() is truthy, sleep delay_s,
    SIGKILL rank `victim`, wait up to wait_s for every rank to exit, SIGKILL what is left.

    -> ready (ready()'s value), rc per rank (None: still running at the end), exit_s per rank
    (seconds after the SIGKILL), error (why nothing was killed, else None). Output of rank r in
    logs/rank<r>.out|err.
    """
    logs.mkdir(parents=True, exist_ok=True)
    procs, files, n = [], [], len(envs)
    exit_s = [None] * n
    t0 = time.monotonic()
    try:
        for r, env in enumerate(envs):
            fo, fe = open(logs / f"rank{r}.out", "w"), open(logs / f"rank{r}.err", "w")
            files += [fo, fe]
            procs.append(subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=fo,
                                          stderr=fe, start_new_session=True))
        while not (value := ready()):
            if any(p.poll() is not None for p in procs) or time.monotonic() - t0 > start_timeout_s:
                codes = [p.poll() for p in procs]
                return {"ready": None, "rc": codes, "exit_s": exit_s,
                        "error": f"not ready after {time.monotonic() - t0:.0f} s (exit codes so "
                                 f"far {codes}); nothing was killed"}
            time.sleep(0.05)
        time.sleep(delay_s)
        t_kill = time.monotonic()
        procs[victim].send_signal(signal.SIGKILL)
        while time.monotonic() - t_kill < wait_s and any(t is None for t in exit_s):
            for r, p in enumerate(procs):
                if exit_s[r] is None and p.poll() is not None:
                    exit_s[r] = time.monotonic() - t_kill
            time.sleep(0.05)
        return {"ready": value, "rc": [p.returncode if exit_s[r] is not None else None
                                       for r, p in enumerate(procs)],
                "exit_s": exit_s, "error": None}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
