"""End to end: llmc (GPUModel + GPUAdamW, bf16) against the project's PyTorch GPT-2, one process.

    python bench/e2e.py --model d12 --batch-size 64 --seq-len 1024 --steps 20 [--grad-accum 1]
        [--recompute 1] [--classifier-chunks 1,4] [--attention auto] [--no-graphs] [--compare-eager]
        [--fp8 [--fp8-wgrad 1] [--fp8-fast-accum 1]]
        [--no-torch] [--torch-batch-size 16,64] [--torch-compile | --no-torch-compile]
        [--profile] [--json OUT]
    python bench/e2e.py --batch-size 16,24,32,64 --recompute 0,1 --torch-batch-size 16,64
        every (B, recompute) pair of llmc, and the peer at the given B, in one process

--batch-size, --recompute and --classifier-chunks take comma lists: llmc runs every (B,
recompute, chunks), the PyTorch peer every B of --torch-batch-size (default: those of
--batch-size). --graphs (default) replays
each llmc micro-step as a CUDA graph; --compare-eager also runs each pair with eager launches,
and the difference of the two step times is the GPU's idle time between launches that the
graph removed (the "gap").

Both sides train the same model (random init), batch, sequence length and number of steps on
random tokens; warm-up steps (NVRTC compiles, torch.compile, cuBLAS heuristics) are excluded.
A step is what the trainer does: zero_grad, grad_accum micro-steps, clip + AdamW, then one sync
to read the loss. tokens/s = timed tokens / wall time of the timed steps; MFU as llm.c counts
it (FLOPs/token = 6N + 6·L·C·T, N with the padded vocabulary) against 989 TFLOP/s bf16.

- llmc runs first; its memory is the device memory it took (cudaMemGetInfo before building the
  model vs after the timed steps: pool, cuBLAS workspace, modules; CuPy's pool never hands
  memory back, so that is the most it held, and reading it per step would idle the GPU ~70 us a
  step), and CuPy's pool bytes (`total_bytes`). Then everything of llmc is freed.
- --fp8: llmc runs twice in the same process, bf16 then with the fp8 products
  (llmc/model/fp8.py), and the report gives fp8/bf16 tokens/s and memory.
- PyTorch: tests/torch_gpt2.py (SDPA, flash backend only by default), torch.compile, bf16
  autocast, fp32 weights (the master), fused AdamW with llmc's decay groups, clip_grad_norm_;
  memory = torch.cuda.max_memory_allocated (reserved also printed).
- --card (default): nvidia-smi samples the SM clock and power every 200 ms (bench/power.py);
  each run reports their means over its timed steps and the share of samples at the power
  limit, the regime its tokens/s was measured in (the H200 meets its 700 W limit training d12).
- --profile: one extra llmc step with CUDA events around every op call, summed per family
  (encoder, layernorm, matmul, attention, gelu, classifier, adamw; other = the step's GPU time
  outside them: memsets, the loss mean, gaps). The events add host time per launch, so the
  profiled step is slower than the timed ones; the fractions are what it is for.

The lead's GPU suite runs: bash bench/gpu_suite.sh e2e
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_BF16 = 989e12  # H100 SXM dense bf16, llm.c's MFU reference
CARD = {"sampler": None}  # bench.power.PowerSampler while main() runs with --card
FAMILIES = {  # family -> (module under llmc.ops, launchers wrapped by --profile)
    "encoder": ("encoder", ("encoder_forward", "encoder_backward")),
    "layernorm": ("layernorm", ("layernorm_forward", "fused_residual_layernorm_forward",
                                "residual_forward", "layernorm_backward")),
    "matmul": ("matmul", ("matmul_forward", "matmul_backward")),
    "attention": ("attention", ("attention_forward", "attention_backward")),
    "gelu": ("gelu", ("gelu_forward", "gelu_backward")),
    "classifier": ("classifier", ("fused_classifier",)),
    "adamw": ("adamw", ("global_norm_squared", "adamw_update")),
    "fp8_matmul": ("fp8", ("fp8_matmul",)),
    "fp8_cast": ("fp8", ("cast_transpose", "gelu_cast_transpose", "scale_update")),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python bench/e2e.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch-size", type=int_list, default=[64], help="comma list, e.g. 16,64")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--recompute", type=int_list, default=[0], help="comma list of 0/1")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="llmc: replay each micro-step as a CUDA graph")
    ap.add_argument("--gelu-epilogue", action="store_true",
                    help="llmc, recompute 0: the fc product writes the GELU too (GELU_AUX_BIAS)")
    ap.add_argument("--compare-eager", action="store_true",
                    help="llmc: also run each configuration with eager launches (the gap)")
    ap.add_argument("--classifier-chunks", type=int_list, default=[1],
                    help="llmc: run the LM head over this many chunks of rows (less memory); "
                         "comma list")
    ap.add_argument("--attention", default="auto", choices=("auto", "flash", "matmul"))
    ap.add_argument("--torch", dest="torch", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the PyTorch peer (--no-torch: llmc only)")
    ap.add_argument("--torch-batch-size", type=int_list, default=None,
                    help="B values of the peer (default: those of --batch-size)")
    ap.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--torch-sdpa", default="flash", choices=("flash", "cudnn", "default"),
                    help="SDPA backend of the PyTorch peer")
    ap.add_argument("--fp8", action="store_true",
                    help="also run llmc with the fp8 products (after the bf16 run) and compare")
    ap.add_argument("--fp8-wgrad", type=int, default=1, choices=(0, 1),
                    help="with --fp8: weight-gradient products in fp8 (1) or bf16 (0)")
    ap.add_argument("--fp8-fast-accum", type=int, default=1, choices=(0, 1),
                    help="with --fp8: cuBLASLt fast accumulation in the forward products")
    ap.add_argument("--profile", action="store_true", help="per-family time of one llmc step")
    ap.add_argument("--card", action=argparse.BooleanOptionalAction, default=True,
                    help="sample the SM clock and power (nvidia-smi) during each timed run")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    for name in ("seq_len", "steps", "grad_accum"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.torch_batch_size is None:
        args.torch_batch_size = list(args.batch_size)
    for name in ("batch_size", "torch_batch_size", "classifier_chunks"):
        if min(getattr(args, name)) < 1:
            ap.error(f"--{name.replace('_', '-')} values must be >= 1")
    if not set(args.recompute) <= {0, 1}:
        ap.error("--recompute values must be 0 or 1")
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step compiles)")
    return args


def int_list(text: str) -> list:
    """'16,24,64' -> [16, 24, 64] (argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def flops_per_token(mc, T: int) -> float:
    from llmc.model.params import num_params
    return 6.0 * num_params(mc) + 6.0 * mc.n_layer * mc.n_embd * T


def random_batches(mc, B, T, n, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, mc.vocab_size, (B, T)).astype(np.int32),
             rng.integers(0, mc.vocab_size, (B, T)).astype(np.int32)) for _ in range(n)]


