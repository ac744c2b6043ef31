"""Text generation speed: llmc's KV-cache decoder against `transformers` generate, one process.

    python bench/generation.py [--model d12] [--batches 1,64] [--new-tokens 128,1023]
        [--peer-new-tokens 128,1023] [--no-peer] [--profile] [--json OUT]

Both sides generate from the same random GPT-2 weights (llmc's init, exported to a
transformers GPT2LMHeadModel through llmc.formats), bf16 on the GPU, sampling with temperature
1 and top-k 50, every row the full number of new tokens (no stop at <|endoftext|>), from a
one-token prompt (<|endoftext|>): d12's context is 1024 tokens, so 1 + 1023 is its longest run.
tokens/s = B * new tokens / wall time from the call to the last token on the host (prefill,
every decode step and llmc's copy of the ids; transformers' returned tensor synchronized).
A warm-up run of each configuration first (kernel compiles, cuBLASLt plans, graph capture for
llmc; CUDA/cuBLAS initialisation for torch). transformers runs its default dynamic KV cache
through `generate` (do_sample=True, top_k=50), in torch_dtype bfloat16.

--profile: per batch size, the GPU time of one decode step replayed from its CUDA graph and of
each of its launches (each op captured 20 times into a graph of its own), at a context of ~100
tokens.

The floor at batch 1: reading the bf16 weights once per token (d12: 249 MB; ~19,000 tokens/s
at 4.8 TB/s). Run on the GPU machine; prints a table and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EOT = 50256
SETTINGS = dict(temperature=1.0, top_k=50, top_p=1.0)


def llmc_rate(decoder, B: int, new: int, seed: int = 0) -> dict:
    prompts = [[EOT]] * B
    decoder.generate_all(prompts, min(new, 8), seed=seed, stop_at_eot=False, **SETTINGS)  # warm-up
    decoder.generate_all(prompts, new, seed=seed, stop_at_eot=False, **SETTINGS)  # graph for B
    t0 = time.perf_counter()
    out = decoder.generate_all(prompts, new, seed=seed + 1, stop_at_eot=False, **SETTINGS)
    seconds = time.perf_counter() - t0
    assert all(len(row) == 1 + new for row in out)
    return {"seconds": seconds, "tokens_per_s": B * new / seconds}


def profile_decode(decoder, B: int, reps: int = 20) -> dict:
    """GPU microseconds of each launch of one decode step at batch B (context ~100 tokens):
    {graph_step_us, per_launch_us: {op: us}, launches: {op: count per step}}.

    Each op is captured `reps` times in a row into its own CUDA graph and timed over 5 replays,
    so launch gaps inside a graph count as they do in the real step's graph."""
    import cupy
    from llmc.ops import decode, layernorm, matmul, sampling
    settings = dict(SETTINGS, seed=0)
    mc, L, r, p = decoder.mc, decoder.mc.n_layer, decoder._rows, decoder._p
    w = decoder._pl[0]
    decoder.generate_all([[EOT] * 100] * B, 4, stop_at_eot=False, **SETTINGS)  # graph for B
    decoder._prefill([[EOT] * 100] * B, settings)
    stream = decoder.stream
    x, res2, ln, mean, rstd = r.x[:B], r.res2[:B], r.ln[:B], r.mean[:B], r.rstd[:B]
    qkv, atty, btc, fchg = r.qkv[:B], r.atty[:B], r.btc[:B], r.fchg[:B]
    ids, pos = decoder.ids[:B], decoder.pos[:B]
    ops = {  # op -> (launch, launches per step)
        "embed": (lambda: decode.decode_embed(x, ids, pos, p["wte"], p["wpe"]), 1),
        "layernorm": (lambda: layernorm.fused_residual_layernorm_forward(
            res2, ln, mean, rstd, x, btc, w["ln2w"], w["ln2b"]), 2 * L + 1),
        "matmul qkv": (lambda: matmul.matmul_forward(qkv, ln, w["qkvw"], w["qkvb"]), L),
        "attention": (lambda: decode.decode_attention(
            atty, qkv, decoder.k[0, :B], decoder.v[0, :B], pos, decoder._scratch_for(B),
            decoder._chunk(B)), L),
        "matmul attproj": (lambda: matmul.matmul_forward(btc, atty, w["attprojw"], w["attprojb"]), L),
        "matmul fc+gelu": (lambda: matmul.matmul_forward(fchg, ln, w["fcw"], w["fcb"], gelu=True), L),
        "matmul fcproj": (lambda: matmul.matmul_forward(btc, fchg, w["fcprojw"], w["fcprojb"]), L),
        "matmul head": (lambda: matmul.matmul_forward(decoder._logits[:B], ln, p["wte"], None), 1),
        "matvec ln+qkv": (lambda: matmul.matvec_layernorm_forward(
            qkv, x, res2, btc, w["ln1w"], w["ln1b"], w["qkvw"], w["qkvb"]), L),
        "matvec attproj": (lambda: matmul.matvec_forward(btc, atty, w["attprojw"], w["attprojb"]), L),
        "matvec ln+fc+gelu": (lambda: matmul.matvec_layernorm_forward(
            fchg, res2, x, btc, w["ln2w"], w["ln2b"], w["fcw"], w["fcb"], gelu=True), L),
        "matvec fcproj": (lambda: matmul.matvec_forward(btc, fchg, w["fcprojw"], w["fcprojb"]), L),
        "sample": (lambda: sampling.sample_tokens(ids, pos, decoder._logits[:B],
                                                  mc.vocab_size, **settings), 1),
    }

    def graph_us(fn, n):
        with stream:
            fn()  # eager first: plans
            stream.begin_capture()
            try:
                for _ in range(n):
                    fn()
            finally:
                g = stream.end_capture()
            g.launch(stream)
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            for _ in range(5):
                g.launch(stream)
            end.record(stream)
            end.synchronize()
        return 1000 * cupy.cuda.get_elapsed_time(start, end) / (5 * n)

    if B > matmul.MATVEC_MAX_ROWS:  # cuBLASLt products, LayerNorm launches of their own
        ops = {k: v for k, v in ops.items() if not k.startswith("matvec")}
    else:  # our few-row products with the LayerNorm fused in; one LayerNorm (lnf) left
        ops = {k: v for k, v in ops.items() if not k.startswith("matmul ") or k == "matmul head"}
        ops["layernorm"] = (ops["layernorm"][0], 1)
    per = {}
    for name, (fn, _) in ops.items():
        if name == "sample":
            decoder._prefill([[EOT] * 100] * B, settings)  # room for 6 x reps more positions
        per[name] = graph_us(fn, reps)
    decoder._prefill([[EOT] * 100] * B, settings)
    step = graph_us(lambda: decoder._decode_step(B, settings), 1)
    return {"graph_step_us": step, "per_launch_us": per,
            "launches": {name: n for name, (_, n) in ops.items()}}


