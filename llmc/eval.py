"""HellaSwag accuracy of a model, scored completion-style as llm.c and nanoGPT do.

Each example is a context and 4 candidate endings. Every ending is appended to the context
(one row each), the model scores the rows, and the cross-entropy of the ending tokens only is
summed (-> `acc`: the ending with the lowest total loss) and averaged over the ending's tokens
(-> `acc_norm`: the lowest mean loss). A guess is right when it is the labelled ending.

The eval file (written by `python -m data_tools.hellaswag`, read here) is a NumPy .npz without
pickles, the examples flattened:
    format          str   "llmc-hellaswag-1"
    ctx             uint16 (sum of context lengths,)       ctx_offsets     int64 (n+1,)
    endings         uint16 (sum of ending lengths,)        ending_offsets  int64 (4n+1,)
    labels          int64 (n,)                              values in 0..3
Example i's context is ctx[ctx_offsets[i]:ctx_offsets[i+1]]; its ending k is
endings[ending_offsets[4i+k]:ending_offsets[4i+k+1]] (tokenized with a leading space).

Batching: rows of consecutive examples are packed up to the model's batch size `model.B` (64
for models without one) and padded at the end with <|endoftext|> to the longest row of the call;
padding comes after every scored position, so a causal model's scores do not see it. A row
longer than `model.T` loses context tokens from the left (the ending is always kept whole).

    from llmc.eval import hellaswag_eval
    hellaswag_eval(model, "data/hellaswag/hellaswag_val.npz", limit=500)  # {acc, acc_norm, n}

Run the tests:  python -m pytest tests/test_hellaswag.py -q
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmc.data.tokenizer import EOT, VOCAB_SIZE

FORMAT = "llmc-hellaswag-1"
NUM_ENDINGS = 4
_FIX = "rewrite it with python -m data_tools.hellaswag"


class EvalFileError(ValueError):
    """An eval file that cannot be used; the message is '<path>: <problem>; <fix>'."""


def save_examples(path, examples) -> Path:
    """Atomically write [(ctx ids, [4 ending ids], label)] as an eval .npz at path; return it."""
    path = Path(path)
    ctx, ctx_off, ends, end_off, labels = [], [0], [], [0], []
    for ctx_ids, endings, label in examples:
        if len(endings) != NUM_ENDINGS or not 0 <= int(label) < NUM_ENDINGS:
            raise EvalFileError(f"{path}: an example needs {NUM_ENDINGS} endings and a label "
                                f"in 0..3, got {len(endings)} and {label}; fix the input")
        if len(ctx_ids) == 0 or any(len(e) == 0 for e in endings):
            raise EvalFileError(f"{path}: an example has an empty context or ending; "
                                "drop it or fix the input")
        ctx.extend(ctx_ids)
        ctx_off.append(len(ctx))
        for e in endings:
            ends.extend(e)
            end_off.append(len(ends))
        labels.append(int(label))
    if not labels:
        raise EvalFileError(f"{path}: no examples to write; check the input")
    arrays = dict(format=np.array(FORMAT), ctx=np.array(ctx, dtype=np.uint16),
                  ctx_offsets=np.array(ctx_off, dtype=np.int64),
                  endings=np.array(ends, dtype=np.uint16),
                  ending_offsets=np.array(end_off, dtype=np.int64),
                  labels=np.array(labels, dtype=np.int64))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_examples(path) -> list:
    """An eval .npz -> [(ctx int64 (n_ctx,), [4 x ending int64 (n_k,)], label int)], validated."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalFileError(f"{path}: no such eval file; create it with "
                            "python -m data_tools.hellaswag --out DIR")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise EvalFileError(f"{path}: not a readable .npz ({e}); {_FIX}") from None
    keys = ("format", "ctx", "ctx_offsets", "endings", "ending_offsets", "labels")
    missing = [k for k in keys if k not in data]
    if missing or str(data["format"]) != FORMAT:
        raise EvalFileError(f"{path}: not an {FORMAT} eval file (missing {missing or 'format'}); "
                            f"{_FIX}")
    ctx, co, ends, eo, labels = (data[k] for k in keys[1:])
    n = labels.shape[0]
    ok = (co.shape == (n + 1,) and eo.shape == (NUM_ENDINGS * n + 1,) and n > 0
          and co[0] == 0 and eo[0] == 0 and co[-1] == ctx.shape[0] and eo[-1] == ends.shape[0]
          and np.all(np.diff(co) > 0) and np.all(np.diff(eo) > 0)
          and np.all((labels >= 0) & (labels < NUM_ENDINGS)))
    if not ok:
        raise EvalFileError(f"{path}: inconsistent offsets or labels (damaged file); {_FIX}")
    ctx, ends = ctx.astype(np.int64), ends.astype(np.int64)
    return [(ctx[co[i]:co[i + 1]],
             [ends[eo[NUM_ENDINGS * i + k]:eo[NUM_ENDINGS * i + k + 1]] for k in range(NUM_ENDINGS)],
             int(labels[i])) for i in range(n)]


def _rows(examples, max_len):
    """Per ending: (row ids, index of its first ending token); context cut from the left."""
    rows = []
    for ctx, endings, _ in examples:
        for end in endings:
            keep = len(ctx) if max_len is None else max(1, min(len(ctx), max_len - len(end)))
            row = np.concatenate([ctx[len(ctx) - keep:], end])
            if max_len is not None:
                row = row[:max_len]  # an ending longer than the model's T: score what fits
            rows.append((row, keep))
    return rows