def timed_run(name, runner, args, mc, setup: str, B: int) -> dict:
    """args.warmup untimed steps, then args.steps timed ones; the summary of the timed ones."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        runner.step()
    print(f"{name.split()[0]}: warm-up {args.warmup} steps {time.perf_counter() - t0:.1f}s "
          f"({setup})", flush=True)
    losses = []
    m0, t0 = time.monotonic(), time.perf_counter()
    for _ in range(args.steps):
        losses.append(runner.step())
    seconds = time.perf_counter() - t0
    m1 = time.monotonic()
    tokens = args.steps * args.grad_accum * B * args.seq_len
    out = summarize(name, tokens, seconds, mc, args.seq_len, losses, runner.memory())
    out["ms_per_step"] = 1e3 * seconds / args.steps
    out["card"] = None if CARD["sampler"] is None else CARD["sampler"].window(m0, m1)
    return out


def summarize(name, tokens, seconds, mc, T, losses, memory):
    tps = tokens / seconds
    return {"name": name, "tokens_per_s": tps, "ms_per_step": None,
            "mfu": tps * flops_per_token(mc, T) / PEAK_BF16, "first_loss": losses[0],
            "last_loss": losses[-1], **memory}


# ---------------------------------------------------------------------------------------------
# llmc

class LlmcRunner:
    """GPUModel + GPUAdamW (bf16) with device batches made up front; `step()` is one optimizer step."""

    def __init__(self, mc, B, T, grad_accum=1, recompute=0, attention="auto", seed=1337,
                 classifier_chunks=1, graphs=True, gelu_epilogue=False, fp8=False, fp8_wgrad=True,
                 fp8_fast_accum=True):
        import cupy
        from llmc.model.gpu_model import GPUModel
        from llmc.training.gpu_optim import GPUAdamW
        from llmc.model.params import init_params
        self.cupy = cupy
        cupy.cuda.Device().synchronize()
        self.free_before = cupy.cuda.runtime.memGetInfo()[0]
        self.min_free = self.free_before
        self.model = GPUModel(mc, B, T, dtype="bf16", recompute=recompute, attention=attention,
                              classifier_chunks=classifier_chunks, graphs=graphs,
                              gelu_epilogue=gelu_epilogue, fp8=fp8, fp8_wgrad=fp8_wgrad,
                              fp8_fast_accum=fp8_fast_accum)
        self.model.load_params(init_params(mc, seed))
        self.opt = GPUAdamW(self.model, weight_decay=0.1, grad_clip=1.0, seed=seed)
        self.accum = grad_accum
        self.data = [(cupy.asarray(x), cupy.asarray(y))
                     for x, y in random_batches(mc, B, T, 2 * grad_accum, seed)]
        self.loss = cupy.zeros((), dtype=cupy.float32)
        self.steps = 0

    def step(self, lr=6e-4) -> float:
        """One optimizer step; returns the mean loss (the one sync)."""
        cp = self.cupy
        self.model.zero_grad()
        self.loss.fill(0)
        for micro in range(self.accum):
            x, y = self.data[(self.steps * self.accum + micro) % len(self.data)]
            cp.add(self.loss, self.model.forward_backward(x, y, 1.0 / self.accum), out=self.loss)
        self.opt.step(lr, self.steps)
        self.steps += 1
        return float(self.loss) / self.accum

    def memory(self) -> dict:
        """Device memory the run took (read after the timed steps: cudaMemGetInfo costs ~70 us
        of idle GPU if read per step, and CuPy's pool never hands memory back, so the device's
        usage only grows)."""
        self.min_free = min(self.min_free, self.cupy.cuda.runtime.memGetInfo()[0])
        pool = self.cupy.get_default_memory_pool()
        fp8 = self.model.fp8
        return {"mem_device_bytes": int(self.free_before - self.min_free),
                "mem_pool_bytes": int(pool.total_bytes()),
                "mem_activations_bytes": int(self.model.acts.nbytes()),
                "mem_fp8_bytes": 0 if fp8 is None else fp8.nbytes()}

    def close(self):
        del self.model, self.opt, self.data
        gc.collect()
        self.cupy.get_default_memory_pool().free_all_blocks()


def run_llmc(args, mc, B, recompute, graphs, fp8=False, chunks=1):
    r = LlmcRunner(mc, B, args.seq_len, args.grad_accum, recompute, args.attention, args.seed,
                   chunks, graphs=graphs and not args.profile,
                   gelu_epilogue=args.gelu_epilogue and not recompute, fp8=fp8,
                   fp8_wgrad=bool(args.fp8_wgrad), fp8_fast_accum=bool(args.fp8_fast_accum))
    name = (f"llmc B={B}" + (" rc" if recompute else "") + (f" c{chunks}" if chunks > 1 else "")
            + (" ge" if r.model.gelu_epilogue else "")
            + (" fp8" if fp8 else "") + ("" if r.model.graphs else " eager"))
    setup = (f"attention {r.model.attention}, recompute {recompute}, classifier chunks "
             f"{chunks}, graphs {r.model.graphs}")
    if fp8:
        setup += f", fp8 wgrad {args.fp8_wgrad}, fast accum {args.fp8_fast_accum}"
    out = timed_run(name, r, args, mc, setup, B)
    if r.model.graph_failure:
        print(f"{name}: no CUDA graphs: {r.model.graph_failure}", file=sys.stderr)
    out.update(B=B, recompute=recompute, graphs=r.model.graphs, attention=r.model.attention,
               fp8=fp8, classifier_chunks=chunks)
    if fp8:
        out["fp8_stats"] = r.model.fp8_stats()
        out["fp8_dgelu_fused"] = r.model.fp8.dgelu_fused
    if args.profile:
        out["profile"] = profile_step(r)
    r.close()
    return out


def profile_step(runner) -> dict:
    """Milliseconds per op family for one step (CUDA events around every launcher call)."""
    import importlib
    cp = runner.cupy
    records, saved = [], []
    for family, (modname, names) in FAMILIES.items():
        mod = importlib.import_module(f"llmc.ops.{modname}")
        for name in names:
            orig = getattr(mod, name)

            def timed(*a, _orig=orig, _family=family, **k):
                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                result = _orig(*a, **k)
                end.record()
                records.append((_family, start, end))
                return result
            setattr(mod, name, timed)
            saved.append((mod, name, orig))
    try:
        begin, finish = cp.cuda.Event(), cp.cuda.Event()
        begin.record()
        runner.step()
        finish.record()
        finish.synchronize()
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)
    ms = {family: 0.0 for family in FAMILIES}
    calls = {family: 0 for family in FAMILIES}
    for family, start, end in records:
        ms[family] += cp.cuda.get_elapsed_time(start, end)
        calls[family] += 1
    total = cp.cuda.get_elapsed_time(begin, finish)
    ms["other"] = max(total - sum(ms.values()), 0.0)
    calls["other"] = 0
    return {"total_ms": total, "ms": ms, "calls": calls}


# ---------------------------------------------------------------------------------------------
# PyTorch

class TorchRunner:
    """The PyTorch peer: compiled TorchGPT2, bf16 autocast, fp32 weights, fused AdamW."""

    def __init__(self, args, mc, B):
        import torch
        from tests.torch_gpt2 import TorchGPT2, make_optimizer
        self.torch, self.accum = torch, args.grad_accum
        if args.torch_sdpa != "default":
            torch.backends.cuda.enable_flash_sdp(args.torch_sdpa == "flash")
            torch.backends.cuda.enable_cudnn_sdp(args.torch_sdpa == "cudnn")
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(args.seed)
        torch.cuda.reset_peak_memory_stats()
        self.model = TorchGPT2(mc, attn="sdpa")
        from llmc.model.params import init_params
        from tests.torch_gpt2 import load_flat
        load_flat(self.model, init_params(mc, args.seed))  # the same initial weights as llmc
        self.model = self.model.cuda()
        self.fwd = torch.compile(self.model) if args.torch_compile else self.model
        self.opt = make_optimizer(self.model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                  eps=1e-8, fused=True)
        self.data = [(torch.from_numpy(x).cuda().long(), torch.from_numpy(y).cuda().long())
                     for x, y in random_batches(mc, B, args.seq_len,
                                                2 * args.grad_accum, args.seed)]
        self.steps = 0

    def step(self) -> float:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device="cuda")
        for micro in range(self.accum):
            x, y = self.data[(self.steps * self.accum + micro) % len(self.data)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = self.fwd(x, y)
            (loss / self.accum).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.steps += 1
        return total.item() / self.accum

    def memory(self) -> dict:
        return {"mem_device_bytes": int(self.torch.cuda.max_memory_allocated()),
                "mem_reserved_bytes": int(self.torch.cuda.max_memory_reserved())}

    def close(self):
        del self.model, self.fwd, self.opt, self.data
        gc.collect()
        self.torch.cuda.empty_cache()


def run_torch(args, mc, B):
    r = TorchRunner(args, mc, B)
    out = timed_run(f"torch B={B}" + (" compile" if args.torch_compile else " eager"), r, args,
                    mc, f"compile {args.torch_compile}, sdpa {args.torch_sdpa}", B)
    out["B"] = B
    r.close()
    return out


# ---------------------------------------------------------------------------------------------

def device_name() -> str:
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def report(results: dict) -> str:
    lines = [f"device: {results['device']}  model {results['model']}  T={results['T']} "
             f"grad_accum={results['grad_accum']} steps={results['steps']}",
             f"{'':24s} {'tokens/s':>10s} {'ms/step':>9s} {'MFU':>6s} {'memory GB':>10s} "
             f"{'loss first->last':>18s}"]
    for r in results["llmc"] + results["torch"]:
        lines.append(f"{r['name']:24s} {r['tokens_per_s']:10,.0f} {r['ms_per_step']:9.1f} "
                     f"{100 * r['mfu']:5.1f}% {r['mem_device_bytes'] / 1e9:10.2f} "
                     f"{r['first_loss']:8.4f}->{r['last_loss']:.4f}")
    for q in results["ratios"]:
        lines.append(q["text"])
    cards = [(r["name"], r.get("card")) for r in results["llmc"] + results["torch"]]
    if any(c for _, c in cards):
        from bench.power import describe
        lines.append("SM clock and power during the timed steps (mean; capped: share of samples "
                     "at the power limit):")
        lines.extend(f"  {name:24s} {describe(c) or 'no samples'}" for name, c in cards)
    for r in results["llmc"]:
        if "profile" not in r:
            continue
        p = r["profile"]
        lines.append(f"{r['name']} profile of one step ({p['total_ms']:.1f} ms with events):")
        for family, ms in sorted(p["ms"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {family:11s} {ms:8.2f} ms {100 * ms / p['total_ms']:5.1f}%  "
                         f"{p['calls'][family]:4d} calls")
    return "\n".join(lines)


def ratios(results: dict) -> list:
    """llmc (graphs) against the peer at the same B, and graphs against eager (the gap)."""
    out = []
    torch_at = {r["B"]: r for r in results["torch"]}
    def key(r):
        return r["B"], r["recompute"], r["classifier_chunks"]
    eager = {key(r): r for r in results["llmc"] if not r["graphs"] and not r["fp8"]}
    bf16 = {key(r): r for r in results["llmc"] if r["graphs"] == results["graphs"] and not r["fp8"]}
    for r in results["llmc"]:
        b = bf16.get(key(r))
        if r["fp8"] and b is not None:
            q = r["tokens_per_s"] / b["tokens_per_s"]
            out.append({"llmc": r["name"], "bf16": b["name"], "tokens_per_s": q,
                        "memory": r["mem_device_bytes"] / b["mem_device_bytes"],
                        "text": f"{r['name']} / {b['name']}: tokens/s x{q:.3f}, memory "
                                f"x{r['mem_device_bytes'] / b['mem_device_bytes']:.3f} (fp8 "
                                f"buffers {r['mem_fp8_bytes'] / 1e9:.2f} GB, DGELU fused "
                                f"{r['fp8_dgelu_fused']}, scales {r['fp8_stats']})"})
            continue
        t = torch_at.get(r["B"])
        if t is not None and r["graphs"] == results["graphs"] and not r["fp8"]:
            q = r["tokens_per_s"] / t["tokens_per_s"]
            out.append({"llmc": r["name"], "torch": t["name"], "tokens_per_s": q,
                        "memory": r["mem_device_bytes"] / t["mem_device_bytes"],
                        "text": f"{r['name']} / {t['name']}: tokens/s x{q:.3f}, memory "
                                f"x{r['mem_device_bytes'] / t['mem_device_bytes']:.3f}"})
        e = eager.get(key(r))
        if r["graphs"] and e is not None and not r["fp8"]:
            gap = e["ms_per_step"] - r["ms_per_step"]
            out.append({"llmc": r["name"], "eager": e["name"], "gap_ms": gap,
                        "text": f"{r['name']}: graphs {r['ms_per_step']:.2f} ms/step vs eager "
                                f"{e['ms_per_step']:.2f}: {gap:.2f} ms of idle GPU per step "
                                f"removed (x{e['ms_per_step'] / r['ms_per_step']:.3f})"})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from llmc.config import model_config
    mc = model_config(args.model)
    if args.seq_len > mc.block_size:
        print(f"--seq-len {args.seq_len} exceeds the model's {mc.block_size}", file=sys.stderr)
        return 2
    results = {"device": device_name(), "model": args.model, "T": args.seq_len,
               "grad_accum": args.grad_accum, "steps": args.steps,
               "classifier_chunks": args.classifier_chunks, "graphs": args.graphs,
               "flops_per_token": flops_per_token(mc, args.seq_len), "llmc": [], "torch": []}
    if args.card:
        import cupy
        from bench.power import PowerSampler
        CARD["sampler"] = PowerSampler.start(cupy.cuda.Device().pci_bus_id)
    try:
        return run_all(args, mc, results)
    finally:
        if CARD["sampler"] is not None:
            CARD["sampler"].stop()
            CARD["sampler"] = None


def run_all(args, mc, results) -> int:
    for B in args.batch_size:
        for recompute in args.recompute:
            for chunks in args.classifier_chunks:
                modes = [args.graphs] + ([False] if args.compare_eager and args.graphs else [])
                for graphs in modes:
                    results["llmc"].append(run_llmc(args, mc, B, recompute, graphs, chunks=chunks))
                if args.fp8:
                    results["llmc"].append(run_llmc(args, mc, B, recompute, args.graphs, fp8=True,
                                                    chunks=chunks))
    if args.torch:
        for B in args.torch_batch_size:
            try:
                results["torch"].append(run_torch(args, mc, B))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large B: report, go on
                print(f"torch B={B}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                      file=sys.stderr)
    results["ratios"] = ratios(results)
    for r in results["llmc"] + results["torch"]:
        if not (math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])):
            print(f"{r['name']}: non-finite loss", file=sys.stderr)
            return 1
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
