"""KV-cache decoding kernels (llmc/ops/decode.py) against the NumPy reference, on the GPU.

- decode_embed: wte[ids[b, pos[b]]] + wpe[pos[b]] for rows at different positions.
- gather_rows and kv_append: exact copies (bitwise), rows past the cache dropped.
- decode_attention: writes the newest k and v into the cache (exactly, nothing else touched)
  and matches reference.attention_cached over the updated cache, each row at its own position
  (0, a split boundary, mid-split, the last slot), head sizes 64 and 32, chunks of 16 and 64
  keys, fp32 and bf16; outputs poisoned with NaN first; bitwise deterministic; the per-head
  split counters end at zero (so the next launch, or a graph replay, starts clean).
- Validation: an unsupported head size and a wrong scratch are ValueErrors naming the argument.

Run: pytest -m gpu tests/test_decode.py
"""
import numpy as np
import pytest

from llmc.model import reference
from tests.gpu_arrays import DTYPES, device, host, host_bits, poisoned
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu


def rand(shape, dtype, seed, scale=1.0):
    x = (scale * np.random.default_rng(seed).standard_normal(shape)).astype(DTYPES[dtype])
    return x, x.astype(np.float64)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_embed(dtype):
    import cupy
    from llmc.ops.decode import decode_embed
    B, S, C, Vp = 5, 40, 64, 96
    wte, wte64 = rand((Vp, C), dtype, 1)
    wpe, wpe64 = rand((S, C), dtype, 2)
    ids = np.random.default_rng(3).integers(0, Vp, (B, S)).astype(np.int32)
    pos = np.array([0, 1, 17, 38, 39], dtype=np.int32)
    out = poisoned((B, C), dtype)
    decode_embed(out, cupy.asarray(ids), cupy.asarray(pos), device(wte), device(wpe))
    want = wte64[ids[np.arange(B), pos]] + wpe64[pos]
    assert_close(host(out), want, dtype, "out")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gather_rows_and_kv_append_copy_exactly(dtype):
    import cupy
    from llmc.ops.decode import gather_rows, kv_append
    B, R, NH, HS, S = 3, 6, 2, 32, 10
    C = NH * HS
    qkv, _ = rand((B, R, 3 * C), dtype, 4)
    pos = np.array([0, 2, 7], dtype=np.int32)  # row 2: positions 7..12, only 7..9 fit
    k, v = poisoned((B, NH, S, HS), dtype), poisoned((B, NH, S, HS), dtype)
    kv_append(k, v, device(qkv), cupy.asarray(pos))
    kb, vb = host_bits(k), host_bits(v)
    qb = qkv.view(kb.dtype)
    for b in range(B):
        for r in range(R):
            p = pos[b] + r
            if p >= S:
                continue
            heads = qb[b, r].reshape(3, NH, HS)
            np.testing.assert_array_equal(kb[b, :, p], heads[1])
            np.testing.assert_array_equal(vb[b, :, p], heads[2])
    rows, _ = rand((B * R, C), dtype, 5)
    out = poisoned((B, C), dtype)
    gather_rows(out, device(rows), cupy.asarray(np.array([5, 0, 3], dtype=np.int32)))
    np.testing.assert_array_equal(host_bits(out), rows.view(kb.dtype)[[5, R + 0, 2 * R + 3]])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("HS, chunk", [(64, 64), (64, 16), (32, 16)])
def test_decode_attention(dtype, HS, chunk):
    """The newest k and v land in the cache at pos[b] and take part in the attention."""
    import cupy
    from llmc.ops.decode import decode_attention, decode_scratch
    B, NH, S = 6, 3, 200
    C = NH * HS
    pos = np.array([0, 15, 16, 63, 117, S - 1], dtype=np.int32)
    qkv, qkv64 = rand((B, 3 * C), dtype, 6)
    k, k64 = rand((B, NH, S, HS), dtype, 7)
    v, v64 = rand((B, NH, S, HS), dtype, 8)
    heads = qkv64.reshape(B, 3, NH, HS)
    for b in range(B):
        k64[b, :, pos[b]] = heads[b, 1]
        v64[b, :, pos[b]] = heads[b, 2]
    scratch = decode_scratch(B, NH, HS, S, chunk)
    kd, vd = device(k), device(v)
    out = poisoned((B, C), dtype)
    args = (device(qkv), kd, vd, cupy.asarray(pos), scratch, chunk)
    decode_attention(out, *args)
    want = reference.attention_cached(qkv64[:, None, :C], k64, v64, pos)[:, 0]
    assert_close(host(out), want, dtype, "out")
    np.testing.assert_array_equal(host(kd), k64)  # the new rows exactly, every other row kept
    np.testing.assert_array_equal(host(vd), v64)
    assert not cupy.asnumpy(scratch["counters"]).any(), "the split counters must end at zero"
    again = poisoned((B, C), dtype)
    decode_attention(again, *args)
    np.testing.assert_array_equal(host_bits(again), host_bits(out))


def test_decode_attention_validation():
    import cupy
    from llmc.ops.attention import allocate
    from llmc.ops.decode import decode_attention, decode_scratch, decode_scratch_shapes
    B, NH, S, HS = 1, 2, 8, 24  # 24 bf16 = 3 packs: not a power of two
    qkv = cupy.zeros((B, 3 * NH * HS), dtype=DTYPES["bf16"])
    k = cupy.zeros((B, NH, S, HS), dtype=DTYPES["bf16"])
    pos = cupy.zeros((B,), dtype=np.int32)
    out = cupy.zeros((B, NH * HS), dtype=DTYPES["bf16"])
    with pytest.raises(ValueError, match="head size 24"):
        decode_attention(out, qkv, k, k, pos, decode_scratch(B, NH, HS, S))
    HS = 64
    qkv = cupy.zeros((B, 3 * NH * HS), dtype=DTYPES["bf16"])
    k = cupy.zeros((B, NH, S, HS), dtype=DTYPES["bf16"])
    out = cupy.zeros((B, NH * HS), dtype=DTYPES["bf16"])
    with pytest.raises(ValueError, match="scratch"):
        decode_attention(out, qkv, k, k, pos, allocate(decode_scratch_shapes(B, NH, HS, S, 4)))


def test_functional_forms_match_the_out_forms():
    import cupy
    from llmc import ops
    B, NH, HS, S, C = 3, 2, 64, 40, 128
    qkv, _ = rand((B, 3 * C), "bf16", 11)
    k, _ = rand((B, NH, S, HS), "bf16", 12)
    pos = cupy.asarray(np.array([0, 5, 39], dtype=np.int32))
    k1, v1, k2, v2 = device(k), device(k), device(k), device(k)
    out = poisoned((B, C), "bf16")
    ops.decode_attention(out, device(qkv), k1, v1, pos, ops.decode_scratch(B, NH, HS, S))
    got = ops.kv_attention(device(qkv), k2, v2, pos)
    np.testing.assert_array_equal(host_bits(got), host_bits(out))
    np.testing.assert_array_equal(host_bits(k2), host_bits(k1))
    wte, _ = rand((16, C), "bf16", 13)
    wpe, _ = rand((S, C), "bf16", 14)
    ids = cupy.asarray(np.arange(B * S, dtype=np.int32).reshape(B, S) % 16)
    x = poisoned((B, C), "bf16")
    ops.decode_embed(x, ids, pos, device(wte), device(wpe))
    np.testing.assert_array_equal(host_bits(ops.embed_at(ids, pos, device(wte), device(wpe))),
                                  host_bits(x))
