#!/usr/bin/env bash
# Phase 3 end to end (issue 23): `python -m fmbpo_jax.main --config=configs/phase3.py` on a random 30-task store
# and a randomly initialised 48M world-model checkpoint, bf16 compute, 1,000 epochs with evaluation every 500
# (evaluation at epoch 0, the final plain + MPPI planning + best-params evaluations included), timed part by
# part and extrapolated to the whole phase (15,000 epochs, evaluation every 500).
#
#   launch/gpu_phase3_e2e.sh [OUT_DIR]     # default ${OUT:-.}; writes OUT_DIR/e2e_log.txt and e2e_summary.json
#
# Steps:
# 1. Inputs (launch/e2e_fixtures.py, on the CPU, skipped when already in $E2E_WORK): a store of
#    E2E_STORE_EPISODES random episodes per task, and a random WM of E2E_SIZE in the converted-checkpoint format
#    (no torch). E2E_FIXTURES_ONLY=1 stops after this step (the session builds them while the bench runs).
# 2. The run, through launch/e2e_main.py: fmbpo_jax.main itself, with a time stamp on each output line and timing
#    events around each evaluation, the final evaluation and each checkpoint (nothing in the run changes). A fresh
#    workdir every time (an old one would resume). Flags: configs/phase3.py plus --config.seeds=42 (one seed: the
#    issue's "30 tasks"; phase 3 proper trains 3 seeds), --config.epochs, --config.eval.freq, --config.precision,
#    --config.data.sampler=host (what `auto` picks for the real 44 GB store with the default 20 GB device budget),
#    then E2E_ARGS (appended last, so they win).
# 3. launch/e2e_summary.py: e2e_summary.json with startup, compile, each chunk, each evaluation, each
#    checkpoint, the final evaluation, and the extrapolation (model in that module's docstring). It is rewritten
#    every ~20 s while the run goes on, so a run stopped by E2E_TIMEOUT or by the device's limit keeps a summary.
#
# Environment (defaults in brackets): E2E_SIZE [48M], E2E_TASKS [all], E2E_SEEDS [42], E2E_EPOCHS [1000],
# E2E_EVAL_FREQ [500], E2E_PRECISION [bf16], E2E_SAMPLER [host], E2E_STORE_EPISODES [8], E2E_TARGET_EPOCHS
# [15000], E2E_TARGET_EVAL_FREQ [500], E2E_TARGET_CHECKPOINT_FREQ [1000, phase 3's], E2E_TIMEOUT [420 s, the
# run only], E2E_WORK [/tmp/fmbpo_e2e], E2E_XLA_FLAGS [the bench's: cuBLAS GEMMs, no autotuning; set it empty
# for XLA's defaults], E2E_ARGS [extra fmbpo_jax.main flags], PYTHON [python3].
# CPU smoke (about 2 minutes on 2 cores):
#   E2E_SIZE=tiny E2E_TASKS=walker-stand,cheetah-run,reacher-easy E2E_EPOCHS=20 E2E_EVAL_FREQ=10 E2E_STORE_EPISODES=2 \
#   E2E_ARGS="--config.chunk_epochs=5 --config.log_freq=5 --config.checkpoint_freq=10 --config.eval.episodes=2
#     --config.eval.max_steps=20 --config.eval.workers=1 --config.alg.batch_size=16 --config.alg.horizon=4
#     --config.alg.critic_iterations=1 --config.alg.critic_batches=1 --config.eval.mppi_samples=32
#     --config.eval.mppi_elites=8 --config.eval.mppi_policy_trajs=4" E2E_TARGET_EVAL_FREQ=10 launch/gpu_phase3_e2e.sh /tmp/e2e_out
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-.}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"

