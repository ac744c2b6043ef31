"""The examples/ scripts run, and the README shows the training-loop example verbatim.

On the GPU each script runs in a fresh interpreter from the repository root, as a user would
run it: the training loop's loss must fall from ~ln(64) to under 0.5, the CuPy program's
checks must pass, the benchmark must print its line. The README check runs everywhere.
Run:  pytest tests/test_examples.py        (GPU part: pytest -m gpu tests/test_examples.py)
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_readme_shows_the_training_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = (ROOT / "examples" / "train_gpt.py").read_text()
    assert example in blocks, ("README.md's \"Use the kernels\" must show examples/train_gpt.py "
                               "verbatim in a ```python block")


@pytest.mark.gpu
def test_train_gpt_loss_falls():
    out = run_example("train_gpt.py")
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 5, out
    assert losses[0] > 3.5, out                  # ~ln(64) = 4.16 at random init
    assert losses[-1] < 0.5, out


@pytest.mark.gpu
def test_op_in_cupy():
    assert run_example("op_in_cupy.py").strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bench_op(dtype):
    out = run_example("bench_op.py", "--rows", "1024", "--dtype", dtype)
    assert re.search(r"llmc [\d.]+ ms \(\d+ GB/s\), NumPy reference [\d.]+ ms", out), out
