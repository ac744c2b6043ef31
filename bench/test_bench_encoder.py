"""Encoder throughput at GPT-2 124M: B=64, T=1024, C=768, Vp=50304, Zipf-like token ids.

Memory-bound. Bytes counted are the minimum DRAM traffic: forward writes one out row per
position and reads the wte rows of the distinct tokens once (a token's repeats hit L2; counting
a row per position put the forward above the card's bandwidth), wpe once and the ids; backward
reads dout once and read-modify-writes dwpe and the dwte rows of the distinct tokens. (The
backward actually reads dout twice, once for dwpe and once for dwte, so its fraction is a lower
bound on the efficiency of each pass.) `extra_info`: CUDA-event median ms (L2 flushed), GB/s,
fraction of this card's measured memory ceiling, distinct tokens.
Correctness is checked on a small case against llmc.model.reference first.

Run:  python -m pytest bench/test_bench_encoder.py --benchmark-only -q
"""
import ml_dtypes
import numpy as np
import pytest

from bench.timing import device_randn, record, to_host
from llmc.model import reference
from tests.tolerances import assert_close

B, T, C, VP = 64, 1024, 768, 50304
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}


def token_ids(B, T, Vp, seed=0):
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.2, size=(B, T)) - 1, Vp - 1).astype(np.int32)


def check_small(dtype):
    import cupy
    from llmc.ops.encoder import (encoder_backward, encoder_backward_scratch_size,
                                  encoder_forward)
    dt = DTYPES[dtype]
    b, t, c, vp = 3, 37, 96, 500
    wte, wpe = device_randn((vp, c), dt, 1), device_randn((t, c), dt, 2)
    inp = token_ids(b, t, vp, 3)
    out = cupy.empty((b, t, c), dt)
    encoder_forward(out, cupy.asarray(inp), wte, wpe)
    assert_close(to_host(out), reference.encoder_forward(to_host(wte), to_host(wpe), inp),
                 dtype, "out")
    dwte, dwpe = device_randn((vp, c), dt, 4), device_randn((t, c), dt, 5)
    dwte0, dwpe0 = to_host(dwte), to_host(dwpe)
    scratch = cupy.empty(encoder_backward_scratch_size(b, t, c, vp), cupy.uint8)
    encoder_backward(dwte, dwpe, out, cupy.asarray(inp), scratch)
    r_dwte, r_dwpe = reference.encoder_backward(to_host(out), inp, (vp, c), (t, c))
    assert_close(to_host(dwte), dwte0 + r_dwte, dtype, "dwte")
    assert_close(to_host(dwpe), dwpe0 + r_dwpe, dtype, "dwpe")


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bench_encoder(benchmark, dtype, direction):
    import cupy
    from llmc.ops.encoder import (encoder_backward, encoder_backward_scratch_size,
                                  encoder_forward)
    check_small(dtype)
    dt = DTYPES[dtype]
    s = dt.itemsize
    inp_h = token_ids(B, T, VP)
    distinct = int(np.unique(inp_h).size)
    inp = cupy.asarray(inp_h)
    wte, wpe = device_randn((VP, C), dt, 1, 0.02), device_randn((T, C), dt, 2, 0.02)
    out = cupy.empty((B, T, C), dt)
    benchmark.extra_info["distinct_tokens"] = distinct
    if direction == "forward":
        nbytes = B * T * C * s + distinct * C * s + T * C * s + 4 * B * T
        record(benchmark, lambda: encoder_forward(out, inp, wte, wpe), nbytes=nbytes)
    else:
        dout = device_randn((B, T, C), dt, 3, 1e-3)
        scratch = cupy.empty(encoder_backward_scratch_size(B, T, C, VP), cupy.uint8)
        nbytes = B * T * C * s + 2 * T * C * s + 2 * distinct * C * s + 4 * B * T
        record(benchmark, lambda: encoder_backward(wte, wpe, dout, inp, scratch), nbytes=nbytes)
