#!/usr/bin/env bash
# Rebuild .whl/: the Python wheels the GPU image lacks, for the GPU session (launch/gpu_session.sh) to carry.
#
# The H200 image (Python 3.12, jax 0.11.2 cuda13, flax, optax, orbax-checkpoint, chex, absl-py, numpy, scipy,
# lxml, etils, protobuf, pyyaml, attrs, wrapt, ...) has no dm_control, mujoco, dm-env, dm-tree or ml_collections,
# and reaches no package registry: the device call carries them (`carry: [".whl"]`; the working tree plus the
# carried paths must stay under 64 MiB). Run this where pip reaches PyPI, in the repository root whose checkout
# the device tool sends (.whl/ is git-ignored; never commit it):
#
#   launch/gpu_wheels.sh            # -> .whl/ (cp312 manylinux x86_64), about 28 MB
#   PYVER=3.11 launch/gpu_wheels.sh /tmp/whl311   # the same set for another Python (to test them locally)
#
# What it fetches (exact pins; --no-deps, so each dependency the image lacks is named here):
#   mujoco==3.17.0 (27 MB), dm-control==1.0.50, dm-env==1.6, dm-tree==0.1.10, ml-collections==1.1.0.
# Not fetched, because nothing the trainer, its evaluation or the 30 MT30 tasks run needs them with
# MUJOCO_GL=disable (fmbpo_jax.envs sets it): glfw, PyOpenGL, labmaze (dm_control's locomotion mazes), websockets
# (mujoco's viewer), wandb (only with --wandb), torch (already in the image; only the converter and parity
# tests use it). dm_control's own 56 MB wheel is repacked by launch/slim_wheel.py to ~0.6 MB: it leaves out
# locomotion/, manipulation/, the dog's meshes, Blender docs, MuJoCo's rendering test frames, kinova meshes and
# the *_test.py modules; every file kept is the released one.
# Checked (2026-12, this repo's CPU machine): a clean Python 3.12 venv with jax 0.11.2 and only these wheels
# installed the way the session does it (pip --target + PYTHONPATH) reproduces the 30 MT30 golden trajectories
# bit for bit (`python -m fmbpo_jax.envs replay --golden tests/fixtures/envs/mt30_golden_seed1.npz`) and runs
# the phase-3 end-to-end smoke (launch/gpu_phase3_e2e.sh at tiny sizes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PYVER="${PYVER:-3.12}"
PY="${PYTHON:-$(command -v python3)}"
PINS=(mujoco==3.17.0 dm-control==1.0.50 dm-env==1.6 dm-tree==0.1.10 ml-collections==1.1.0)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d "$TMP/dl" "${PINS[@]}"
(cd "$ROOT" && "$PY" -m launch.slim_wheel "$TMP"/dl/dm_control-*.whl "$TMP/whl")
find "$TMP/dl" -name '*.whl' ! -name 'dm_control-*' -exec cp {} "$TMP/whl/" \;
# a fresh directory: two versions of one package would stop the session's install
rm -rf "$DEST" && mkdir -p "$DEST" && cp "$TMP"/whl/*.whl "$DEST/"
ls -l "$DEST"
du -sh "$DEST"
