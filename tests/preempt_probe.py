"""Helper module for tests/test_preemption.py (not a test): llmc.train under llmc.launch on the CPU.

    python -m llmc.launch --nproc-per-node 2 --module preempt_probe -- BASE_DIR <train flags>

Each child trains on the CPU into BASE_DIR/rank<RANK> (the CPU path is one process per run, so
each rank is its own run), which lets a test send the launcher SIGTERM and check that every
rank checkpoints and exits 75, and that the launcher exits 75 too.
"""
import os
import sys

from llmc.train import main

if __name__ == "__main__":
    base, flags = sys.argv[1], sys.argv[2:]
    sys.exit(main(flags + ["--out-dir", os.path.join(base, f"rank{os.environ['RANK']}")]))
