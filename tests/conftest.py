"""tests/ only: cuBLASLt algorithm tuning (llmc/cuda/cublaslt.py) is off in test processes.

Concurrent workers timing the same product could pick different algorithms, and the tests that
compare two processes bit for bit (resume, preemption, launch) would see it. The tuning itself
is tested in tests/test_matmul.py, which turns it on for its own calls; benchmarks and
`python -m llmc.train` keep the default (on).
"""
import os

os.environ.setdefault("LLMC_MATMUL_TUNE", "0")
