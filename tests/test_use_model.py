"""`python -m llmc.generate` and `python -m llmc.eval` on the CPU, as a user runs them.

- generate: one prompt streams its text (prompt + continuation on stdout) and exits 0; a
  prompt file runs as one batch with --num-samples per prompt; --temperature 0 output equals
  the decoder's greedy tokens; bad input (--top-p 2, a prompt longer than the context, a
  missing model, an empty prompt file) is one line on stderr, exit 2, nothing on stdout.
- eval: acc and acc_norm of a model file on a HellaSwag eval file equal hellaswag_eval on a
  CPUModel with the same weights (which tests/test_hellaswag.py checks against the model's
  own cross-entropy); --limit; bad input exits 2 with one line.

Run: python -m pytest tests/test_use_model.py -q
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmc.config import ModelConfig
from llmc.model.params import init_params

ROOT = Path(__file__).resolve().parents[1]
MC = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from llmc.formats import save_model
    out = tmp_path_factory.mktemp("model") / "hf"
    rng = np.random.default_rng(0)
    params = init_params(MC, 0) + 0.2 * rng.standard_normal(init_params(MC, 0).size)
    save_model((MC, params.astype(np.float32)), out, format="hf", dtype="fp32")
    return out


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_generate_streams_one_prompt(hf_dir):
    from llmc.inference.decoder import CPUDecoder
    from llmc.formats import load_model
    from llmc.data.tokenizer import EOT, decode, encode
    r = cli("llmc.generate", "--model", hf_dir, "--prompt", "To be or not", "--temperature", "0",
            "--max-new-tokens", "12", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    mf = load_model(hf_dir)
    (tokens,) = CPUDecoder(mf.config, mf.params).generate_all([encode("To be or not")], 12,
                                                              temperature=0)
    new = [t for t in tokens[len(encode("To be or not")):] if t != EOT]
    assert r.stdout == "To be or not" + decode(new) + "\n"
    assert "tokens/s on cpu" in r.stderr


def test_generate_prompt_file_is_a_batch(hf_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The king\n\nA horse\n", encoding="utf-8")
    r = cli("llmc.generate", "--model", hf_dir, "--prompt-file", prompts, "--num-samples", "2",
            "--max-new-tokens", "5", "--top-k", "10", "--seed", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- sample ") == 4
    assert r.stdout.index("The king") < r.stdout.index("A horse")


@pytest.mark.parametrize("args, match", [
    (["--top-p", "2"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--prompt", "word " * 80], "leave no room"),
    (["--max-new-tokens", "100"], "--max-new-tokens 62 or less"),  # "Hello world": 2 tokens
])
def test_generate_bad_input(hf_dir, args, match):
    base = ["--model", hf_dir, "--device", "cpu"]
    if "--prompt" not in args:
        base += ["--prompt", "Hello world"]
    r = cli("llmc.generate", *base, *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and match in r.stderr and "Traceback" not in r.stderr


def test_generate_missing_model_and_empty_file(tmp_path):
    r = cli("llmc.generate", "--model", tmp_path / "none", "--prompt", "x", "--device", "cpu")
    assert r.returncode == 2 and "no such" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    r = cli("llmc.generate", "--model", tmp_path / "none", "--prompt-file", empty, "--device", "cpu")
    assert r.returncode == 2 and "no prompts" in r.stderr


def _eval_file(path):
    from llmc.eval import save_examples
    from llmc.data.tokenizer import encode
    rng = np.random.default_rng(0)
    examples = []
    for i in range(6):
        ctx = encode(f"Example {i}: the man walks to the")
        endings = [encode(" " + w) for w in ("door and opens it", "moon", "store", "end of a very long road")]
        examples.append((ctx, endings, int(rng.integers(0, 4))))
    return save_examples(path, examples)


def test_eval_matches_the_library(hf_dir, tmp_path):
    from llmc.model.cpu_model import CPUModel
    from llmc.eval import hellaswag_eval
    from llmc.formats import load_model
    path = _eval_file(tmp_path / "hs.npz")
    mf = load_model(hf_dir)
    model = CPUModel(mf.config, 24, mf.config.block_size)
    model.load_params(mf.params)
    want = hellaswag_eval(model, path, limit=5)
    r = cli("llmc.eval", "--model", hf_dir, "--hellaswag", path, "--limit", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert f"acc {want['acc']:.4f} acc_norm {want['acc_norm']:.4f} (5 examples" in r.stdout


def test_eval_bad_input(hf_dir, tmp_path):
    path = _eval_file(tmp_path / "hs.npz")
    for args, match in ((["--hellaswag", tmp_path / "none.npz"], "no such eval file"),
                        (["--hellaswag", path, "--limit", "0"], "--limit"),
                        (["--hellaswag", path, "--batch-size", "0"], "--batch-size")):
        r = cli("llmc.eval", "--model", hf_dir, "--device", "cpu", *args)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
