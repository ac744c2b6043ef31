"""Helper module for tests/test_launch.py (not a test): what a child of llmc.launch sees.

    python -m launch_probe OUT_DIR [--fail-rank R --code C] [--sleep S]

Writes OUT_DIR/rank<RANK>.json with its argv and the launcher's variables; rank R (if given)
then exits with code C after 0.3 s; every other rank sleeps S seconds (default 0) and exits 0.
On SIGTERM it writes OUT_DIR/rank<RANK>.terminated and exits 143.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "LLMC_RENDEZVOUS", "NCCL_NVLS_ENABLE")


def main(argv):
    out = Path(argv[0])
    opts = dict(zip(argv[1::2], argv[2::2]))
    rank = int(os.environ["RANK"])

    def on_term(signum, frame):
        (out / f"rank{rank}.terminated").write_text(str(signum))
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"argv": argv, "pid": os.getpid(), "env": {k: os.environ.get(k) for k in KEYS}}))
    if "--fail-rank" in opts and int(opts["--fail-rank"]) == rank:
        time.sleep(0.3)
        return int(opts.get("--code", 1))
    time.sleep(float(opts.get("--sleep", 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
