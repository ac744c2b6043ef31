"""`python -m llmc.export`: write a model as a Hugging Face GPT-2 directory or an llm.c .bin file.

    python -m llmc.export out/ckpt_00000200 --format hf --out gpt2-mine          # fp32
    python -m llmc.export out --format llmc-bin --dtype bf16 --out gpt2_bf16.bin   # newest ckpt
    python -m llmc.export openai-community/gpt2 --format llmc-bin --out gpt2_124M.bin

MODEL is anything llmc.formats.load_model reads: an llmc checkpoint directory, a training
--out-dir (its newest complete checkpoint), a Hugging Face directory or model.safetensors, an
llm.c .bin file, or a hub id. The output is written atomically (a temporary name, then a
rename): a failed export leaves nothing behind and never replaces a good export half-way.

Bad input (a missing or damaged file, a model that is not GPT-2) ends with one line on stderr
and exit code 2; LLMC_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from llmc.formats import WRITE_DTYPES, WRITE_FORMATS, load_model, save_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmc.export",
        description="Export a GPT-2 model (llmc checkpoint, Hugging Face or llm.c file) to the "
                    "Hugging Face or llm.c format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", metavar="MODEL",
                        help="checkpoint dir, training out dir, HF dir or .safetensors, llm.c "
                             ".bin, or a hub id (openai-community/gpt2)")
    parser.add_argument("--format", required=True, choices=WRITE_FORMATS,
                        help="hf: a directory with config.json + model.safetensors; "
                             "llmc-bin: llm.c's model file")
    parser.add_argument("--dtype", default="fp32", choices=WRITE_DTYPES,
                        help="weight dtype of the file (bf16: llm.c version 5)")
    parser.add_argument("--out", required=True,
                        help="output directory (hf) or file (llmc-bin); replaced atomically")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # argparse prints usage and exits 2 on bad flags
    try:
        m = load_model(args.model)
        out = save_model(m, args.out, format=args.format, dtype=args.dtype)
    except (ValueError, OSError) as e:  # FormatError, ConfigError, permissions, a full disk
        if os.environ.get("LLMC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    mc = m.config
    print(f"wrote {out} ({args.format}, {args.dtype}) from {m.path} ({m.format}): "
          f"L={mc.n_layer}, NH={mc.n_head}, C={mc.n_embd}, maxT={mc.block_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
