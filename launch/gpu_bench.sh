#!/usr/bin/env bash
# One-shot GPU benchmark: the rows that matter, on ONE GPU, in under 8 minutes, into ONE JSON.
#
#   48M x {1, 30} tasks x {baseline-frozen, baseline-finetune, fullflow-finetune-k8k4} x {bf16, fp32-highest}
#   = 12 rows, reference per-epoch work (--preset reference: one WM step on the policy batch of 512),
#   then a compile-time probe: 2 rows again under XLA's default GEMM autotuning.
#
# Usage (install steps assumed done, i.e. jax[cuda], flax, optax and ml_collections importable; on the H200
# image of the first GPU session only ml_collections was missing; run from anywhere):
#   launch/gpu_bench.sh [OUT.json]   # default ${OUT:-.}/gpu_bench.json; the probe writes OUT_autotune.json beside it
# Then paste the printed table into docs/performance.md ("On a GPU") with the GPU named, and commit the JSON
# and log under docs/results/<gpu>_<date>/.
#
# Why these flags. On an H200 (jax 0.11.2, first GPU session) XLA's default compile of these programs took
# minutes: 12 programs in 6 threads had not finished after 400 s, and the simplest 48M program (one WM
# pretraining step) not after ~40 s. The likely cause is the GEMM fusion autotuner (XLA compiles and runs
# many Triton configs per matmul fusion, on the GPU). So the main pass sends matmuls to cuBLAS with its
# own heuristics, as PyTorch does (--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0): compiling
# then does not use the GPU, so each row is timed as soon as its program is ready while later rows compile
# (--pipeline). The probe measures what autotuning costs in compile time and gives in speed. In the second
# GPU session (2026-11-28, same image) this script ran as it is: the 12 programs compiled in 15-76 s each
# (6 threads), and the probe's default-autotuned programs compiled in 26-30 s (one thread) and ran within 2%
# of the cuBLAS ones, so the first session's stall is not explained by autotuning alone. Set
# BENCH_XLA_FLAGS to override the main pass's flags, GPU_BENCH_PROBE=0 to skip the probe.
#
# Time plan: rows in priority order (bf16 first, 30 tasks first), 1 warm-up call + 3 timed samples of
# 1 epoch per call (short calls repeated back-to-back to >= 0.5 s per sample, synchronised at the end).
# Rows not started by BENCH_MAX_SECONDS (270) are written as 'skipped'; a row that fails (e.g. OOM) is
# written with its error and the others still run. The JSON is rewritten after every row, so a killed run
# keeps its rows; each compile is logged with its time as it finishes. Limits: main pass 330 s
# (BENCH_TIMEOUT), probe 140 s (PROBE_TIMEOUT): 7 min 50 s at most, plus start-up.
# Memory (measured on an H200, 2026-11-28): the 30-task baseline fine-tuning rows lax.map the run axis in groups
# of 10 (--finetune-task-chunk; 32-39 GB), the 30-task full-flow K8/K4 rows in groups of 3 (the row's ::3;
# 52-55 GB; groups of 10 asked for 164-177 GB and failed); frozen-WM rows vmap all 30 runs (36-37 GB).
# Measured rows and timings: docs/performance.md "On a GPU", docs/results/h200_2026-11-28/.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_JSON="${1:-${OUT:-.}/gpu_bench.json}"
mkdir -p "$(dirname "$OUT_JSON")"
cd "$ROOT"

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# The interpreter that holds jax[cuda]: $PYTHON, else python3 (GPU images often have no plain 'python').
PY="${PYTHON:-$(command -v python3 || command -v python)}"
FAST_FLAGS="${BENCH_XLA_FLAGS:---xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

ROWS="baseline-frozen:30:bf16,baseline-frozen:1:bf16,baseline-finetune:1:bf16,fullflow-finetune-k8k4:1:bf16"
ROWS+=",baseline-finetune:30:bf16,fullflow-finetune-k8k4:30:bf16::3"
ROWS+=",baseline-frozen:1:fp32-highest,baseline-frozen:30:fp32-highest,baseline-finetune:1:fp32-highest"
ROWS+=",fullflow-finetune-k8k4:1:fp32-highest,baseline-finetune:30:fp32-highest,fullflow-finetune-k8k4:30:fp32-highest::3"
COMMON=(--size 48M --seeds 1 --preset reference --epochs-per-call 1 --timed-calls 3 --min-call-seconds 0.5
        --finetune-task-chunk 10)
# BENCH_ARGS: extra bench flags appended to both passes (later flags win), e.g. a CPU smoke test of this
# script: BENCH_ARGS="--size tiny --batch-size 16 --horizon 4 --critic-iterations 1"
read -r -a EXTRA <<< "${BENCH_ARGS:-}"

XLA_FLAGS="${XLA_FLAGS:-} $FAST_FLAGS" timeout --signal=TERM "${BENCH_TIMEOUT:-330}" "$PY" -m fmbpo_jax.bench \
  --rows "$ROWS" "${COMMON[@]}" --compile-workers 6 --pipeline \
  --max-seconds "${BENCH_MAX_SECONDS:-270}" --json "$OUT_JSON" "${EXTRA[@]}"
rc=$?

if [ "${GPU_BENCH_PROBE:-1}" != 0 ]; then
  # XLA's default GEMM handling (Triton fusions autotuned against cuBLAS); compiles use the GPU, so no pipelining
  timeout --signal=TERM "${PROBE_TIMEOUT:-140}" "$PY" -m fmbpo_jax.bench \
    --rows "baseline-frozen:1:bf16,baseline-finetune:1:bf16" "${COMMON[@]}" --compile-workers 1 \
    --json "${OUT_JSON%.json}_autotune.json" "${EXTRA[@]}" || echo "autotune probe stopped (rc $?): its JSON keeps the finished rows"
fi
exit $rc
