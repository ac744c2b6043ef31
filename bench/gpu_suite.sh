#!/usr/bin/env bash
# One device call that proves the GPU work: environment, kernel compile times (cold and cached),
# the gpu-marked tests, the per-kernel benchmarks and the end-to-end comparison with PyTorch.
# Usage (on the GPU machine, from the repo root):  OUT=/some/dir bash bench/gpu_suite.sh [parts]
# parts: any of env tests alltests bench e2e profile demo multigpu (default: env tests bench)
set -uo pipefail
OUT=${OUT:-/tmp/llmc_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0
PY=${PY:-python3}
parts=${*:-env tests bench}
summary=$OUT/summary.txt
touch "$summary"
say() { echo "$*" | tee -a "$summary"; }

for part in $parts; do
case $part in
env)
  say "== env"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
  $PY -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', cupy.cuda.runtime.runtimeGetVersion())" 2>&1 | tee -a "$summary"
  # kernel compile time: cold (empty cache) and cached
  $PY - <<'PY' 2>&1 | tee -a "$summary"
import os, tempfile, time
os.environ["CUPY_CACHE_DIR"] = tempfile.mkdtemp()
from llmc import kernels
for label in ("cold", "cached"):
    kernels._modules.clear(); kernels.compile_times.clear()
    t = sum(kernels.load_all(d) for d in ("bf16", "fp32"))
    print(f"kernel compile {label}: {t:.2f}s for {len(kernels.compile_times)} modules")
PY
  ;;
tests)
  say "== gpu tests"
  $PY -m pytest -m "gpu" -q --timeout=300 -rf -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt" >> "$summary"
  ;;
alltests)
  say "== all tests"
  $PY -m pytest -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/all_tests.txt" | tail -40
  tail -3 "$OUT/all_tests.txt" >> "$summary"
  ;;
bench)
  say "== benchmarks"
  $PY -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | tail -40
  tail -3 "$OUT/bench.txt" >> "$summary"
  ;;
e2e)
  say "== end to end"
  # d12 at B=16 with the trainer's defaults (no recompute, one classifier chunk)
  $PY bench/e2e.py --model d12 --batch-size 16 --seq-len 1024 --steps 30 --json "$OUT/e2e_d12_b16.json" 2>&1 | tee "$OUT/e2e16.txt" | tail -12
  tail -6 "$OUT/e2e16.txt" >> "$summary"
  $PY bench/e2e.py --model d12 --batch-size 64 --seq-len 1024 --steps 20 --recompute 1 --classifier-chunks 4 --profile --json "$OUT/e2e_d12.json" 2>&1 | tee "$OUT/e2e.txt" | tail -40
  tail -16 "$OUT/e2e.txt" >> "$summary"
  # d24: B=32 so the compiled PyTorch peer fits an 80 GB card
  $PY bench/e2e.py --model d24 --batch-size 32 --seq-len 1024 --steps 10 --recompute 1 --json "$OUT/e2e_d24.json" 2>&1 | tee "$OUT/e2e24.txt" | tail -12
  tail -6 "$OUT/e2e24.txt" >> "$summary"
  ;;
profile)
  say "== kernel profile"
  # every kernel of a d12 B=16 training step and the gaps between them (CUPTI)
  $PY bench/kernel_profile.py --batch-size 16 --out "$OUT/kernel_profile.txt" 2>&1 | tail -60
  head -2 "$OUT/kernel_profile.txt" >> "$summary"
  ;;
demo)
  say "== python -m llmc.train (no flags: d12 on tiny-shakespeare, 200 steps, sample)"
  $PY -m llmc.train --out-dir "$OUT/demo" 2>&1 | tee "$OUT/demo.txt" | tail -30
  grep -E "^step +(1|100|200)/" "$OUT/demo.txt" >> "$summary"; tail -12 "$OUT/demo.txt" >> "$summary"
  ;;
multigpu)
  say "== multi-gpu tests"
  $PY -m pytest -m "multigpu" -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/multigpu.txt" | tail -30
  tail -3 "$OUT/multigpu.txt" >> "$summary"
  ;;
esac
done
