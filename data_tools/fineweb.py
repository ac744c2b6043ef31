"""FineWeb / FineWeb-Edu -> GPT-2 token shards for llmc.train.

    python -m data_tools.fineweb --dataset fineweb --sample 10BT --out data/fineweb10B
    python -m data_tools.fineweb --source 'my_corpus/*.parquet' --out data/mine --shard-size 10000000

Without --source the sample's parquet files (`sample/<N>BT/*.parquet` of HuggingFaceFW/fineweb or
HuggingFaceFW/fineweb-edu) are downloaded with huggingface_hub as the tokenizer reaches them
(`pip install 'llmc[data]'`; partial downloads resume). --source reads local parquet (a `text`
column, FineWeb's schema), jsonl (a `text` field per line) or txt files (one document per file)
instead: files, directories or globs, read in sorted order.

Output: `<name>_val_000000.arrow` (the first --shard-size tokens), then `<name>_train_000001.arrow`,
... (llmc.data.shards format), `<name>_progress.json` and, at the end, `<name>_summary.json`. Rerunning
the same command after an interruption resumes: finished shards are kept, the rest is redone
identically (see data_tools/sharder.py). Every core tokenizes (--workers, default all).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from llmc.data.shards import ShardError

from data_tools.sharder import PrepareError, prepare
from data_tools.sources import (HUB_REPOS, SAMPLES, HubSource, LocalSource, SourceError,
                                list_hub_files, resolve_paths)

PREFIXES = {"fineweb": "fineweb", "fineweb-edu": "edu_fineweb"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_tools.fineweb", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=tuple(HUB_REPOS), default="fineweb",
                   help="which FineWeb (default fineweb); also names the shards")
    p.add_argument("--sample", choices=SAMPLES, default="10BT",
                   help="the hub sample to download (default 10BT)")
    p.add_argument("--out", default=None,
                   help="output directory [default data/<name><N>B, e.g. data/fineweb10B; "
                        "required with --source]")
    p.add_argument("--shard-size", type=int, default=100_000_000,
                   help="tokens per shard (default 100000000); the first shard is validation")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: every core)")
    p.add_argument("--source", nargs="+", metavar="PATH_OR_GLOB", default=None,
                   help="local .parquet/.jsonl/.txt files, directories or globs instead of "
                        "the hub")
    p.add_argument("--name", default=None,
                   help="shard name prefix [default fineweb, or edu_fineweb for fineweb-edu]")
    p.add_argument("--download-dir", default=None,
                   help="keep downloaded parquet files here instead of the Hugging Face cache")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size {args.shard_size}: must be a positive number of tokens")
    if args.workers < 1:
        p.error(f"--workers {args.workers}: must be at least 1")
    if args.out is not None and not args.out.strip():
        p.error("--out '': give the output directory, e.g. --out data/fineweb10B")
    if args.source is not None and args.out is None:
        p.error("--source needs --out DIR (where to write the shards)")
    if args.name is not None and (not args.name or "/" in args.name or os.sep in args.name):
        p.error(f"--name {args.name!r}: must be a plain file name prefix such as 'fineweb'")
    return args


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C: the worker pool is shut down


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    prefix = args.name or PREFIXES[args.dataset]
    out = args.out or os.path.join("data", f"{prefix}{args.sample[:-1]}")
    try:
        if args.source is not None:
            source = LocalSource(resolve_paths(args.source))
        else:
            files = list_hub_files(args.dataset, args.sample)
            print(f"{HUB_REPOS[args.dataset]} sample/{args.sample}: {len(files)} parquet files",
                  file=sys.stderr)
            source = HubSource(args.dataset, args.sample, files, download_dir=args.download_dir)
        prepare(source, out, prefix, shard_size=args.shard_size, workers=args.workers)
    except (SourceError, PrepareError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}; check the disk space and permissions of --out, then rerun the same "
              "command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
