"""Synthetic GPT-2 token shards: as many tokens as a benchmark needs, in seconds, no download.

    python -m data_tools.synthetic --tokens 110M --out data/synthetic [--val-tokens 5M]
        [--shard-size 100M] [--seed 0] [--name synthetic]

For runs that must not repeat a token (issue #15: 200 steps of 524,288 tokens is 105M tokens)
on a machine that cannot reach FineWeb. The ids are not text but are not uniform noise either,
so the loss falls as it does on text at first:
- unigram: Zipf-like, p(k-th most frequent) ~ 1 / (k + 2.7), over the 50,257 ids in a
  seed-drawn order (frequent ids spread over the vocabulary), drawn through a 2^22-entry
  inverse-CDF table (vectorized; ids rarer than 1 in 4M are approximated);
- pairs: with probability 1/2 the token at an odd position is a fixed seed-drawn function of
  the one before it (something a model can learn beyond the unigram; pairs start at each shard's first
  token, so rows of an even length T keep the parity);
- documents: `<|endoftext|>` (50256) starts a document every ~1,000 tokens (geometric lengths).
NumPy draws 25M tokens in about 0.4 s on one core; shards are written as they are drawn, so
memory stays at one shard.

Output in --out, named as data_tools.fineweb names its shards: `<name>_val_000000.arrow` (the
first --val-tokens), `<name>_train_000001.arrow`, ... (--shard-size tokens each, the last one
shorter), and `<name>_summary.json` (tokens per shard, seed, the distribution). Point the trainer
at them with `--train-data 'DIR/<name>_train_*.arrow' --val-data 'DIR/<name>_val_*.arrow'`.
The same flags give the same bytes. Errors: one line, exit 2 (1 for disk errors).

Run the tests:  python -m pytest tests/test_synthetic.py -q
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llmc.data.shards import ShardError, write_shard
from llmc.data.tokenizer import EOT

VOCAB = 50257
TABLE_BITS = 22
DOC_TOKENS = 1000  # mean document length
CHUNK = 1 << 24    # tokens drawn at a time inside a shard


def parse_count(text: str) -> int:
    """'110M' -> 110_000_000; also K, G/B and plain integers ('5e6' too)."""
    s = str(text).strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(s[-1:], 1)
    if scale != 1:
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a token count; write e.g. 110M, 5000000 or 2.5G") from None
    if not np.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"{text!r} must be a positive whole number of tokens")
    return int(value)


class Generator:
    """Draws token ids: the Zipf-like unigram, the learnable pairs, document starts."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 0])
        rank = np.arange(1, VOCAB, dtype=np.float64)  # ids 0..V-2 by frequency; EOT marks documents
        cdf = np.cumsum(1.0 / (rank + 2.7))
        cdf /= cdf[-1]
        order = rng.permutation(VOCAB - 1).astype(np.uint16)  # frequency rank -> id
        k = 1 << TABLE_BITS
        self.table = order[np.searchsorted(cdf, (np.arange(k) + 0.5) / k)]  # (2^22,) uint16
        self.follow = rng.permutation(VOCAB - 1).astype(np.uint16)  # the pair function
        self.rng = np.random.default_rng([seed, 1])

    def draw(self, n: int) -> np.ndarray:
        """(n,) uint16 ids; pairs start at the first id (every call, so every shard)."""
        rng = self.rng
        ids = self.table[rng.integers(0, len(self.table), n, dtype=np.uint32)]
        pairs = ids[: n - n % 2].reshape(-1, 2)
        tied = rng.random(len(pairs)) < 0.5
        pairs[tied, 1] = self.follow[pairs[tied, 0]]
        starts = np.cumsum(rng.geometric(1.0 / DOC_TOKENS, size=n // DOC_TOKENS * 2 + 16)) - 1
        ids[starts[starts < n]] = EOT
        return ids


def _write(gen: Generator, path: Path, n: int, split: str) -> Path:
    buf = np.empty(n, dtype=np.uint16)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        buf[lo:hi] = gen.draw(hi - lo)
    return write_shard(path, buf, split=split)


def write_synthetic(out_dir, tokens: int, val_tokens: int, shard_size: int = 100_000_000,
                    seed: int = 0, name: str = "synthetic") -> dict:
    """Write val + train shards totalling `tokens` ids into out_dir; -> the summary dict."""
    if not 0 < val_tokens < tokens:
        raise ValueError(f"--val-tokens {val_tokens:,} must be above 0 and below --tokens "
                         f"{tokens:,}; the rest is the training split")
    if shard_size < 2:
        raise ValueError(f"--shard-size {shard_size} must be at least 2 tokens")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    gen = Generator(seed)
    shards = [{"file": _write(gen, out / f"{name}_val_000000.arrow", val_tokens, "val").name,
               "split": "val", "tokens": val_tokens}]
    left, index = tokens - val_tokens, 1
    while left > 0:
        n = min(shard_size, left)
        path = _write(gen, out / f"{name}_train_{index:06d}.arrow", n, "train")
        shards.append({"file": path.name, "split": "train", "tokens": n})
        left, index = left - n, index + 1
    summary = {"tokens": tokens, "val_tokens": val_tokens, "train_tokens": tokens - val_tokens,
               "seed": seed, "shard_size": shard_size, "shards": shards,
               "distribution": "Zipf-like 1/(k+2.7) unigram, odd positions tied to the previous "
                               "id with p=1/2, <|endoftext|> every ~1000 tokens"}
    (out / f"{name}_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.synthetic",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", required=True, help="tokens in all, val included (e.g. 110M)")
    p.add_argument("--val-tokens", default="5M", help="tokens of the validation shard (default 5M)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shard-size", default="100M", help="tokens per train shard (default 100M)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes")
    p.add_argument("--name", default="synthetic", help="shard name prefix (default synthetic)")
    args = p.parse_args(argv)
    try:
        tokens, val, size = (parse_count(args.tokens), parse_count(args.val_tokens),
                             parse_count(args.shard_size))
    except ValueError as e:
        p.error(str(e))
    if not args.name or "/" in args.name:
        p.error(f"--name {args.name!r}: must be a plain file name prefix")
    try:
        summary = write_synthetic(args.out, tokens, val, size, args.seed, args.name)
    except (ValueError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}; check that --out is writable and has "
              f"{2 * tokens / 1e9:.2f} GB free", file=sys.stderr)
        return 1
    print(f"wrote {len(summary['shards'])} shards to {args.out}: {val:,} val + "
          f"{tokens - val:,} train tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