def ending_losses(model, rows, batch_rows: int) -> list:
    """Per row: (n_scored,) cross-entropy of each ending token given what precedes it.

    Models with `token_losses(inputs, targets) -> (B, T)` (CPUModel, GPUModel) compute the
    losses where the logits are, so only B*T floats reach the host; others are scored from
    `logits(inputs) -> (B, T, V)` here, in float64.
    """
    out = []
    per_token = getattr(model, "token_losses", None)
    for s in range(0, len(rows), batch_rows):
        chunk = rows[s:s + batch_rows]
        T = max(len(r) for r, _ in chunk)
        inputs = np.full((len(chunk), T), EOT, dtype=np.int32)
        targets = np.zeros((len(chunk), T), dtype=np.int32)
        for b, (r, _) in enumerate(chunk):
            inputs[b, :len(r)] = r
            targets[b, :len(r) - 1] = r[1:]  # position p predicts token p + 1
        if per_token is not None:
            losses = np.asarray(per_token(inputs, targets))
            if losses.shape != inputs.shape:
                raise ValueError(f"model.token_losses returned shape {losses.shape} for inputs "
                                 f"{inputs.shape}; expected the same shape")
            for b, (r, start) in enumerate(chunk):
                out.append(losses[b, start - 1:len(r) - 1].astype(np.float64))
            continue
        logits = np.asarray(model.logits(inputs))
        if logits.ndim != 3 or logits.shape[:2] != inputs.shape or logits.shape[2] < VOCAB_SIZE:
            raise ValueError(f"model.logits returned shape {logits.shape} for inputs "
                             f"{inputs.shape}; expected (B, T, V >= {VOCAB_SIZE})")
        for b, (r, start) in enumerate(chunk):
            pos = np.arange(start - 1, len(r) - 1)
            z = logits[b, pos, :VOCAB_SIZE].astype(np.float64)  # (n_scored, V)
            zmax = z.max(axis=1)
            lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
            out.append(lse - z[np.arange(len(pos)), r[pos + 1]])
    return out


def hellaswag_eval(model, path, limit=None) -> dict:
    """{acc, acc_norm, n} of `model` (anything with .logits(int32 (B, T)) -> (B, T, V)) on path."""
    examples = load_examples(path)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be a positive number of examples, got {limit}")
        examples = examples[:int(limit)]
    batch_rows = int(getattr(model, "B", None) or 64)
    losses = ending_losses(model, _rows(examples, getattr(model, "T", None)), batch_rows)
    correct = correct_norm = 0
    for i, (_, _, label) in enumerate(examples):
        per = losses[NUM_ENDINGS * i:NUM_ENDINGS * (i + 1)]
        total = np.array([l.sum() for l in per])
        mean = np.array([l.mean() for l in per])
        correct += int(np.argmin(total) == label)
        correct_norm += int(np.argmin(mean) == label)
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


# ---------------------------------------------------------------------------------------------
# python -m llmc.eval

def _eval_model(model_file, device: str, dtype: str, batch_rows: int, T: int):
    """A CPUModel or GPUModel of the file's weights, sized for (batch_rows, T) rows."""
    mc = model_file.config
    if device == "cpu":
        from llmc.model.cpu_model import CPUModel
        model = CPUModel(mc, batch_rows, T)
    else:
        from llmc.model.gpu_model import GPUModel
        model = GPUModel(mc, batch_rows, T, dtype=dtype)
    model.load_params(model_file.params)
    return model


def main(argv=None) -> int:
    """`python -m llmc.eval --model PATH --hellaswag FILE [--limit N]`: acc and acc_norm."""
    import argparse
    import sys
    import time
    ap = argparse.ArgumentParser(
        prog="python -m llmc.eval",
        description="HellaSwag accuracy (completion-style: acc = lowest summed loss of the "
                    "ending, acc_norm = lowest mean loss) of any GPT-2 model: an llmc checkpoint, "
                    "a Hugging Face GPT-2 directory or model id, or an llm.c .bin file.")
    ap.add_argument("--model", required=True, help="model path or Hugging Face model id")
    ap.add_argument("--hellaswag", required=True,
                    help="eval file from python -m data_tools.hellaswag")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="compute dtype on cuda (the CPU is fp32)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows (endings) per forward pass")
    args = ap.parse_args(argv)
    try:
        from llmc.formats import load_model
        from llmc.train import pick_device
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = pick_device(args.device)
        examples = load_examples(args.hellaswag)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be a positive number of examples, got {args.limit}")
        model_file = load_model(args.model)
        mc = model_file.config
        n = len(examples) if args.limit is None else min(args.limit, len(examples))
        T = max(len(r) for r, _ in _rows(examples[:n], mc.block_size))
        t0 = time.perf_counter()
        model = _eval_model(model_file, device, args.dtype if device == "cuda" else "fp32",
                            min(args.batch_size, 4 * n), T)
        result = hellaswag_eval(model, args.hellaswag, limit=args.limit)
        seconds = time.perf_counter() - t0
    except (ValueError, OSError) as e:
        if os.environ.get("LLMC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"hellaswag {args.hellaswag}: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
          f"({result['n']} examples, {model_file.format} model {args.model} on {device}, "
          f"{seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
