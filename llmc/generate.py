"""`python -m llmc.generate`: text from any GPT-2 model, streamed as it is generated.

    python -m llmc.generate --model out/ckpt_00000200 --prompt "ROMEO:" --max-new-tokens 200
    python -m llmc.generate --model gpt2_dir --prompt-file prompts.txt --temperature 0

The model is anything llmc.formats.load_model reads: an llmc checkpoint (or a run's out-dir,
for its newest), a Hugging Face GPT-2 directory or model id, or an llm.c .bin file. Generation
runs with a KV cache (llmc/inference/decoder.py, llmc/inference/gpu_decoder.py): on a GPU the prompts are one
prefill and every new token one replay of a captured CUDA graph, and only token ids reach the
host. One sample streams its text as the tokens come; several (a prompt file, one prompt per
line, and/or --num-samples K per prompt) run as one batch and print when done.

Sampling: --temperature 0 is greedy; otherwise softmax(logits / temperature) over the --top-k
most likely tokens (0: all) and then the smallest set of them holding --top-p of the mass
(1: all). --seed fixes the draw. A sample ends at <|endoftext|> or after --max-new-tokens.

Bad input (a missing model, a prompt longer than the context, --top-p 2, ...) ends with one line
on stderr and exit code 2; LLMC_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import codecs
import os
import sys
import time

from llmc.inference.decoder import GenerationError, check_request, make_decoder


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llmc.generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="model path or Hugging Face model id")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="the prompt text ('' starts from <|endoftext|>)")
    src.add_argument("--prompt-file", help="a UTF-8 file with one prompt per line (a batch)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per sample")
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens; 0: all")
    ap.add_argument("--top-p", type=float, default=1.0, help="keep the top tokens holding this "
                    "much probability mass; 1: all")
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--seed", type=int, default=1337, help="seed of the draw")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="compute dtype on cuda (the CPU is fp32)")
    return ap


def _prompts(args) -> list:
    from llmc.data.tokenizer import EOT, encode
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except UnicodeDecodeError as e:
            raise GenerationError(f"--prompt-file {args.prompt_file}: not UTF-8 text ({e})") from None
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise GenerationError(f"--prompt-file {args.prompt_file}: no prompts (one per line)")
    else:
        lines = [args.prompt]
    texts = [t for t in lines for _ in range(args.num_samples)]
    return texts, [encode(t) if t else [EOT] for t in texts]


def run(args, out=sys.stdout) -> list:
    """Generate as the parsed args say; returns the generated texts (prompt excluded)."""
    from llmc.formats import load_model
    from llmc.data.tokenizer import get_encoding
    from llmc.train import pick_device
    if args.num_samples < 1:
        raise GenerationError(f"--num-samples must be >= 1, got {args.num_samples}")
    texts, prompts = _prompts(args)
    device = pick_device(args.device)
    model_file = load_model(args.model)
    check_request(model_file.config, prompts, args.max_new_tokens, len(prompts),
                  model_file.config.block_size, args.temperature, args.top_k, args.top_p)
    decoder = make_decoder(model_file.config, model_file.params, device=device,
                           max_batch=len(prompts), dtype=args.dtype)
    enc = get_encoding()
    single = len(prompts) == 1
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if single:
        out.write(texts[0])
        out.flush()
    t0 = time.perf_counter()
    update = None
    for update in decoder.generate(prompts, args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                   stream_every=4 if single else 0):
        if single:
            out.write(utf8.decode(enc.decode_bytes(_visible(update.new[0]))))
            out.flush()
    seconds = time.perf_counter() - t0
    results = [enc.decode(_visible(tokens[len(p):])) for tokens, p in zip(update.tokens, prompts)]
    if single:
        out.write(utf8.decode(b"", final=True) + "\n")
    else:
        for i, (text, result) in enumerate(zip(texts, results)):
            out.write(f"--- sample {i + 1} / {len(results)} ---\n{text}{result}\n")
    made = sum(len(tokens) - len(p) for tokens, p in zip(update.tokens, prompts))
    print(f"[{made} tokens in {seconds:.2f} s: {made / seconds:,.0f} tokens/s on {device}]",
          file=sys.stderr)
    return results


def _visible(ids: list) -> list:
    """Ids without <|endoftext|> (the tokenizer would spell it out)."""
    from llmc.data.tokenizer import EOT
    return [t for t in ids if t != EOT]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # GenerationError, ModelFileError, ConfigError, ...
        if os.environ.get("LLMC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
