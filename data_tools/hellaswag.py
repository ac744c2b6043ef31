"""HellaSwag validation set -> a tokenized eval file for `llmc.eval.hellaswag_eval`.

    python -m data_tools.hellaswag --out data/hellaswag                  # downloads (needs internet)
    python -m data_tools.hellaswag --out data/hellaswag --source hellaswag_val.jsonl

Input: HellaSwag's jsonl, one JSON object per line with `ctx` (string), `endings` (a list of 4
strings) and `label` (0..3; other fields are ignored). Without --source the validation file is
downloaded with urllib from the HellaSwag repository into `<out>/hellaswag_val.jsonl` (kept, and
reused by later runs). Tokenization is llm.c's: the context as is, each ending with a leading
space (" " + ending), since the ending continues the context's text.

Output: `<out>/hellaswag_val.npz`, written atomically (format: see llmc/eval.py). A malformed
line is an error that names the line; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from llmc.eval import NUM_ENDINGS, EvalFileError, save_examples
from llmc.data.tokenizer import encode

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
_LINE_FIX = ('each line must be one JSON object with "ctx" (a string), "endings" (4 strings) '
             'and "label" (0..3)')


class HellaSwagError(ValueError):
    """Input that cannot become an eval file; the message is '<where>: <problem>; <fix>'."""


def parse_line(line: str, where: str) -> tuple:
    """One jsonl line -> (ctx, [4 endings], label); `where` is '<path>:<line>' for errors."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise HellaSwagError(f"{where}: not valid JSON ({e.msg}); {_LINE_FIX}") from None
    if not isinstance(obj, dict):
        raise HellaSwagError(f"{where}: a JSON {type(obj).__name__}, not an object; {_LINE_FIX}")
    ctx, endings, label = obj.get("ctx"), obj.get("endings"), obj.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise HellaSwagError(f"{where}: \"ctx\" is missing or not a non-empty string; {_LINE_FIX}")
    if (not isinstance(endings, list) or len(endings) != NUM_ENDINGS
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise HellaSwagError(f"{where}: \"endings\" must be a list of {NUM_ENDINGS} non-empty "
                             f"strings, got {json.dumps(endings)[:80]}; {_LINE_FIX}")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagError(f"{where}: \"label\" must be 0..3, got {json.dumps(label)}; "
                             f"{_LINE_FIX}")
    return ctx, endings, label


def read_jsonl(path) -> list:
    """All examples of a HellaSwag jsonl file as (ctx, endings, label); blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(f"{path}: no such file; pass --source with HellaSwag's "
                             "hellaswag_val.jsonl (or leave --source out to download it)")
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    examples.append(parse_line(line, f"{path}:{lineno}"))
    except UnicodeDecodeError as e:
        raise HellaSwagError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); "
                             "convert the file to UTF-8") from None
    if not examples:
        raise HellaSwagError(f"{path}: no examples (empty file); pass HellaSwag's jsonl")
    return examples


def tokenize_example(ctx: str, endings: list, label: int) -> tuple:
    """(ctx ids, [ids of " " + ending for each ending], label), as llm.c's hellaswag.py."""
    return encode(ctx), [encode(" " + e) for e in endings], label


def download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch url to dest atomically (a temporary file, then rename); return dest."""
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise HellaSwagError(f"{url}: download failed ({e}); check the network, or pass "
                             "--source with a local copy of hellaswag_val.jsonl") from None
    return dest


def build(source: Path, out_dir: Path) -> tuple:
    """Tokenize the jsonl at source into out_dir/hellaswag_val.npz; return (path, n examples)."""
    examples = [tokenize_example(*ex) for ex in read_jsonl(source)]
    return save_examples(out_dir / "hellaswag_val.npz", examples), len(examples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.hellaswag",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/hellaswag",
                   help="output directory (default data/hellaswag)")
    p.add_argument("--source", default=None,
                   help="a local HellaSwag jsonl instead of downloading the validation set")
    p.add_argument("--url", default=URL, help="where to download the validation jsonl from")
    args = p.parse_args(argv)
    out_dir = Path(args.out).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.source is not None:
            source = Path(args.source).expanduser()
        else:
            source = out_dir / "hellaswag_val.jsonl"
            if source.is_file():
                print(f"using the copy downloaded earlier: {source}", file=sys.stderr)
            else:
                print(f"downloading {args.url}", file=sys.stderr)
                download(args.url, source)
        path, n = build(source, out_dir)
    except (HellaSwagError, EvalFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}; check that --out is writable", file=sys.stderr)
        return 1
    print(f"wrote {n} examples to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
