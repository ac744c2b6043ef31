"""bench/: at the end of `pytest bench/ --benchmark-only`, one table of every kernel timed.

Columns: the benchmark, its median ms (CUDA events, L2 flushed before each call), GB/s or
TFLOP/s, the percentage of this card's measured ceiling (bench/timing.py: copy/read/write
bandwidth, 8192^3 GEMM in the benchmark's dtype), and the PyTorch peer's time for the same work
where one is measured. The ceilings themselves head the table.
"""
from bench import timing


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = timing.table()
    if not lines:
        return
    terminalreporter.section("llmc kernels against this card's measured ceilings")
    for line in lines:
        terminalreporter.write_line(line)
