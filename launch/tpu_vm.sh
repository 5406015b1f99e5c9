#!/bin/bash
# fmbpo_jax on a Cloud TPU VM (single host, or a multi-host slice / pod).
#
# Prints the gcloud commands by default (dry run); `RUN=1 launch/tpu_vm.sh <step>` runs them.
# Steps: create | setup | train | status | fetch | delete | all (create, setup, train).
#
#   TPU_NAME=fmbpo-v4 ZONE=us-central2-b ACCEL=v4-8 VERSION=tpu-ubuntu2204-base \
#   CONFIG=configs/phase6.py:fullflow ARGS="--config.epochs=50000 --config.seeds=42,123,456" \
#   DATASET=gs://my-bucket/mt30_store launch/tpu_vm.sh all
#
# A single-host TPU VM (v4-8, v5litepod-8, v6e-8) trains like a multi-GPU node: one process sees all chips
# and the run axis is sharded over them (fmbpo_jax.sharding). A multi-host slice (v4-32, v5litepod-32, ...)
# runs the SAME command on every worker (--worker=all) with --multihost: jax.distributed.initialize() reads
# the TPU topology itself. Spot/preemptible VMs: the trainer checkpoints on SIGTERM (exit 75); rerun `train`
# with the same WORKDIR to resume (put WORKDIR on a bucket-backed or persistent disk for multi-host).
set -euo pipefail

TPU_NAME=${TPU_NAME:-fmbpo-tpu}
ZONE=${ZONE:-us-central2-b}
ACCEL=${ACCEL:-v4-8}
VERSION=${VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-}            # git URL of this repo; empty: copy the local checkout with scp
REMOTE_DIR=${REMOTE_DIR:-fmbpo_jax}
CONFIG=${CONFIG:-configs/phase6.py:baseline}
ARGS=${ARGS:---config.seeds=42,123,456}
DATASET=${DATASET:-data/mt30_store}   # a path on the VM, or gs://... (copied to ~/mt30_store by setup)
WORKDIR=${WORKDIR:-runs/$(echo "${CONFIG#configs/}" | sed 's/\.py:/_/; s/\.py$//')}
MULTIHOST=${MULTIHOST:-auto}      # auto: --multihost when the slice has more than one host (ACCEL > 8 chips)
RUN=${RUN:-0}

gc() {  # print (and with RUN=1 run) one gcloud command
  local cmd=(gcloud "$@")
  [ -n "$PROJECT" ] && cmd+=(--project="$PROJECT")
  printf '%q ' "${cmd[@]}"; echo
  if [ "$RUN" = "1" ]; then "${cmd[@]}"; fi
}

ssh_all() { gc compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

chips() { echo "${ACCEL##*-}"; }

create() {
  local extra=()
  [ "$SPOT" = "1" ] && extra+=(--spot)
  gc compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCEL" --version="$VERSION" "${extra[@]}"
}

setup() {
  if [ -n "$REPO_URL" ]; then
    ssh_all "git clone $REPO_URL $REMOTE_DIR || (cd $REMOTE_DIR && git pull)"
  else
    gc compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU_NAME:$REMOTE_DIR"
  fi
  ssh_all "cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -U pip && pip install -e . 'jax[tpu]'"
  case "$DATASET" in
    gs://*) ssh_all "gcloud storage cp -r $DATASET ~/mt30_store" ;;
  esac
}

train() {
  local data=$DATASET mh=""
  case "$DATASET" in gs://*) data="\$HOME/mt30_store" ;; esac
  if [ "$MULTIHOST" = "1" ] || { [ "$MULTIHOST" = "auto" ] && [ "$(chips)" -gt 8 ]; }; then mh="--multihost"; fi
  # nohup: the run survives a dropped ssh session; the log stays on each worker.
  ssh_all "cd $REMOTE_DIR && . .venv/bin/activate && mkdir -p logs && nohup python -m fmbpo_jax.main --config=$CONFIG $ARGS --workdir=$WORKDIR --config.data.dataset_dir=$data $mh > logs/$(basename "$WORKDIR").out 2>&1 &"
}

status() { ssh_all "tail -n 3 $REMOTE_DIR/logs/$(basename "$WORKDIR").out"; }

fetch() { gc compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=0 "$TPU_NAME:$REMOTE_DIR/$WORKDIR" "./$(dirname "$WORKDIR")/"; }

delete() { gc compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet; }

[ "$RUN" = "1" ] || echo "# dry run: the commands below are printed, not run (RUN=1 to run them)"
case "${1:-all}" in
  create) create ;;
  setup) setup ;;
  train) train ;;
  status) status ;;
  fetch) fetch ;;
  delete) delete ;;
  all) create; setup; train ;;
  *) echo "usage: $0 create|setup|train|status|fetch|delete|all" >&2; exit 2 ;;
esac