SIZE="${E2E_SIZE:-48M}"
TASKS="${E2E_TASKS:-all}"
EPOCHS="${E2E_EPOCHS:-1000}"
EVAL_FREQ="${E2E_EVAL_FREQ:-500}"
TARGET_EPOCHS="${E2E_TARGET_EPOCHS:-15000}"
TARGET_EVAL_FREQ="${E2E_TARGET_EVAL_FREQ:-500}"
WORK="${E2E_WORK:-/tmp/fmbpo_e2e}"
STORE="$WORK/store_$(echo "$TASKS" | md5sum | cut -c1-8)"
CKPT="$WORK/wm_$SIZE"
RUN="$WORK/run"
LOG="$OUT_DIR/e2e_log.txt"
SUMMARY="$OUT_DIR/e2e_summary.json"
XFLAGS="${E2E_XLA_FLAGS---xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0}"
read -r -a EXTRA <<< "${E2E_ARGS:-}"
mkdir -p "$WORK"

t_fix=$(date +%s)
if [ ! -f "$STORE/index.json" ]; then
  rm -rf "$STORE"
  JAX_PLATFORMS=cpu "$PY" -m launch.e2e_fixtures --store "$STORE" --tasks "$TASKS" \
    --episodes "${E2E_STORE_EPISODES:-8}" || exit 2
fi
if [ ! -f "$CKPT/manifest.json" ]; then
  JAX_PLATFORMS=cpu "$PY" -m launch.e2e_fixtures --checkpoint "$CKPT" --size "$SIZE" || exit 2
fi
echo "e2e inputs ready in $(( $(date +%s) - t_fix )) s: $STORE, $CKPT"
[ "${E2E_FIXTURES_ONLY:-0}" = 1 ] && exit 0

rm -rf "$RUN"  # a workdir with a checkpoint would resume instead of starting
T0=$(date +%s.%N)
META=(--meta "size=$SIZE" --meta "xla_flags=$XFLAGS" --meta "e2e_args=${E2E_ARGS:-}" --meta "host=${HOSTNAME:-}")
summarize() {  # $1: the run's exit code, when it has one
  "$PY" -m launch.e2e_summary --log "$LOG" --workdir "$RUN" --t0 "$T0" ${1:+--exit-code "$1"} \
    --target-epochs "$TARGET_EPOCHS" --target-eval-freq "$TARGET_EVAL_FREQ" \
    --target-checkpoint-freq "${E2E_TARGET_CHECKPOINT_FREQ:-1000}" --json "$SUMMARY" "${META[@]}"
}
echo "e2e run: $EPOCHS epochs, eval every $EVAL_FREQ, size $SIZE, tasks $TASKS, limit ${E2E_TIMEOUT:-420} s; log $LOG"
PYTHONUNBUFFERED=1 XLA_FLAGS="${XLA_FLAGS:-} $XFLAGS" timeout -k 20 --signal=TERM "${E2E_TIMEOUT:-420}" \
  "$PY" -u -m launch.e2e_main --config=configs/phase3.py \
  --config.checkpoint="$CKPT" --config.data.dataset_dir="$STORE" --config.model.size="$SIZE" \
  --config.tasks="$TASKS" --config.seeds="${E2E_SEEDS:-42}" --config.epochs="$EPOCHS" \
  --config.eval.freq="$EVAL_FREQ" --config.precision="${E2E_PRECISION:-bf16}" \
  --config.data.sampler="${E2E_SAMPLER:-host}" --workdir="$RUN" "${EXTRA[@]}" > "$LOG" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do  # a partial summary every ~20 s survives a kill of this script
  for _ in $(seq 10); do sleep 2; kill -0 "$pid" 2>/dev/null || break; done
  kill -0 "$pid" 2>/dev/null && { summarize > /dev/null 2>&1 || true; }
done
wait "$pid"
rc=$?
echo "e2e run exit code $rc (124: stopped by E2E_TIMEOUT; 75: SIGTERM, checkpointed); last lines:"
tail -n 12 "$LOG" | cut -c1-300
summarize "$rc"
exit "$rc"
