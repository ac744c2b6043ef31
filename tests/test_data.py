"""The data loader (llmc/data/loader.py): rows, rank disjointness, epoch coverage, per-epoch shuffling,
exact resume (also across an epoch boundary and through JSON), argument and state errors, and on
a GPU the DevicePrefetcher handing out the loader's batches.

The synthetic shards hold consecutive ids over all shards (shard s continues where s-1 ended),
so the first input token of a row names the row: its shard and its start.

Run:  python -m pytest tests/test_data.py -q        (GPU part: python -m pytest -m gpu tests/test_data.py)
"""
import json

import numpy as np
import pytest

from llmc.data.loader import DataLoader, DevicePrefetcher
from llmc.data.shards import write_shard

T = 16
LENGTHS = (1000, 17, 517, 2049, 10, 300)  # 17: exactly one row; 10: no row (skipped)


@pytest.fixture
def shards(tmp_path):
    paths, offset = [], 0
    for i, n in enumerate(LENGTHS):
        paths.append(write_shard(tmp_path / f"s{i}.arrow", np.arange(offset, offset + n), "train"))
        offset += n
    return paths


def all_rows(lengths=LENGTHS, t=T):
    """First token of every row of every shard, in file order."""
    rows, offset = [], 0
    for n in lengths:
        rows += [offset + i * t for i in range((n - 1) // t)] if n > t else []
        offset += n
    return rows


def make(paths, **kw):
    kw.setdefault("B", 3)
    kw.setdefault("T", T)
    with pytest.warns(UserWarning, match="fewer than T\\+1 = 17; the shard gives no row"):
        return DataLoader(paths, **kw)


def heads(loader, steps):
    """First tokens of the rows of `steps` batches, one list per step."""
    return [loader.next_batch()[0][:, 0].tolist() for _ in range(steps)]


def test_rows_are_consecutive_tokens(shards):
    """inputs are T consecutive ids, targets the same shifted by one, both int32 (B, T)."""
    loader = make(shards)
    for _ in range(50):
        x, y = loader.next_batch()
        assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == y.shape == (3, T)
        assert x.flags.c_contiguous and y.flags.c_contiguous
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))
        np.testing.assert_array_equal(y, x + 1)
    assert loader.rows_per_epoch == len(all_rows())


