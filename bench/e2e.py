"""End to end: llmc (GPUModel + GPUAdamW, bf16) against the project's PyTorch GPT-2, one process.

    python bench/e2e.py --model d12 --batch-size 64 --seq-len 1024 --steps 20 [--grad-accum 1]
        [--recompute 1] [--classifier-chunks 1] [--attention auto] [--no-torch]
        [--fp8 [--fp8-wgrad 1] [--fp8-fast-accum 1]]
        [--torch-compile | --no-torch-compile]
        [--profile] [--json OUT]

Both sides train the same model (random init), batch, sequence length and number of steps on
random tokens; warm-up steps (NVRTC compiles, torch.compile, cuBLAS heuristics) are excluded.
A step is what the trainer does: zero_grad, grad_accum micro-steps, clip + AdamW, then one sync
to read the loss. tokens/s = timed tokens / wall time of the timed steps; MFU as llm.c counts
it (FLOPs/token = 6N + 6·L·C·T, N with the padded vocabulary) against 989 TFLOP/s bf16.

- llmc runs first; its memory is the device memory it took (cudaMemGetInfo before building the
  model vs the lowest free memory seen: pool, cuBLAS workspace, modules), and CuPy's pool bytes
  (`total_bytes`, which never shrinks unless freed). Then everything of llmc is freed.
- --fp8: llmc runs twice in the same process, bf16 then with the fp8 products
  (llmc/model/fp8.py), and the report gives fp8/bf16 tokens/s and memory.
- PyTorch: tests/torch_gpt2.py (SDPA, flash backend only by default), torch.compile, bf16
  autocast, fp32 weights (the master), fused AdamW with llmc's decay groups, clip_grad_norm_;
  memory = torch.cuda.max_memory_allocated (reserved also printed).
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
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--recompute", type=int, default=0, choices=(0, 1))
    ap.add_argument("--classifier-chunks", type=int, default=1,
                    help="llmc: run the LM head over this many chunks of rows (less memory)")
    ap.add_argument("--attention", default="auto", choices=("auto", "flash", "matmul"))
    ap.add_argument("--torch", dest="torch", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the PyTorch peer (--no-torch: llmc only)")
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
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    for name in ("batch_size", "seq_len", "steps", "grad_accum", "classifier_chunks"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step compiles)")
    return args


def flops_per_token(mc, T: int) -> float:
    from llmc.model.params import num_params
    return 6.0 * num_params(mc) + 6.0 * mc.n_layer * mc.n_embd * T


def random_batches(mc, B, T, n, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, mc.vocab_size, (B, T)).astype(np.int32),
             rng.integers(0, mc.vocab_size, (B, T)).astype(np.int32)) for _ in range(n)]


def timed_run(name, runner, args, mc, setup: str) -> dict:
    """args.warmup untimed steps, then args.steps timed ones; the summary of the timed ones."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        runner.step()
    print(f"{name.split()[0]}: warm-up {args.warmup} steps {time.perf_counter() - t0:.1f}s "
          f"({setup})", flush=True)
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(runner.step())
    seconds = time.perf_counter() - t0
    tokens = args.steps * args.grad_accum * args.batch_size * args.seq_len
    out = summarize(name, tokens, seconds, mc, args.seq_len, losses, runner.memory())
    out["ms_per_step"] = 1e3 * seconds / args.steps
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
                 classifier_chunks=1, fp8=False, fp8_wgrad=True, fp8_fast_accum=True):
        import cupy
        from llmc.model.gpu_model import GPUModel
        from llmc.training.gpu_optim import GPUAdamW
        from llmc.model.params import init_params
        self.cupy = cupy
        cupy.cuda.Device().synchronize()
        self.free_before = cupy.cuda.runtime.memGetInfo()[0]
        self.min_free = self.free_before
        self.model = GPUModel(mc, B, T, dtype="bf16", recompute=recompute, attention=attention,
                              classifier_chunks=classifier_chunks, fp8=fp8, fp8_wgrad=fp8_wgrad,
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
        loss = float(self.loss) / self.accum
        self.min_free = min(self.min_free, cp.cuda.runtime.memGetInfo()[0])
        return loss

    def memory(self) -> dict:
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


def run_llmc(args, mc, fp8=False):
    r = LlmcRunner(mc, args.batch_size, args.seq_len, args.grad_accum, args.recompute,
                   args.attention, args.seed, args.classifier_chunks, fp8=fp8,
                   fp8_wgrad=bool(args.fp8_wgrad), fp8_fast_accum=bool(args.fp8_fast_accum))
    setup = (f"attention {r.model.attention}, recompute {args.recompute}, classifier "
             f"chunks {args.classifier_chunks}")
    if fp8:
        setup += f", fp8 wgrad {args.fp8_wgrad}, fast accum {args.fp8_fast_accum}"
    out = timed_run("llmc fp8" if fp8 else "llmc", r, args, mc, setup)
    out["attention"] = r.model.attention
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

    def __init__(self, args, mc):
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
                     for x, y in random_batches(mc, args.batch_size, args.seq_len,
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


def run_torch(args, mc):
    r = TorchRunner(args, mc)
    out = timed_run("torch" + (" compile" if args.torch_compile else " eager"), r, args, mc,
                    f"compile {args.torch_compile}, sdpa {args.torch_sdpa}")
    r.close()
    return out


# ---------------------------------------------------------------------------------------------

def device_name() -> str:
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def report(results: dict) -> str:
    lines = [f"device: {results['device']}  model {results['model']}  B={results['B']} "
             f"T={results['T']} grad_accum={results['grad_accum']} steps={results['steps']}",
             f"{'':16s} {'tokens/s':>10s} {'ms/step':>9s} {'MFU':>6s} {'memory GB':>10s} "
             f"{'loss first->last':>18s}"]
    for key in ("llmc", "llmc_fp8", "torch"):
        r = results.get(key)
        if r is None:
            continue
        lines.append(f"{r['name']:16s} {r['tokens_per_s']:10,.0f} {r['ms_per_step']:9.1f} "
                     f"{100 * r['mfu']:5.1f}% {r['mem_device_bytes'] / 1e9:10.2f} "
                     f"{r['first_loss']:8.4f}->{r['last_loss']:.4f}")
    if "fp8_ratio" in results:
        q, f = results["fp8_ratio"], results["llmc_fp8"]
        lines.append(f"llmc fp8/bf16: tokens/s x{q['tokens_per_s']:.3f}, memory "
                     f"x{q['memory']:.3f} (fp8 buffers {f['mem_fp8_bytes'] / 1e9:.2f} GB, DGELU "
                     f"fused {f['fp8_dgelu_fused']}, scales {f['fp8_stats']})")
    if "ratio" in results:
        q = results["ratio"]
        lines.append(f"llmc/torch: tokens/s x{q['tokens_per_s']:.3f}, memory x{q['memory']:.3f}")
    llmc = results["llmc"]
    for key in ("llmc", "llmc_fp8"):
        if "profile" in results.get(key, {}):
            p = results[key]["profile"]
            lines.append(f"{results[key]['name']} profile of one step ({p['total_ms']:.1f} ms "
                         f"with events):")
            for family, ms in sorted(p["ms"].items(), key=lambda kv: -kv[1]):
                lines.append(f"  {family:11s} {ms:8.2f} ms {100 * ms / p['total_ms']:5.1f}%  "
                             f"{p['calls'][family]:4d} calls")
    lines.append(f"llmc pool {llmc['mem_pool_bytes'] / 1e9:.2f} GB, activations "
                 f"{llmc['mem_activations_bytes'] / 1e9:.2f} GB")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from llmc.config import model_config
    mc = model_config(args.model)
    if args.seq_len > mc.block_size:
        print(f"--seq-len {args.seq_len} exceeds the model's {mc.block_size}", file=sys.stderr)
        return 2
    results = {"device": device_name(), "model": args.model, "B": args.batch_size,
               "T": args.seq_len, "grad_accum": args.grad_accum, "steps": args.steps,
               "recompute": args.recompute, "classifier_chunks": args.classifier_chunks,
               "flops_per_token": flops_per_token(mc, args.seq_len)}
    results["llmc"] = run_llmc(args, mc)
    if args.fp8:
        results["llmc_fp8"] = run_llmc(args, mc, fp8=True)
        f, b = results["llmc_fp8"], results["llmc"]
        results["fp8_ratio"] = {"tokens_per_s": f["tokens_per_s"] / b["tokens_per_s"],
                                "memory": f["mem_device_bytes"] / b["mem_device_bytes"]}
    if args.torch:
        results["torch"] = run_torch(args, mc)
        t, l = results["torch"], results["llmc"]
        results["ratio"] = {"tokens_per_s": l["tokens_per_s"] / t["tokens_per_s"],
                            "memory": l["mem_device_bytes"] / t["mem_device_bytes"]}
    for r in (results["llmc"], results.get("llmc_fp8"), results.get("torch")):
        if r is not None and not (math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])):
            print(f"{r['name']}: non-finite loss", file=sys.stderr)
            return 1
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