def peer_rate(model, B: int, new: int) -> dict:
    import torch
    ids = torch.full((B, 1), EOT, dtype=torch.long, device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=50, temperature=1.0,
              pad_token_id=EOT)
    with torch.no_grad():
        model.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    assert out.shape == (B, 1 + new)
    return {"seconds": seconds, "tokens_per_s": B * new / seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--new-tokens", default="128,1023")
    ap.add_argument("--peer-new-tokens", default="128,1023",
                    help="the new-token counts transformers also runs (it is slow)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-family time of one decode step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import cupy
    from llmc.config import model_config
    from llmc.inference.gpu_decoder import GPUDecoder
    from llmc.model.params import init_params
    from llmc.training.trainer import device_name

    mc = model_config(args.model)
    params = init_params(mc, 1337)
    batches = [int(b) for b in args.batches.split(",")]
    news = [int(n) for n in args.new_tokens.split(",")]
    peer_news = set() if args.no_peer else {int(n) for n in args.peer_new_tokens.split(",")}
    rows = []
    decoder = GPUDecoder(mc, params, max_batch=max(batches), dtype="bf16")
    for B in batches:
        for new in news:
            r = llmc_rate(decoder, B, new)
            rows.append(dict(system="llmc", B=B, new_tokens=new, **r))
            print(f"llmc         B={B:3d} new={new:5d}: {r['tokens_per_s']:10,.0f} tokens/s "
                  f"({r['seconds']:.3f} s)", flush=True)
    profiles = {}
    if args.profile:
        for B in batches:
            p = profiles[B] = profile_decode(decoder, B)
            parts = ", ".join(f"{k} {v:.1f} us x{p['launches'][k]}"
                              for k, v in p["per_launch_us"].items())
            total = sum(v * p["launches"][k] for k, v in p["per_launch_us"].items())
            print(f"profile B={B}: graph step {p['graph_step_us']:.0f} us (sum of launches "
                  f"{total:.0f} us): {parts}", flush=True)
    del decoder
    cupy.get_default_memory_pool().free_all_blocks()
    if peer_news:
        import tempfile
        import torch
        import transformers
        from llmc.formats import save_model
        with tempfile.TemporaryDirectory() as tmp:
            save_model((mc, params), Path(tmp) / "hf", format="hf", dtype="fp32")
            model = transformers.GPT2LMHeadModel.from_pretrained(
                Path(tmp) / "hf", torch_dtype=torch.bfloat16).cuda().eval()
        for B in batches:
            for new in news:
                if new not in peer_news:
                    continue
                r = peer_rate(model, B, new)
                rows.append(dict(system="transformers", B=B, new_tokens=new, **r))
                print(f"transformers B={B:3d} new={new:5d}: {r['tokens_per_s']:10,.0f} tokens/s "
                      f"({r['seconds']:.3f} s)", flush=True)
    print(f"\n{device_name()}, {args.model} bf16, sampling T=1 top-k 50, one-token prompt")
    print("| B | new tokens | llmc tokens/s | transformers tokens/s | llmc / transformers |")
    print("| --- | --- | --- | --- | --- |")
    for B in batches:
        for new in news:
            ours = next(r for r in rows if r["system"] == "llmc" and r["B"] == B
                        and r["new_tokens"] == new)
            peer = next((r for r in rows if r["system"] == "transformers" and r["B"] == B
                         and r["new_tokens"] == new), None)
            ratio = f"{ours['tokens_per_s'] / peer['tokens_per_s']:.1f}x" if peer else "-"
            ptxt = f"{peer['tokens_per_s']:,.0f}" if peer else "-"
            print(f"| {B} | {new} | {ours['tokens_per_s']:,.0f} | {ptxt} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device_name(), model=args.model,
                                                   rows=rows, profile=profiles), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
