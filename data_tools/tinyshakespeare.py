"""Tiny-shakespeare (bundled with llmc) or any text file -> a val and a train token shard.

    python -m data_tools.tinyshakespeare --out data/tinyshakespeare
    python -m data_tools.tinyshakespeare --out data/mytext --source book.txt [--val-tokens 32768]

Tokenization is llmc.data.datasets' (llm.c's dev/data/tinyshakespeare.py): the text is split on blank
lines, each section gets <|endoftext|> in front, and the first --val-tokens tokens (32,768 as in
llm.c) are the validation split, the rest training. Output: `<name>_val.arrow` and
`<name>_train.arrow` in --out (atomic writes), `<name>` being tinyshakespeare or the source
file's stem. The bundled text gives 32,768 val + 305,260 train tokens, the same ids that
`python -m llmc.train` uses by default.
"""
from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

from llmc import assets
from llmc.data.datasets import ASSET, VAL_TOKENS, tokenize_sections
from llmc.data.shards import ShardError, write_shard


class TextError(ValueError):
    """A source text that cannot be split; the message is '<where>: <problem>; <fix>'."""


def read_text(source) -> tuple:
    """(name, text) of the bundled tiny-shakespeare (source None) or a UTF-8 text file."""
    if source is None:
        raw = assets.path(ASSET).read_bytes()
        return "tinyshakespeare", gzip.decompress(raw).decode("utf-8")
    path = Path(source).expanduser()
    if not path.is_file():
        raise TextError(f"{path}: no such file; pass --source with a UTF-8 text file")
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data, path = gzip.decompress(data), path.with_suffix("")
        return path.stem, data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); "
                        "convert the file to UTF-8") from None
    except (OSError, EOFError) as e:
        raise TextError(f"{path}: cannot be read ({e}); check the file") from None


def write_text_shards(text: str, out_dir, name: str, val_tokens: int = VAL_TOKENS) -> tuple:
    """Tokenize text and write (train_path, val_path) = out_dir/<name>_{train,val}.arrow."""
    ids = tokenize_sections(text)
    if ids.shape[0] <= val_tokens:
        raise TextError(f"{name}: the text gives {ids.shape[0]} tokens, not more than the "
                        f"{val_tokens} validation tokens; use a longer text or a smaller "
                        "--val-tokens")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    val = write_shard(out_dir / f"{name}_val.arrow", ids[:val_tokens], split="val")
    train = write_shard(out_dir / f"{name}_train.arrow", ids[val_tokens:], split="train")
    return train, val


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.tinyshakespeare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/tinyshakespeare",
                   help="output directory (default data/tinyshakespeare)")
    p.add_argument("--source", default=None,
                   help="a UTF-8 text file (or .gz) to use instead of the bundled text")
    p.add_argument("--val-tokens", type=int, default=VAL_TOKENS,
                   help=f"tokens in the validation shard (default {VAL_TOKENS})")
    args = p.parse_args(argv)
    if args.val_tokens < 1:
        p.error(f"--val-tokens {args.val_tokens}: must be at least 1")
    try:
        name, text = read_text(args.source)
        train, val = write_text_shards(text, args.out, name, args.val_tokens)
    except (TextError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}; check that --out is writable", file=sys.stderr)
        return 1
    print(f"wrote {val} ({args.val_tokens:,} tokens) and {train}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
