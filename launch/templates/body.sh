set -uo pipefail
# --- environment ------------------------------------------------------------------------------
@@SETUP@@
export PYTHONUNBUFFERED=1
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} array ${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-} on $(hostname) restart ${SLURM_RESTART_COUNT:-0}"
# --- the command (array jobs: one per SLURM_ARRAY_TASK_ID) -------------------------------------
@@SELECT@@
mkdir -p "$(dirname "$WORKDIR")"
echo "run: $RUN_NAME"
echo "cmd: ${CMD[*]}"
# --- preemption / time limit --------------------------------------------------------------------
# SLURM signals this shell (B:) with SIGTERM 120 s before the time limit, and on preemption. The trainer
# runs in the background so the trap fires at once; it forwards SIGTERM, the trainer checkpoints and
# exits 75 (EX_TEMPFAIL), and the job requeues itself. The same command resumes from --workdir.
child=0
forward_term() { echo "[$(date -Is)] SIGTERM: asking the trainer to checkpoint"; [ "$child" -gt 0 ] && kill -TERM "$child" 2>/dev/null; }
trap forward_term TERM
@@LAUNCH@@"${CMD[@]}" &
child=$!
wait "$child"; rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done  # wait returns early when the trap fires
echo "[$(date -Is)] trainer exited with $rc"
if [ "$rc" -eq 75 ]; then
  echo "preempted after checkpoint: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "$rc"
