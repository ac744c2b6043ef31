"""The wheel ships what a user without the checkout needs: every kernels/*.cu and *.cuh (as
llmc/cu/), the GPT-2 vocabulary and tiny-shakespeare (llmc/assets/), and data_tools.

Run: pytest tests/test_packaging.py      (builds a wheel with the installed setuptools, ~10 s)
"""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 69:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject's build requirement (69)")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel, = tmp_path.glob("llmc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted((ROOT / "kernels").glob("*.cu*")):
        assert f"llmc/cu/{src.name}" in names, f"{src.name} is not in the wheel"
    for asset in ("r50k_base.tiktoken", "tinyshakespeare.txt.gz"):
        assert f"llmc/assets/{asset}" in names
    assert "data_tools/fineweb.py" in names and "llmc/train.py" in names
    assert "llmc/formats/hf.py" in names and "llmc/export.py" in names
