"""`python -m llmc.train --init-from MODEL` on the CPU: training starts from the file's weights
and shape and the loss falls; different shape flags, a too-long --seq-len and bad files end
with one line and exit 2; a run that --resume continues keeps its own weights.

Run: python -m pytest tests/test_init_from.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmc.config import ModelConfig
from llmc.formats import load_model, save_model
from llmc.model.params import init_params, views
from llmc.train import main

ROOT = Path(__file__).resolve().parents[1]
MC = ModelConfig(n_layer=2, n_head=2, n_embd=48, block_size=64)  # a context of 64 tokens
RUN = ["--device", "cpu", "--batch-size", "2", "--seq-len", "32", "--val-steps", "2",
       "--sample-tokens", "8"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 'pretrained' model in Hugging Face format (written by save_model), block_size 64."""
    flat = init_params(MC, seed=5)
    rng = np.random.default_rng(5)
    p = views(flat, MC)
    for name in ("ln1b", "qkvb", "fcb", "lnfb"):
        p[name][...] = 0.02 * rng.standard_normal(p[name].shape)
    return save_model((MC, flat), tmp_path_factory.mktemp("pre") / "hf", format="hf")


def _rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_starts_from_the_file_and_learns(tmp_path, hf_dir, capsys):
    out = tmp_path / "ft"
    assert main(RUN + ["--init-from", str(hf_dir), "--max-steps", "12", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"weights from {hf_dir} (hf)" in text and "L=2, NH=2, C=48" in text
    losses = [r["loss"] for r in _rows(out) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3, losses
    state = json.loads((out / "ckpt_00000012" / "state.json").read_text())
    assert state["model"] == [2, 2, 48, 50304, 64]  # the file's shape and context, not a preset's
    # the trained model exports back to HF and reads as the same weights
    m = load_model(out)
    again = load_model(save_model(m, tmp_path / "ft_hf", format="hf"))
    assert np.array_equal(again.params, m.params)


def test_first_step_uses_the_file_weights(tmp_path, hf_dir):
    """With a negligible learning rate the checkpoint after one step equals the file's weights."""
    out = tmp_path / "o"
    assert main(RUN + ["--init-from", str(hf_dir), "--max-steps", "1", "--lr", "1e-12",
                       "--out-dir", str(out)]) == 0
    got = load_model(out / "ckpt_00000001").params
    np.testing.assert_allclose(got, load_model(hf_dir).params, rtol=0, atol=1e-9)


def test_matching_shape_flags_are_accepted(tmp_path, hf_dir):
    assert main(RUN + ["--init-from", str(hf_dir), "--n-layer", "2", "--n-embd", "48",
                       "--max-steps", "1", "--out-dir", str(tmp_path)]) == 0


def test_resume_wins(tmp_path, hf_dir, capsys):
    out = tmp_path / "r"
    flags = RUN + ["--init-from", str(hf_dir), "--out-dir", str(out)]
    assert main(flags + ["--max-steps", "2"]) == 0
    before = load_model(out / "ckpt_00000002").params
    capsys.readouterr()
    assert main(flags + ["--max-steps", "3", "--resume", "auto"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "not used: the resumed run has its own weights" in text
    assert [r["step"] for r in _rows(out) if "loss" in r] == [0, 1, 2]
    assert not np.array_equal(load_model(out / "ckpt_00000003").params, before)


def _run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LLMC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llmc.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["shape", "preset", "seq_len", "truncated", "missing"])
def test_bad_init_from_one_clear_line(tmp_path, hf_dir, case):
    args = RUN + ["--max-steps", "1", "--out-dir", str(tmp_path / "out")]
    src = str(hf_dir)
    if case == "shape":
        args += ["--n-layer", "3"]
        expect = "(2, 2, 48)"
        also = "(3, 2, 48)"
    elif case == "preset":
        args += ["--model", "d6"]
        expect, also = "(2, 2, 48)", "(6, 6, 384)"
    elif case == "seq_len":
        args = [a if a != "32" else "128" for a in args]
        expect, also = "--seq-len 128", "64 tokens"
    elif case == "truncated":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text((hf_dir / "config.json").read_text())
        (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:5000])
        src = str(bad)
        expect, also = "model.safetensors", "truncated or corrupt"
    else:
        src = str(tmp_path / "no_such_model.bin")
        expect, also = "no_such_model.bin", "no such file"
    r = _run_cli(args + ["--init-from", src], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and expect in err[0] and also in err[0], r.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_init_from_a_transformers_save(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=48, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    out = tmp_path / "o"
    assert main(RUN + ["--init-from", str(tmp_path / "hf"), "--max-steps", "6",
                       "--out-dir", str(out)]) == 0
    losses = [r["loss"] for r in _rows(out) if "loss" in r]
    assert losses[-1] < losses[0], losses


@pytest.mark.gpu
def test_init_from_on_gpu(tmp_path):
    """The GPU path: a HF file (head size 64), bf16 training from its weights, the loss falls."""
    mc = ModelConfig(n_layer=2, n_head=2, n_embd=128, block_size=64)
    src = save_model((mc, init_params(mc, seed=5)), tmp_path / "hf", format="hf")
    out = tmp_path / "g"
    assert main(["--device", "cuda", "--batch-size", "4", "--seq-len", "64", "--val-steps", "2",
                 "--sample-tokens", "8", "--init-from", str(src), "--max-steps", "12",
                 "--lr", "3e-3", "--out-dir", str(out)]) == 0
    losses = [r["loss"] for r in _rows(out) if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    state = json.loads((out / "ckpt_00000012" / "state.json").read_text())
    assert state["model"] == [2, 2, 128, 50304, 64]
