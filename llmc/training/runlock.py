"""One run per output directory: a lock file on `--out-dir`, and the check for a used directory.

`RunLock(out_dir).acquire()` takes an exclusive `fcntl.flock` on `<out_dir>/llmc.lock` and
writes the holder's PID, host and start time into it. The kernel drops the lock when the process
dies, even by kill -9, so a stale file never blocks the next run; a second live run gets a
`RunLockError` naming the first one's PID and host. The file is left in place on release
(deleting it would let a third process lock a file that is no longer the one on disk).
flock works on local filesystems and on NFSv4; on a filesystem without locking the run says so.

`check_fresh(out_dir)` refuses a fresh run (no --resume) in a directory that holds another
run's files, unless --overwrite is given: its checkpoints would be pruned in favour of the old
run's newer ones and its metrics.jsonl and config.json would replace the old run's.

Run the tests:  python -m pytest tests/test_long_runs.py -q
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_NAME = "llmc.lock"
RUN_FILES = ("config.json", "metrics.jsonl")


class RunLockError(OSError):
    """--out-dir is in use by another run, or cannot be locked; the message says which."""


class RunLock:
    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunLockError(f"{self.path.parent}: in use by another run ({holder}); wait for "
                               "it to finish or stop it, or choose another --out-dir") from None
        except OSError as e:
            os.close(fd)
            raise RunLockError(f"{self.path}: cannot lock ({e.strerror}); this filesystem has no "
                               "file locking, choose an --out-dir on one that has") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"PID {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "its PID is not recorded yet"


def previous_run(out_dir) -> list:
    """Names of another run's work in out_dir: ckpt_* directories, a non-empty metrics.jsonl.
    A config.json alone (a run that failed before its first step) is not worth keeping."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith("ckpt_") or (
        p.name == "metrics.jsonl" and p.is_file() and p.stat().st_size > 0))


def check_fresh(out_dir, overwrite: bool) -> list:
    """Before a fresh run: refuse a used out_dir, or with overwrite delete the old run's files.

    Returns the names deleted. Raises RunLockError (an OSError) naming the files and the fixes.
    """
    found = previous_run(out_dir)
    if not found:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunLockError(f"{out_dir}: holds another run ({shown}); pass --resume auto to "
                           "continue it, --overwrite to delete it and start over, or choose "
                           "another --out-dir")
    for name in found + [n for n in RUN_FILES if n not in found and (Path(out_dir) / n).exists()]:
        p = Path(out_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found
