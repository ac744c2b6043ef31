"""Which cuBLASLt algorithm each plan of llmc/cuda/cublaslt.py runs: timed once, remembered.

The heuristic's first answer is often not its fastest (measured on an H200 at d12's products:
2-18% slower, 6% of a step's matmul time). A plan's first call times the heuristic's first
cublaslt.TUNE_CANDIDATES algorithms on the call's own operands (a beta != 0 product writes a
scratch buffer of c's extent, so its result is untouched), TUNE_REPS launches each, and keeps
the fastest. The choice (its rank in the heuristic's list, which is deterministic) is saved in
$LLMC_CACHE_DIR/cublaslt_algos.json (default ~/.cache/llmc), per device name and cuBLASLt
version, first writer wins; later processes read it instead of timing, so a resumed run runs
the algorithms the interrupted one ran (the same bits). Nothing is timed while the stream is
being captured into a CUDA graph (the heuristic's first algorithm then). LLMC_MATMUL_TUNE=0
keeps the heuristic's first everywhere (the test suite does: tests/conftest.py).

Tests: pytest tests/test_matmul.py -k tuning (GPU)
"""
from __future__ import annotations

TUNE_REPS = 3
_tuned_cache: dict = {}  # "device|version" -> {plan key text: rank}, loaded once per process


def tuning_enabled() -> bool:
    import os
    return os.environ.get("LLMC_MATMUL_TUNE", "1") != "0"


def tuning_cache_path():
    import os
    from pathlib import Path
    root = os.environ.get("LLMC_CACHE_DIR") or Path.home() / ".cache" / "llmc"
    return Path(root) / "cublaslt_algos.json"


def _cache_section() -> str:
    import cupy
    from llmc.cuda.cublaslt import version
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"{name}|cublasLt {version()}"


def _read_cache() -> dict:
    import json
    try:
        data = json.loads(tuning_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(section: str, key_text: str, rank: int) -> None:
    """Add one choice to the cache file (re-read, first writer wins, atomic replace)."""
    import json
    import os
    path = tuning_cache_path()
    try:
        data = _read_cache()
        entries = data.setdefault(section, {})
        if key_text in entries:
            return
        entries[key_text] = rank
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: tuning still holds for this process


def tune(plan, c, a, b, beta: float, stream, launch) -> None:
    """Pick plan.algo among plan.candidates: the cached rank, else the fastest on this call's
    operands (module docstring). launch(algo, workspace, c_ptr) enqueues the plan's product with
    that algorithm into c_ptr on `stream` and returns cuBLASLt's status."""
    import cupy
    plan.tuned = True
    if len(plan.candidates) < 2 or not tuning_enabled() or stream.is_capturing():
        return
    section = _cache_section()
    if section not in _tuned_cache:
        _tuned_cache[section] = _read_cache().get(section, {})
    known = _tuned_cache[section]
    rank = known.get(plan.key_text)
    if rank is None:
        scratch = None
        if beta != 0.0:  # the product reads and writes c: time it on scratch of c's extent
            rows, ld = c.shape[0], c.strides[0] // c.itemsize
            scratch = cupy.zeros((rows - 1) * ld + c.shape[1], dtype=c.dtype)
        c_ptr = scratch.data.ptr if scratch is not None else c.data.ptr
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for i, (algo, ws) in enumerate(plan.candidates):
            if launch(algo, ws, c_ptr) != 0:
                continue  # an algorithm this problem's pointers do not suit
            start.record(stream)
            for _ in range(TUNE_REPS):
                launch(algo, ws, c_ptr)
            end.record(stream)
            end.synchronize()
            times.append((cupy.cuda.get_elapsed_time(start, end), i))
        if not times:
            return
        rank = min(times)[1]
        known[plan.key_text] = rank
        _remember(section, plan.key_text, rank)
    if 0 <= rank < len(plan.candidates):
        plan.algo, plan.workspace = plan.candidates[rank]
