"""Benchmark one op against its NumPy reference: GELU forward at the GPT-2 MLP's shape.

Checks llmc's kernel against llmc.model.reference first, then times both: the kernel with CUDA
events (after a warm-up, so NVRTC compilation is not timed), the reference on the CPU.
The GPU figure is the kernel alone, inputs not flushed from L2; bench/ measures properly.
Needs a CUDA GPU.
Run:  python examples/bench_op.py [--rows 8192] [--dtype bf16|fp32]
"""
import argparse
import time

import cupy as cp
import ml_dtypes
import numpy as np

from llmc import ops

from llmc.model import reference

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rows", type=int, default=8192, help="rows of 3072 (B*T of GPT-2 124M)")
parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
args = parser.parse_args()
dtype = ml_dtypes.bfloat16 if args.dtype == "bf16" else np.float32

x_host = np.random.default_rng(0).standard_normal((args.rows, 3072)).astype(dtype)
x = ops.to_device(x_host)
y = ops.gelu(x)
want = reference.gelu_forward(x_host.astype(np.float32))
got = ops.to_host(y).astype(np.float32)
rtol, atol = (1e-2, 1e-3) if args.dtype == "bf16" else (1e-4, 1e-4)  # bf16 keeps 8 bits
assert np.allclose(got, want, rtol=rtol, atol=atol), "llmc's GELU disagrees with the reference"
err = np.abs(got - want).max()

for _ in range(3):                                   # warm-up: compile, first touch
    ops.gelu_forward(y, x)
start, end = cp.cuda.Event(), cp.cuda.Event()
start.record()
for _ in range(20):
    ops.gelu_forward(y, x)
end.record()
end.synchronize()
gpu_ms = cp.cuda.get_elapsed_time(start, end) / 20

x32 = x_host.astype(np.float32)
t0 = time.perf_counter()
reference.gelu_forward(x32)
cpu_ms = (time.perf_counter() - t0) * 1e3

moved = 2 * x.nbytes                                  # read x, write y
print(f"gelu {args.dtype} ({args.rows}, 3072): llmc {gpu_ms:.4f} ms ({moved / gpu_ms / 1e6:.0f} GB/s), "
      f"NumPy reference {cpu_ms:.1f} ms, {cpu_ms / gpu_ms:.0f}x; max error {err:.2e}")
