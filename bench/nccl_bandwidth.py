"""NCCL bandwidth of the collectives llmc's data parallelism uses, at GPT-2 124M's size.

    python -m llmc.launch --nproc-per-node 2 --module bench.nccl_bandwidth

Times (bench.timing.cuda_time: CUDA events, median of 20 after 3 warm-ups) an all-reduce of the whole gradient buffer
(124,475,904 values, bf16 and fp32) and the ZeRO-1 pair reduce-scatter + all-gather in bf16,
and prints the bus bandwidth as NCCL's own tests define it: all-reduce moves 2(W-1)/W of the
buffer per GPU, reduce-scatter and all-gather (W-1)/W each. Rank 0 prints; the numbers feed
the README's projection for 8 and 64 GPUs.
"""
import cupy
import ml_dtypes
import numpy as np

from bench.timing import cuda_time
from llmc.dist.distributed import init_distributed

N = 124_475_904


def main():
    dist = init_distributed()
    W = dist.world_size
    n = (N + W - 1) // W * W
    rows = []
    for name in ("fp32", "bf16"):
        dt = np.dtype(ml_dtypes.bfloat16) if name == "bf16" else np.dtype(np.float32)
        buf = cupy.zeros(n, dtype=dt)
        ms = cuda_time(lambda: dist.all_reduce(buf))
        busbw = 2 * (W - 1) / W * n * dt.itemsize / (ms / 1e3) / 1e9
        rows.append((f"all_reduce {name}", ms, busbw))
        if name == "bf16":
            shard = cupy.zeros(n // W, dtype=dt)
            ms = cuda_time(lambda: (dist.reduce_scatter(buf, shard), dist.all_gather(shard, buf)))
            busbw = 2 * (W - 1) / W * n * dt.itemsize / (ms / 1e3) / 1e9
            rows.append((f"reduce_scatter+all_gather {name}", ms, busbw))
    if dist.is_main:
        print(f"NCCL over {W} GPUs, {N:,} values")
        for label, ms, bw in rows:
            print(f"  {label:34s} {ms:7.3f} ms   bus bandwidth {bw:6.1f} GB/s")
    dist.close()


if __name__ == "__main__":
    main()
