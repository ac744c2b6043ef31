"""Is a CUDA GPU usable here, and if not, why not: one answer for the trainer and the tests.

    cuda_problem() -> str | None    None when CuPy can run kernels on a GPU, else the cause and fix
    cuda_available() -> bool

The causes are told apart because each has a different fix, and CUDA's own words mislead: on a
machine without any NVIDIA driver, CuPy says "cudaErrorInsufficientDriver: CUDA driver version
is insufficient for CUDA runtime version", which sends a user to upgrade a driver that is not
there. What is asked, in order:
    import cupy                    fails: CuPy is missing, or its wheel does not load
    runtime.driverGetVersion()     0: no NVIDIA driver (libcuda) on this machine
    ... < runtimeGetVersion()      the driver's CUDA major version is older than the wheel's
    runtime.getDeviceCount()       0 or cudaErrorNoDevice: a driver but no GPU visible
Versions are CUDA's integers (12090 = 12.9). Nothing here touches a device beyond counting.
Tests: pytest tests/test_device.py (the causes simulated with a fake CuPy; CPU only).
"""
from __future__ import annotations

import os

CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
INSTALL = ('pip install -e ".[cuda13]" for a CUDA 13 driver (nvidia-smi shows "CUDA Version: '
           '13.x"), or ".[cuda12]" for a CUDA 12 driver')


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _cupy_wheel() -> str:
    """The installed CuPy distribution's name (cupy-cuda12x, cupy-cuda13x, ...), or "CuPy"."""
    from importlib import metadata
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"):
        try:
            metadata.version(dist)
            return dist
        except metadata.PackageNotFoundError:
            continue
    return "CuPy"


def cuda_problem() -> str | None:
    """None when a CUDA GPU is usable through CuPy; else one sentence: the cause, then the fix."""
    try:
        import cupy
    except ModuleNotFoundError as e:
        if e.name not in (None, "cupy") and not str(e.name).startswith("cupy"):
            return (f"CuPy is installed but does not import (a module it needs is missing: "
                    f"{e}); reinstall it: {INSTALL}")
        return f"CuPy is not installed, so llmc cannot reach a GPU; install it: {INSTALL}"
    except Exception as e:  # noqa: BLE001 - a CuPy wheel that does not load, for any reason
        return (f"CuPy is installed but does not import ({type(e).__name__}: {e}); reinstall "
                f"the wheel that matches the driver: {INSTALL}")
    runtime = cupy.cuda.runtime
    wheel = _cupy_wheel()
    try:
        driver = int(runtime.driverGetVersion())
        needed = int(runtime.runtimeGetVersion())
    except Exception as e:  # noqa: BLE001
        return f"CuPy cannot query the CUDA driver ({type(e).__name__}: {e})"
    if driver == 0:
        return ("no NVIDIA driver on this machine (CuPy found no libcuda), so there is no "
                "usable GPU; on a GPU machine install the NVIDIA driver (nvidia-smi must work)")
    if driver // 1000 < needed // 1000:  # minor versions are compatible within a major one
        fix = ('pip install -e ".[cuda12]"' if driver // 1000 == 12 else
               "llmc's CuPy wheels need a CUDA 12 or 13 driver")
        return (f"the NVIDIA driver supports CUDA {_version(driver)} but the installed {wheel} "
                f"needs CUDA {_version(needed)}: install the CuPy that matches the driver "
                f"(pip uninstall {wheel}; {fix}) or update the driver")
    try:
        count = int(runtime.getDeviceCount())
    except Exception as e:  # noqa: BLE001
        if getattr(e, "status", None) == CUDA_ERROR_NO_DEVICE:
            count = 0
        elif getattr(e, "status", None) == CUDA_ERROR_INSUFFICIENT_DRIVER:
            return (f"the NVIDIA driver (CUDA {_version(driver)}) cannot run the CUDA "
                    f"{_version(needed)} of {wheel} ({e}): install the CuPy that matches it "
                    f"({INSTALL}) or update the driver")
        else:
            return (f"CUDA cannot count the GPUs ({type(e).__name__}: {e}); driver CUDA "
                    f"{_version(driver)}, {wheel} CUDA {_version(needed)}")
    if count < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = (f"CUDA_VISIBLE_DEVICES={visible!r} hides them" if visible is not None else
                "nvidia-smi lists what the driver sees")
        return f"the NVIDIA driver (CUDA {_version(driver)}) sees no GPU ({hint})"
    return None


def cuda_available() -> bool:
    """True when cuda_problem() finds nothing wrong."""
    return cuda_problem() is None