def test_ranks_disjoint_cover_epoch_and_match_single_rank(shards):
    """8 ranks: disjoint rows within an epoch; together every row once; same as 1 rank, B=24."""
    world, B = 8, 3
    ranks = [make(shards, B=B, rank=r, world_size=world) for r in range(world)]
    single = make(shards, B=world * B)
    R = ranks[0].rows_per_epoch
    steps = -(-R // (world * B))  # enough steps to cover one epoch
    stream = []
    for _ in range(steps):
        per_rank = [ld.next_batch()[0][:, 0].tolist() for ld in ranks]
        stream += sum(per_rank, [])
        assert single.next_batch()[0][:, 0].tolist() == sum(per_rank, [])
    epoch0 = stream[:R]
    assert sorted(epoch0) == all_rows()  # every row exactly once, only tails missing
    assert len(set(epoch0)) == R
    assert {ld.epoch for ld in ranks} == {1} and ranks[0].state_dict()["cursor"] == len(stream) - R


def test_shuffle_differs_by_epoch_and_seed(shards):
    """The row order is a fresh permutation each epoch and for each seed, reproducible per seed."""
    loader = make(shards, B=1)
    R = loader.rows_per_epoch
    e0, e1 = sum(heads(loader, R), []), sum(heads(loader, R), [])
    assert sorted(e0) == sorted(e1) == all_rows() and e0 != e1
    other = sum(heads(make(shards, B=1, seed=7), R), [])
    assert sorted(other) == all_rows() and other != e0
    assert sum(heads(make(shards, B=1), R), []) == e0
    # each shard is read in one run, and the order of the shards changes too
    ends = np.cumsum(LENGTHS)
    runs = []
    for e in (e0, e1, other):
        shard_of = np.searchsorted(ends, e, side="right")
        runs.append(tuple(shard_of[np.r_[True, shard_of[1:] != shard_of[:-1]]]))
    assert all(sorted(r) == [0, 1, 2, 3, 5] for r in runs)
    assert runs[1] != runs[0] and runs[2] != runs[0]


def test_no_shuffle_reads_in_file_order(shards):
    """shuffle=False: rows in file order across shards, then the same again for epoch 1."""
    loader = make(shards, B=5, shuffle=False)
    R = loader.rows_per_epoch
    stream = sum(heads(loader, 2 * R // 5 + 1), [])
    assert stream[:R] == all_rows() and stream[R:2 * R] == all_rows()[:len(stream) - R]
    loader.reset()
    assert loader.next_batch()[0][0, 0] == 0 and loader.epoch == 0


@pytest.mark.parametrize("world, rank", [(1, 0), (4, 3)])
def test_resume_is_bitwise(shards, world, rank):
    """Reloading the state at several points (also across an epoch end) repeats the run exactly."""
    ref = make(shards, B=7, world_size=world, rank=rank)
    steps_per_epoch = ref.rows_per_epoch // (7 * world)
    total = 3 * steps_per_epoch + 2
    states, batches = [], []
    for _ in range(total):
        states.append(json.loads(json.dumps(ref.state_dict())))
        batches.append(ref.next_batch())
    assert ref.epoch >= 2
    for k in (0, 1, 5, steps_per_epoch, steps_per_epoch + 1, 2 * steps_per_epoch + 1):
        resumed = make(shards, B=7, world_size=world, rank=rank)
        resumed.load_state_dict(states[k])
        for x, y in batches[k:]:
            rx, ry = resumed.next_batch()
            assert np.array_equal(rx, x) and np.array_equal(ry, y)


def test_resume_on_another_world_size_with_strict_false(shards):
    """strict=False continues the same global row stream with a different split over ranks."""
    two = [make(shards, B=4, world_size=2, rank=r) for r in range(2)]
    for _ in range(5):
        for ld in two:
            ld.next_batch()
    state = two[0].state_dict()
    assert two[1].state_dict()["cursor"] == state["cursor"]  # the same on every rank
    with pytest.raises(ValueError, match="saved with B=4, world_size=2; this loader has B=2, "
                                         "world_size=4.*strict=False"):
        make(shards, B=2, world_size=4).load_state_dict(state)
    four = [make(shards, B=2, world_size=4, rank=r) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state, strict=False)
    for _ in range(10):
        a = np.concatenate([ld.next_batch()[0] for ld in two])
        b = np.concatenate([ld.next_batch()[0] for ld in four])
        np.testing.assert_array_equal(a, b)


def test_state_mismatch_errors(shards, tmp_path):
    """A state from another T, seed, shuffle, data, or a damaged one, is refused clearly."""
    state = make(shards).state_dict()
    with pytest.raises(ValueError, match="saved with T=16, this loader has T=8; .*--seq-len"):
        DataLoader(shards, B=3, T=8).load_state_dict(state)  # T=8: every shard has a row
    with pytest.raises(ValueError, match="saved with seed=1337, this loader has seed=1; .*--seed"):
        make(shards, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle=True, this loader has shuffle=False"):
        make(shards, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="other shards .*6 shard.*5 shard.*same data"):
        make(shards[:5]).load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks \['cursor'\]"):
        make(shards).load_state_dict({k: v for k, v in state.items() if k != "cursor"})
    with pytest.raises(ValueError, match="0 <= cursor <"):
        make(shards).load_state_dict(dict(state, cursor=10**9))
    with pytest.raises(ValueError, match="inconsistent"):
        make(shards).load_state_dict(dict(state, position=state["position"] + 1))
    with pytest.raises(ValueError, match="version 9"):
        make(shards).load_state_dict(dict(state, version=9))


@pytest.mark.parametrize("kw, match", [
    (dict(B=0), "B must be >= 1, got 0"),
    (dict(B=2.5), r"B must be an int, got 2.5"),
    (dict(T=0), "T must be >= 1"),
    (dict(world_size=0), "world_size must be >= 1"),
    (dict(rank=2, world_size=2), r"rank 2 is not below world_size 2; ranks are 0..1"),
    (dict(rank=-1), "rank must be >= 0"),
    (dict(seed=-3), "seed must be >= 0"),
])
def test_argument_errors(shards, kw, match):
    """Bad B/T/world size/rank/seed name the argument and the fix."""
    with pytest.raises(ValueError, match=match):
        DataLoader(shards, **{"B": 3, "T": T, **kw})


def test_no_usable_shard_and_no_paths(shards):
    """All shards too short -> an error naming the longest shard and the largest T that works."""
    with pytest.raises(ValueError, match=r"holds T\+1 = 2050 tokens \(the longest has 2049\); "
                                         "use --seq-len 2048 or less"):
        with pytest.warns(UserWarning):
            DataLoader(shards, B=1, T=2049)
    with pytest.raises(ValueError, match="no shard paths given"):
        DataLoader([], B=1, T=4)


def test_spec_string_and_small_dataset(shards, tmp_path):
    """A directory spec is expanded by find_shards; fewer rows than a batch warns and still works."""
    loader = make(str(tmp_path), B=2)
    assert loader.rows_per_epoch == len(all_rows())
    with pytest.warns(UserWarning, match="fewer than one global batch"):
        tiny = DataLoader([shards[1]], B=4, T=T)  # one row only
    x, _ = tiny.next_batch()
    assert x[:, 0].tolist() == [1000] * 4 and tiny.epoch == 4


@pytest.mark.gpu
def test_device_prefetcher_matches_loader(shards):
    """Prefetched GPU batches equal the loader's, stay valid until the call after next, and the
    prefetcher's state resumes at the batches handed out (not the prefetched one)."""
    import cupy
    ref = make(shards, B=4, world_size=2, rank=1)
    expected = [ref.next_batch() for _ in range(40)]
    pre = DevicePrefetcher(make(shards, B=4, world_size=2, rank=1))
    previous = None
    for i in range(20):
        x, y = pre.next_batch()
        assert isinstance(x, cupy.ndarray) and x.dtype == cupy.int32 and x.shape == (4, T)
        cupy.testing.assert_array_equal(x, expected[i][0])
        cupy.testing.assert_array_equal(y, expected[i][1])
        if previous is not None:  # the batch from the call before is still intact
            cupy.testing.assert_array_equal(previous, expected[i - 1][0])
        previous = x
    state = pre.state_dict()
    assert state == make(shards, B=4, world_size=2, rank=1).state_dict() | {
        k: state[k] for k in ("epoch", "cursor", "shard_index", "position")}
    resumed = DevicePrefetcher(make(shards, B=4, world_size=2, rank=1))
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for i in range(20, 40):
        cupy.testing.assert_array_equal(resumed.next_batch()[0], expected[i][0])
    resumed.reset()
    cupy.testing.assert_array_equal(resumed.next_batch()[0], expected[0][0])


@pytest.mark.gpu
def test_device_prefetcher_waits_for_a_busy_consumer(shards):
    """The consumer's stream is kept busy (matmuls queued before each batch is read); no batch is
    overwritten by a later prefetch before the queued work that reads it has run."""
    import cupy
    ref = make(shards, B=4)
    expected = [int(ref.next_batch()[0].astype(np.int64).sum()) for _ in range(12)]
    pre = DevicePrefetcher(make(shards, B=4))
    a = cupy.random.default_rng(0).standard_normal((4096, 4096), dtype=cupy.float32)
    sums = cupy.zeros(12, dtype=cupy.int64)
    with cupy.cuda.Stream(non_blocking=True):
        for i in range(12):
            x, _ = pre.next_batch()
            for _ in range(3):
                a = a @ a
                a /= cupy.linalg.norm(a)
            sums[i] = x.astype(cupy.int64).sum()
        cupy.cuda.get_current_stream().synchronize()
    assert sums.tolist() == expected
