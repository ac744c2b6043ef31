"""bench/flash_ab.py without a GPU: its arguments, kernel trees from directories and from git
revisions (extracted from this repository), unique column names, and the report's bitwise
verdict and cuDNN ratios from made-up timings.

Run:  pytest tests/test_flash_ab.py
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import flash_ab

ROOT = Path(__file__).resolve().parent.parent


def test_arguments():
    args = flash_ab.parse_args(["HEAD~1", "--impls", "sm90", "--sizes", "16", "--rounds", "5"])
    assert args.trees == ["HEAD~1"] and args.impls == ["sm90"] and args.sizes == [16]
    assert args.rounds == 5 and args.cudnn is True
    assert flash_ab.parse_args(["x"]).impls == ["sm90", "sm80"]
    assert flash_ab.parse_args(["x", "--impls", "sm90,sm90:ws"]).impls == ["sm90", "sm90:ws"]
    for bad in (["x", "--impls", "sm70"], ["x", "--impls", "ws"], ["x", "--sizes", "0"],
                ["x", "--rounds", "0"], []):
        with pytest.raises(SystemExit):
            flash_ab.parse_args(bad)


def test_tree_from_a_directory(tmp_path):
    kernels = tmp_path / "tree" / "kernels"
    shutil.copytree(ROOT / "kernels", kernels)
    assert flash_ab.resolve_tree(str(kernels), tmp_path / "w") == kernels.resolve()
    assert flash_ab.resolve_tree(str(tmp_path / "tree"), tmp_path / "w") == kernels.resolve()


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and this repository's history")
def test_tree_from_a_git_revision(tmp_path):
    got = flash_ab.resolve_tree("HEAD", tmp_path)
    assert (got / "common.cuh").is_file()
    head = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:kernels/flash_attention.cu"],
                          capture_output=True, text=True, check=True).stdout
    assert (got / "flash_attention.cu").read_text() == head


def test_unknown_tree_names_both_readings(tmp_path):
    with pytest.raises(ValueError, match="neither a directory of kernel sources.*nor a git "
                                         "revision"):
        flash_ab.resolve_tree("no-such-revision-or-dir", tmp_path)


def test_names_are_unique():
    assert flash_ab.names_for(["HEAD~1", "HEAD~1", "work"]) == ["HEAD~1", "HEAD~1#2", "work#2"]


def test_report():
    rows = [{"B": 64, "impl": "sm90", "tree": "work", "fwd": 0.32, "bwd": 0.86, "fb": 1.18},
            {"B": 64, "impl": "sm90", "tree": "HEAD~1", "fwd": 0.35, "bwd": 0.93, "fb": 1.30},
            {"B": 64, "impl": "sm90", "tree": "cudnn", "fwd": 0.30, "bwd": 1.08, "fb": 1.38},
            {"B": 16, "impl": "sm80", "tree": "work", "fwd": 0.12, "bwd": 0.37, "fb": 0.49},
            {"B": 64, "impl": "sm80", "tree": "work", "fwd": 0.43, "bwd": 1.37, "fb": 1.80}]
    text = flash_ab.report(rows, [("sm90", "HEAD~1", 2, 1024, [True, True, True])])
    lines = text.splitlines()
    assert lines[0] == "bitwise: all equal"
    assert "B=64  sm90 work" in lines[1] and "/ cuDNN: fwd 1.067  fwd+bwd 0.855" in lines[1]
    assert "/ cuDNN: fwd 1.167  fwd+bwd 0.942" in lines[2]
    # cuDNN's own row; no peer beside the sm80 rows (cuDNN is timed with the sm90 ones)
    assert all("cuDNN:" not in line for line in lines[3:6])
    diff = flash_ab.report(rows[:1], [("sm80", "x", 3, 333, [True, False, True])])
    assert diff.startswith("bitwise: DIFFERENT in sm80 x B=3 T=333 (out, lse, dqkv equal: "
                           "[True, False, True])")
