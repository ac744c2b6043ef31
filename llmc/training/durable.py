"""Making renames and writes survive a crash: fsync of files and of the directories that hold
them. Shards, checkpoints and model exports are written to a temporary name, fsynced, renamed
into place, and then the directory is fsynced so the rename itself is on disk
(`replaced_atomically` does all of it for one file or directory)."""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; filesystems that refuse to open directories are fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replaced_atomically(target, directory: bool = False):
    """Yield a temporary path beside `target` to write; on success it becomes `target`.

    The new file (or directory, when `directory`) is fsynced, then renamed into place, so
    `target` is either the old version or the complete new one. A directory that already exists
    is moved aside only once the new one is complete, and deleted after the swap. On any error
    the temporary path is removed and the old `target` is left as it was.
    """
    target = Path(target)
    tag = f"{os.getpid()}-{threading.get_ident()}"
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            for f in tmp.iterdir():
                fsync_file(f)
            fsync_dir(tmp)
            if target.exists():
                old = target.with_name(f".{target.name}.old-{tag}")
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old)
            else:
                os.rename(tmp, target)
        else:
            fsync_file(tmp)
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
