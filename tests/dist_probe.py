"""Helper process for tests/test_distributed.py (not a test): one rank of a fake run on the CPU.

    python tests/dist_probe.py OUT_DIR TIMEOUT_S ACTION

Reads its rank from the environment (llmc.dist.rendezvous.read_env), meets the others through
llmc.dist.rendezvous.open_store/exchange_id with a fake 128-byte "NCCL id" made by rank 0, writes
OUT_DIR/rank<R>.json with what it received, then:
  ACTION=id     wait until every rank has written its file, exit 0;
  ACTION=watch  start llmc.dist.distributed.Watchdog and sleep (up to 60 s) until it ends the process;
  ACTION=die    start the watchdog, then exit abruptly (os._exit(9)) after 0.5 s.
"""
import json
import os
import sys
import time
from pathlib import Path

from llmc.dist.distributed import Watchdog
from llmc.dist.rendezvous import exchange_id, open_store, read_env


def main():
    out, timeout, action = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    env = read_env()
    store, server, where = open_store(env, timeout)
    fake = bytes((7 * i + 3) % 256 for i in range(128))
    uid = exchange_id(store, env.rank, env.world_size, lambda: fake, timeout, where)
    (out / f"rank{env.rank}.json").write_text(json.dumps(
        {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
         "source": env.source, "id": uid.hex(), "pid": os.getpid()}))
    if action == "id":
        store.set(f"done/{env.rank}", b"1")
        deadline = time.monotonic() + timeout
        while env.rank == 0 and time.monotonic() < deadline:  # serve until everyone is done
            if all(v is not None for v in store.get_many([f"done/{r}" for r in range(env.world_size)])):
                break
            time.sleep(0.02)
        return 0
    Watchdog(store, env.rank, env.world_size, timeout, where=where).start()
    if action == "die":
        time.sleep(0.5)
        os._exit(9)
    time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
