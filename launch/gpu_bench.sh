#!/usr/bin/env bash
# One-shot GPU benchmark (issue 9): the rows that matter, on ONE GPU, in under 8 minutes, into ONE JSON.
#
#   48M x {1, 30} tasks x {baseline-frozen, baseline-finetune, fullflow-finetune-k8k4} x {fp32-highest, bf16}
#   = 12 rows, reference per-epoch work (--preset reference: one WM step on the policy batch of 512).
#
# Usage (install steps assumed done; run from anywhere):
#   launch/gpu_bench.sh [OUT.json]            # default: ${OUT:-.}/gpu_bench.json
# Then paste the printed table into the README's "Performance" section with the GPU named.
#
# Time plan: the 12 programs are traced one after another, then compiled concurrently in 6 threads
# (XLA compiles outside the GIL), then timed one at a time: 1 warm-up call + 3 timed samples of 1 epoch
# per call (short calls repeated back-to-back to >= 0.5 s per sample, synchronised at the end).
# Any row not started by 420 s is written as 'skipped'; a row that fails (e.g. OOM) is written with its
# error and the others still run. The JSON is rewritten after every row, so a killed run keeps its rows.
# Memory: the 30-task fine-tuning rows lax.map the run axis in groups of 10 (--finetune-task-chunk), so
# 48M full-flow K8 fits one 80 GB GPU; frozen-WM rows vmap all 30 runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_JSON="${1:-${OUT:-.}/gpu_bench.json}"
mkdir -p "$(dirname "$OUT_JSON")"
cd "$ROOT"

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"

exec timeout --signal=TERM 475 python -m fmbpo_jax.bench \
  --variant baseline-frozen,baseline-finetune,fullflow-finetune-k8k4 \
  --size 48M --tasks 1,30 --seeds 1 \
  --precision fp32-highest,bf16 \
  --preset reference \
  --epochs-per-call 1 --timed-calls 3 --min-call-seconds 0.5 \
  --finetune-task-chunk 10 \
  --compile-workers 6 \
  --max-seconds 420 \
  --json "$OUT_JSON"
