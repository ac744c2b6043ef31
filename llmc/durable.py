"""Making renames and writes survive a crash: fsync of files and of the directories that hold
them. Shards and checkpoints are written to a temporary name, fsynced, renamed into place, and
then the directory is fsynced so the rename itself is on disk."""
from __future__ import annotations

import os
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
