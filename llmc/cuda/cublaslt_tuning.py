"""Which cuBLASLt algorithm each plan of llmc/cuda/cublaslt.py runs: timed once, remembered.

The heuristic's first answer is often not its fastest (measured on an H200 at d12's products:
2-18% slower, 6% of a step's matmul time). A plan's first call times the heuristic's first
cublaslt.TUNE_CANDIDATES algorithms on the call's own operands (a beta != 0 product writes a
scratch buffer of c's extent, so its result is untouched) and keeps the fastest.

Each candidate is timed the way training runs it: GRAPH_LAUNCHES back-to-back launches captured
in a CUDA graph on a side stream, replayed TUNE_ROUNDS times with the candidates interleaved
(round 1 runs every candidate, then round 2, ...), the median replay kept. Timing single
eager launches (the first version) ranked them differently: the launch's own latency and the
memset nodes some algorithms add inside a graph are in one measure and not the other, and a
clock that drops as the card warms penalised whichever candidate came last. At d12, B=16 on an
H200 the graph-timed choices took 17.9 ms of a step's products in a graph where the eager-timed
ones took 18.6 (.scratch probe; docs/RESULTS.md).

The choice (its rank in the heuristic's list, which is deterministic) is saved in
$LLMC_CACHE_DIR/cublaslt_algos.json (default ~/.cache/llmc), per device name, cuBLASLt version
and timing method, first writer wins; later processes read it instead of timing, so a resumed
run runs the algorithms the interrupted one ran (the same bits). Nothing is timed while the
stream is being captured into a CUDA graph (the heuristic's first algorithm then).
LLMC_MATMUL_TUNE=0 keeps the heuristic's first everywhere (the test suite does:
tests/conftest.py).

Tests: pytest tests/test_matmul.py -k tuning (GPU)
"""
from __future__ import annotations

GRAPH_LAUNCHES = 5  # launches of one candidate per captured graph
TUNE_ROUNDS = 3     # replays of every candidate's graph, interleaved
METHOD = "graph-timed"  # part of the cache section: choices timed another way are not reused
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
    return f"{name}|cublasLt {version()}|{METHOD}"


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
    operands (module docstring). launch(algo, workspace, c_ptr, stream_ptr) enqueues the plan's
    product with that algorithm into c_ptr on the stream and returns cuBLASLt's status."""
    plan.tuned = True
    if len(plan.candidates) < 2 or not tuning_enabled() or stream.is_capturing():
        return
    section = _cache_section()
    if section not in _tuned_cache:
        _tuned_cache[section] = _read_cache().get(section, {})
    known = _tuned_cache[section]
    rank = known.get(plan.key_text)
    if rank is None:
        rank = _fastest(plan, c, beta, stream, launch)
        if rank is None:
            return
        known[plan.key_text] = rank
        _remember(section, plan.key_text, rank)
    if 0 <= rank < len(plan.candidates):
        plan.algo, plan.workspace = plan.candidates[rank]


def _fastest(plan, c, beta: float, stream, launch):
    """Rank of the candidate whose captured launches replay fastest (None: none runs)."""
    import cupy
    scratch = None
    if beta != 0.0:  # the product reads and writes c: time it on scratch of c's extent
        rows, ld = c.shape[0], c.strides[0] // c.itemsize
        n = (rows - 1) * ld + c.shape[1]
        # Straight from the device, not CuPy's pool: the pool would keep the block for the
        # rest of the process (77 MB for the LM head's weight gradient at d12).
        mem = cupy.cuda.Memory(n * c.itemsize)
        scratch = cupy.ndarray((n,), dtype=c.dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))
        scratch.fill(0)
    c_ptr = scratch.data.ptr if scratch is not None else c.data.ptr
    side = cupy.cuda.Stream(non_blocking=True)
    ready = cupy.cuda.Event(disable_timing=True)
    ready.record(stream)  # the operands are written by work queued on the caller's stream
    side.wait_event(ready)
    graphs = []
    for i, (algo, ws) in enumerate(plan.candidates):
        if launch(algo, ws, c_ptr, side.ptr) != 0:
            continue  # an algorithm this problem's pointers do not suit
        side.begin_capture()
        try:
            for _ in range(GRAPH_LAUNCHES):
                launch(algo, ws, c_ptr, side.ptr)
        finally:
            graph = side.end_capture()
        graphs.append((i, graph))
    if not graphs:
        return None
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = {i: [] for i, _ in graphs}
    for i, graph in graphs:  # a first replay of each: the graph's one-time set-up
        graph.launch(side)
    for _ in range(TUNE_ROUNDS):
        for i, graph in graphs:
            start.record(side)
            graph.launch(side)
            end.record(side)
            end.synchronize()
            times[i].append(cupy.cuda.get_elapsed_time(start, end))
    done = cupy.cuda.Event(disable_timing=True)
    done.record(side)
    stream.wait_event(done)  # the caller's stream reuses the workspace after these launches
    return min(times, key=lambda i: (sorted(times[i])[len(times[i]) // 2], i))
