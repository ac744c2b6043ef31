"""Checkpoints: round trip, atomic publication, pruning, --resume auto, and clear errors for
broken or mismatched checkpoints (never a half-written directory picked up).

Run: pytest tests/test_checkpoint.py
"""
import json
import os

import numpy as np
import pytest

from llmc.training import checkpoint
from llmc.training.checkpoint import CheckpointError


def _save(out, step, seed=0, **kw):
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(100).astype(np.float32)
    optim = {"m": rng.standard_normal(100).astype(np.float32), "v": rng.random(100).astype(np.float32),
             "loader_state": np.array(json.dumps({"pos": step}))}
    path = checkpoint.save(out, step, params=params, optim=optim, state={"note": "x"}, **kw)
    return path, params, optim


def test_round_trip(tmp_path):
    path, params, optim = _save(tmp_path, 7)
    assert path.name == "ckpt_00000007"
    p2, o2, state = checkpoint.load(path)
    np.testing.assert_array_equal(p2, params)
    np.testing.assert_array_equal(o2["m"], optim["m"])
    assert json.loads(str(o2["loader_state"])) == {"pos": 7}
    assert state["step"] == 7 and state["note"] == "x" and state["world_size"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_prune_keeps_newest(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000003", "ckpt_00000004"]


def test_resume_auto_ignores_incomplete(tmp_path):
    _save(tmp_path, 5)
    # a crash mid-save leaves a .tmp directory and maybe a directory without state.json
    (tmp_path / "ckpt_00000009.tmp").mkdir()
    (tmp_path / "ckpt_00000008").mkdir()
    assert checkpoint.resolve_resume("auto", tmp_path).name == "ckpt_00000005"
    assert checkpoint.clean(tmp_path) == ["ckpt_00000008", "ckpt_00000009.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000005"]
    assert checkpoint.resolve_resume(None, tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path / "empty") is None


def test_failed_save_leaves_last_good_intact(tmp_path, monkeypatch):
    good, params, _ = _save(tmp_path, 1)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(CheckpointError, match=r"ckpt_00000002\.tmp: writing the checkpoint failed "
                       r"\(disk full\).*newest complete checkpoint is .*ckpt_00000001"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert not (tmp_path / "ckpt_00000002.tmp").exists()  # a failed save leaves no .tmp behind
    assert checkpoint.resolve_resume("auto", tmp_path) == good
    np.testing.assert_array_equal(checkpoint.load(good)[0], params)
    _save(tmp_path, 2)  # the next save cleans the stale .tmp and succeeds
    assert checkpoint.resolve_resume("auto", tmp_path).name == "ckpt_00000002"


def test_resave_same_step(tmp_path):
    _save(tmp_path, 3, seed=1)
    path, params, _ = _save(tmp_path, 3, seed=2)
    np.testing.assert_array_equal(checkpoint.load(path)[0], params)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)
    path, _, _ = _save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="written by 1 process"):
        checkpoint.load(path, world_size=2)
    os.remove(path / "model.npy")
    with pytest.raises(CheckpointError, match="model.npy: missing"):
        checkpoint.load(path)
    (path / "state.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable JSON"):
        checkpoint.load(path)
    os.remove(path / "state.json")
    with pytest.raises(CheckpointError, match="no state.json"):
        checkpoint.load(path)
