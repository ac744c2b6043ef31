"""The GPU diagnosis (llmc/cuda/device.py) names the real cause: no CuPy, no driver, a driver older
than the CuPy wheel's CUDA, no device. Each case is simulated with a fake `cupy` module, so this
runs on any machine; the same text is the GPU tests' skip reason and `--device cuda`'s error.

Run:  pytest tests/test_device.py
"""
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from llmc.config import ConfigError
from llmc.cuda.device import cuda_available, cuda_problem


class FakeCudaError(RuntimeError):
    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


def fake_cupy(monkeypatch, driver, runtime=12090, count=None, error=None):
    """Install a fake `cupy` whose runtime reports `driver`/`runtime` versions and either a
    device count or raises `error` (a FakeCudaError) from getDeviceCount."""
    def get_count():
        if error is not None:
            raise error
        return count

    rt = types.SimpleNamespace(driverGetVersion=lambda: driver, runtimeGetVersion=lambda: runtime,
                               getDeviceCount=get_count)
    mod = types.ModuleType("cupy")
    mod.cuda = types.SimpleNamespace(runtime=rt)
    monkeypatch.setitem(sys.modules, "cupy", mod)


NO_DRIVER = FakeCudaError(35, "cudaErrorInsufficientDriver: CUDA driver version is insufficient "
                              "for CUDA runtime version")


def test_cupy_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ModuleNotFoundError
    msg = cuda_problem()
    assert msg.startswith("CuPy is not installed"), msg
    assert '".[cuda13]"' in msg and '".[cuda12]"' in msg
    assert not cuda_available()


def test_no_driver_is_not_called_an_old_driver(monkeypatch):
    fake_cupy(monkeypatch, driver=0, error=NO_DRIVER)
    msg = cuda_problem()
    assert msg.startswith("no NVIDIA driver on this machine"), msg
    assert "insufficient" not in msg


def test_driver_older_than_the_wheel(monkeypatch):
    fake_cupy(monkeypatch, driver=12040, runtime=13000, error=NO_DRIVER)
    msg = cuda_problem()
    assert "supports CUDA 12.4" in msg and "needs CUDA 13.0" in msg, msg
    assert 'pip install -e ".[cuda12]"' in msg and "pip uninstall" in msg


def test_minor_versions_of_one_major_are_compatible(monkeypatch):
    fake_cupy(monkeypatch, driver=12020, runtime=12090, count=1)
    assert cuda_problem() is None
    assert cuda_available()


def test_no_device(monkeypatch):
    fake_cupy(monkeypatch, driver=13000, runtime=13000,
              error=FakeCudaError(100, "cudaErrorNoDevice: no CUDA-capable device is detected"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    msg = cuda_problem()
    assert "sees no GPU" in msg and "CUDA_VISIBLE_DEVICES=''" in msg, msg
    fake_cupy(monkeypatch, driver=13000, runtime=13000, count=0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "sees no GPU (nvidia-smi" in cuda_problem()


def test_skip_reason_of_gpu_tests(monkeypatch):
    """The root conftest's skip reason is the diagnosis, prefixed by what the test needs."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("llmc_root_conftest", path)
    root = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root)
    fake_cupy(monkeypatch, driver=0, error=NO_DRIVER)
    root.gpu_skip_reason.cache_clear()
    assert root.gpu_skip_reason().startswith("no NVIDIA driver on this machine")

    item = types.SimpleNamespace(keywords={"gpu": True}, markers=[])
    item.add_marker = item.markers.append
    root.pytest_collection_modifyitems(None, [item])
    (mark,) = item.markers
    assert mark.kwargs["reason"].startswith("needs a CUDA GPU: no NVIDIA driver on this machine")
    root.gpu_skip_reason.cache_clear()


@pytest.mark.parametrize("case,expect", [
    ("missing", "--device cuda: CuPy is not installed"),
    ("no_driver", "--device cuda: no NVIDIA driver on this machine"),
    ("mismatch", "--device cuda: the NVIDIA driver supports CUDA 12.8"),
])
def test_device_cuda_names_the_cause(monkeypatch, case, expect):
    from llmc.train import pick_device as _pick_device
    if case == "missing":
        monkeypatch.setitem(sys.modules, "cupy", None)
    elif case == "no_driver":
        fake_cupy(monkeypatch, driver=0, error=NO_DRIVER)
    else:
        fake_cupy(monkeypatch, driver=12080, runtime=13010, error=NO_DRIVER)
    with pytest.raises(ConfigError) as e:
        _pick_device("cuda")
    assert str(e.value).startswith(expect), e.value
    assert str(e.value).endswith("or train on the CPU with --device cpu")
    assert _pick_device("auto") == "cpu"
