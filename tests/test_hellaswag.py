"""HellaSwag: jsonl -> eval file (data_tools.hellaswag) and completion-style scoring (llmc.eval).

What is checked:
- a jsonl in HellaSwag's format, written here, becomes an eval file whose contents are exactly
  encode(ctx), encode(" " + ending) for the 4 endings, and the labels;
- malformed lines (bad JSON, missing ctx, 3 endings, label 7, ...) are one-line errors naming the
  line, exit code 2, and no eval file is written; damaged eval files are refused on load;
- hellaswag_eval with a deterministic fake model whose preferred next token is known, so the
  per-ending losses and both accuracies are known exactly: acc (lowest summed loss) and
  acc_norm (lowest mean loss) differ by construction; results do not depend on how rows are
  batched/padded or on left-truncation of the context;
- with the real CPUModel, the ending losses equal the model's own cross-entropy.

Run:  python -m pytest tests/test_hellaswag.py -q
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools import hellaswag as hs
from llmc.eval import EvalFileError, ending_losses, hellaswag_eval, load_examples, save_examples
from llmc.data.tokenizer import VOCAB_SIZE, encode

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [
    {"ind": 4, "ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 7, "ctx": "Ünïcode café — the chef", "label": 0,
     "endings": ["slices an onion.", "sings.", "flies to the moon on a spoon.", "is 42."]},
    {"ind": 9, "ctx": "Then", "label": "2",
     "endings": ["a", "b c", "the end of the story", "nothing"]},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_jsonl_to_eval_file(tmp_path):
    """Contexts as is, endings with a leading space, labels (a digit string is accepted)."""
    src = write_jsonl(tmp_path / "val.jsonl", EXAMPLES[:2] + [""] + EXAMPLES[2:])
    assert hs.main(["--source", str(src), "--out", str(tmp_path / "out")]) == 0
    got = load_examples(tmp_path / "out" / "hellaswag_val.npz")
    assert len(got) == len(EXAMPLES)
    for (ctx, endings, label), ex in zip(got, EXAMPLES):
        assert ctx.tolist() == encode(ex["ctx"])
        assert [e.tolist() for e in endings] == [encode(" " + e) for e in ex["endings"]]
        assert label == int(ex["label"])


BAD_LINES = [
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 1', "not valid JSON"),
    ('["ctx", "endings"]', "not an object"),
    ('{"endings": ["a", "b", "c", "d"], "label": 1}', '"ctx"'),
    ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 1}', '"endings" must be a list of 4'),
    ('{"ctx": "x", "endings": ["a", "b", "c", 4], "label": 1}', '"endings" must be a list of 4'),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 7}', '"label" must be 0..3'),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"]}', '"label" must be 0..3'),
]


@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_malformed_line_is_a_one_line_error_naming_the_line(tmp_path, line, problem):
    """A bad third line (after a good line and a blank one): rc 2, 'file:3: ...', no output."""
    src = write_jsonl(tmp_path / "val.jsonl", [EXAMPLES[0], "", line, EXAMPLES[1]])
    proc = subprocess.run([sys.executable, "-m", "data_tools.hellaswag", "--source", str(src),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "val.jsonl:3: " in errors[0] and problem in errors[0], proc.stderr
    assert not (tmp_path / "out" / "hellaswag_val.npz").exists()


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(hs.HellaSwagError, match="no such file"):
        hs.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(hs.HellaSwagError, match="no examples"):
        hs.read_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))


def test_damaged_eval_files_are_refused(tmp_path):
    """Missing file, not an npz, wrong format tag, inconsistent offsets: EvalFileError."""
    with pytest.raises(EvalFileError, match="no such eval file"):
        load_examples(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EvalFileError, match="not a readable"):
        load_examples(tmp_path / "junk.npz")
    good = save_examples(tmp_path / "good.npz", [([1, 2], [[3], [4], [5, 6], [7]], 2)])
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "tag.npz", **{**arrays, "format": np.array("something-else")})
    with pytest.raises(EvalFileError, match="not an llmc-hellaswag-1"):
        load_examples(tmp_path / "tag.npz")
    np.savez(tmp_path / "offs.npz", **{**arrays, "ending_offsets": arrays["ending_offsets"][:-1]})
    with pytest.raises(EvalFileError, match="inconsistent"):
        load_examples(tmp_path / "offs.npz")


# ---- scoring -------------------------------------------------------------------------------
X = 8.0  # the fake model's logit for its preferred token; every other logit is 0
Z = math.log(math.exp(X) + VOCAB_SIZE - 1)
GOOD, BAD = Z - X, Z  # loss of the preferred token, of any other token


def preferred(prev):
    return (int(prev) * 7 + 3) % VOCAB_SIZE


class PreferNext:
    """Fake model: at each position the logits favour preferred(current token) by X."""

    def __init__(self, B=None, T=None):
        self.B, self.T, self.calls = B, T, []

    def logits(self, inputs):
        assert inputs.dtype == np.int32 and inputs.ndim == 2
        if self.B is not None:
            assert inputs.shape[0] <= self.B and inputs.shape[1] <= self.T
        self.calls.append(inputs.shape)
        B, T = inputs.shape
        out = np.zeros((B, T, VOCAB_SIZE), dtype=np.float32)
        fav = (inputs.astype(np.int64) * 7 + 3) % VOCAB_SIZE
        out[np.arange(B)[:, None], np.arange(T)[None, :], fav] = X
        return out


def ending(ctx_last, pattern):
    """Ending tokens following ctx_last; pattern 'g' = the preferred token, 'b' = another."""
    ids, prev = [], ctx_last
    for c in pattern:
        tok = preferred(prev) if c == "g" else (preferred(prev) + 1) % VOCAB_SIZE
        ids.append(tok)
        prev = tok
    return ids


# (patterns of the 4 endings, label, acc right?, acc_norm right?)
CASES = [
    (["g", "b", "bb", "gb"], 0, True, True),          # sum a / mean a: both pick 0
    (["b", "gggb", "bb", "bbb"], 0, True, False),     # sum picks 0 (b); mean picks 1 ((3a+b)/4)
    (["b", "gggb", "bb", "bbb"], 1, False, True),
    (["gb", "b", "bb", "bbb"], 3, False, False),      # sum picks 1, mean picks 0
    (["b", "bb", "gg", "gb"], 2, True, True),         # 2a < b: both pick 2
    (["b", "gggb", "bb", "bbb"], 0, True, False),
]


def make_eval_file(path, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for patterns, label, _, _ in CASES:
        ctx = rng.integers(0, VOCAB_SIZE, size=int(rng.integers(1, 12))).tolist()
        examples.append((ctx, [ending(ctx[-1], p) for p in patterns], label))
    return save_examples(path, examples)


def test_scores_with_a_fake_model_are_exact(tmp_path):
    """acc = 4/6 and acc_norm = 3/6 by construction; per-ending losses are sums of a and b."""
    assert 2 * GOOD < BAD  # what CASES relies on
    path = make_eval_file(tmp_path / "hs.npz")
    result = hellaswag_eval(PreferNext(), path)
    assert result == {"acc": sum(c[2] for c in CASES) / len(CASES),
                      "acc_norm": sum(c[3] for c in CASES) / len(CASES), "n": len(CASES)}
    assert result["acc"] == pytest.approx(4 / 6) and result["acc_norm"] == pytest.approx(3 / 6)
    assert hellaswag_eval(PreferNext(), path, limit=2) == {"acc": 1.0, "acc_norm": 0.5, "n": 2}
    # per-ending losses against the closed form
    from llmc.eval import _rows
    rows = _rows(load_examples(path), None)
    losses = ending_losses(PreferNext(), rows, 64)
    expected = [[GOOD if c == "g" else BAD for c in p] for patterns, *_ in CASES for p in patterns]
    for got, want in zip(losses, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("B,T", [(3, 64), (1, 40), (5, 6), (64, 5)])
def test_batching_padding_and_truncation_do_not_change_scores(tmp_path, B, T):
    """Rows split across calls of B rows, padded, contexts cut to fit T: same result.

    T=5 is the least that holds the longest ending (4 tokens) after one context token."""
    path = make_eval_file(tmp_path / "hs.npz", seed=1)
    model = PreferNext(B, T)
    assert hellaswag_eval(model, path) == hellaswag_eval(PreferNext(), path)
    assert all(b <= B and t <= T for b, t in model.calls)


def test_wrong_logits_shape_is_reported(tmp_path):
    path = make_eval_file(tmp_path / "hs.npz")

    class Broken:
        def logits(self, inputs):
            return np.zeros(inputs.shape + (10,), np.float32)
    with pytest.raises(ValueError, match="model.logits returned shape"):
        hellaswag_eval(Broken(), path)


def test_ending_losses_match_the_cpu_model_cross_entropy():
    """With llmc's CPUModel: scoring a whole row averages to model.forward's mean loss, and
    scoring from token 3 on gives the same per-token losses as the tail of the whole row."""
    from llmc.config import ModelConfig
    from llmc.model.cpu_model import CPUModel
    from llmc.model.params import init_params
    mc = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    model = CPUModel(mc, B=2, T=16)
    model.load_params(init_params(mc, seed=3))
    row = np.array(encode(" The quick brown fox jumps over the lazy dog"), dtype=np.int64)
    whole = ending_losses(model, [(row, 1)], batch_rows=2)[0]
    want = model.forward(row[None, :-1].astype(np.int32), row[None, 1:].astype(np.int32))
    assert whole.shape == (len(row) - 1,)
    assert whole.mean() == pytest.approx(float(want), rel=1e-5)
    tail = ending_losses(model, [(row, 3)], batch_rows=2)[0]
    np.testing.assert_allclose(tail, whole[2:], rtol=1e-5)
