#!/usr/bin/env bash
# Issue 23's GPU measurements as ONE device command: install the carried wheels, print versions, check the
# simulator, run the benchmark rows (launch/gpu_bench.sh) and the phase-3 end-to-end run
# (launch/gpu_phase3_e2e.sh), each under its own time limit, the whole session within SESSION_SECONDS.
#
# Device command (repo root; `carry: [".whl"]`, built by launch/gpu_wheels.sh; timeout_s 600):
#   bash launch/gpu_session.sh
# Rerun one part only:  GPU_PARTS=e2e bash launch/gpu_session.sh   (or bench, envs, parity; comma-separated)
#
# Parts (GPU_PARTS, default "envs,bench,e2e", run in the order given):
#   envs    the 30 MT30 golden trajectories replayed through the carried dm_control/MuJoCo (bitwise, CPU, ~10 s);
#           runs in the background from the start, beside whatever else runs
#   bench   launch/gpu_bench.sh as committed (its 12 rows and flags), main pass under BENCH_TIMEOUT (230 s here;
#           rows not started by BENCH_MAX_SECONDS = BENCH_TIMEOUT - 40 are written as skipped), the autotune
#           probe off (GPU_BENCH_PROBE=1 turns it on, PROBE_TIMEOUT 140 s)
#   e2e     launch/gpu_phase3_e2e.sh (1,000 epochs, 48M, 30 tasks, bf16; E2E_* variables), under the time left
#           (at least E2E_MIN_SECONDS = 150, else skipped); its random store and checkpoint are built on the CPU
#           in the background from the start, so the bench hides their ~30 s
#   parity  pytest PARITY_TESTS (default: the bf16 and model/PWM parity tests) with
#           JAX_DEFAULT_MATMUL_PRECISION=highest, under PARITY_TIMEOUT (150 s); not in the default parts
# Budget: SESSION_SECONDS (default 560) from the start; each part gets at most the time left minus TAIL_SECONDS
# (15) for packing up. Rough GPU plan at the 2026-11-28 speeds: install+versions 15 s, bench ~215 s, e2e ~300 s.
#
# What comes back ($OUT, at most 7 files, each kept up to date as the session goes, so a killed session keeps
# what it had): session_log.txt (all output), gpu_bench.json + gpu_bench_log.txt (+ gpu_bench_autotune.json with
# the probe), e2e_summary.json (rewritten every ~20 s during the run) + e2e_log.txt, extras.tar.gz (versions,
# simulator check, parity log, the e2e run's config.json, metrics.jsonl, eval.jsonl, results.csv, summary.md).
#
# CPU smoke of the whole session (10 minutes on 2 busy cores). PYTHON: a Python 3.12 with pip, jax, flax, optax,
# orbax-checkpoint, chex, scipy, lxml, pyyaml (e.g. a venv), so that .whl/ installs as on the GPU; GPU_SITE: where:
#   OUT=/tmp/gpukit_out PYTHON=/tmp/venv312/bin/python GPU_SITE=/tmp/site_smoke SESSION_SECONDS=900 BENCH_TIMEOUT=330
#   BENCH_ARGS="--size tiny --batch-size 16 --horizon 4 --critic-iterations 1 --timed-calls 1 --min-call-seconds 0
#   --compile-workers 1" E2E_WORK=... E2E_SIZE=tiny ... (the E2E_* values of launch/gpu_phase3_e2e.sh's CPU smoke)
#   bash launch/gpu_session.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
T_START=$(date +%s)
BUDGET="${SESSION_SECONDS:-560}"
TAIL="${TAIL_SECONDS:-15}"
PARTS=",${GPU_PARTS:-envs,bench,e2e},"
SITE="${GPU_SITE:-/tmp/site}"
E2E_WORK="${E2E_WORK:-/tmp/fmbpo_e2e}"
EXTRAS="${GPU_EXTRAS:-/tmp/gpu_session_extras}"  # packed into $OUT/extras.tar.gz (outside $OUT: 8 files come back)
export E2E_WORK PYTHON="$PY"

left() { echo $(( BUDGET - ($(date +%s) - T_START) )); }
has() { [[ "$PARTS" == *",$1,"* ]]; }
stamp() { echo "== [+$(( $(date +%s) - T_START )) s, $(left) s left] $*"; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

pack_extras() {  # small files into one archive; cheap, so after every part
  local run="$E2E_WORK/run"
  mkdir -p "$EXTRAS/e2e_run"
  for f in config.json metrics.jsonl eval.jsonl results.csv summary.md; do
    [ -f "$run/$f" ] && cp "$run/$f" "$EXTRAS/e2e_run/"
  done
  tar -czf "$OUT/extras.tar.gz.tmp" -C "$EXTRAS" . && mv "$OUT/extras.tar.gz.tmp" "$OUT/extras.tar.gz"
}

install_wheels() {
  local dir="${GPU_WHEEL_DIR:-.whl}"
  if ! ls "$dir"/*.whl > /dev/null 2>&1; then
    echo "no $dir/*.whl: using the interpreter's own packages"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$dir"/*.whl \
    || { echo "installing $dir/*.whl into $SITE failed"; return 1; }
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

versions() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || true
  "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "scipy", "ml_collections",
             "mujoco", "dm_control", "dm_env", "tree", "torch"):
    try:
        m = importlib.import_module(name)
        print(f"{name:18s} {getattr(m, '__version__', '?'):12s} {getattr(m, '__file__', '')}")
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(f"{name:18s} MISSING ({type(e).__name__}: {e})")
import jax
print("devices", jax.devices())
EOF
}

background_prep() {  # CPU work that the GPU parts need later, started at once
  if has envs; then
    ( JAX_PLATFORMS=cpu timeout 120 "$PY" -m fmbpo_jax.envs replay --golden tests/fixtures/envs/mt30_golden_seed1.npz \
        > "$EXTRAS/envs_replay.txt" 2>&1; echo "exit code $?" >> "$EXTRAS/envs_replay.txt" ) &
    ENVS_PID=$!
  fi
  if has e2e; then
    ( E2E_FIXTURES_ONLY=1 timeout 240 bash launch/gpu_phase3_e2e.sh "$OUT" > "$EXTRAS/e2e_fixtures.txt" 2>&1 ) &
    FIX_PID=$!
  fi
}

part_bench() {
  local to
  to=$(min "${BENCH_TIMEOUT:-230}" $(( $(left) - TAIL )))
  [ "$to" -lt 60 ] && { stamp "bench skipped: $to s left for it"; return 0; }
  stamp "bench (main pass limit $to s)"
  BENCH_TIMEOUT="$to" BENCH_MAX_SECONDS="${BENCH_MAX_SECONDS:-$(( to - 40 ))}" GPU_BENCH_PROBE="${GPU_BENCH_PROBE:-0}" \
    bash launch/gpu_bench.sh "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench_log.txt"
  stamp "bench exit code ${PIPESTATUS[0]}"
}

part_e2e() {
  local to
  [ -n "${FIX_PID:-}" ] && { wait "$FIX_PID"; cat "$EXTRAS/e2e_fixtures.txt"; FIX_PID=; }
  to=$(( $(left) - TAIL - 5 ))
  [ "$to" -lt "${E2E_MIN_SECONDS:-150}" ] && { stamp "e2e skipped: $to s left, E2E_MIN_SECONDS=${E2E_MIN_SECONDS:-150}"; return 0; }
  to=$(min "${E2E_TIMEOUT:-$to}" "$to")
  stamp "phase-3 end to end (run limit $to s)"
  E2E_TIMEOUT="$to" bash launch/gpu_phase3_e2e.sh "$OUT"
  stamp "e2e exit code $?"
}

part_parity() {
  local to
  to=$(min "${PARITY_TIMEOUT:-150}" $(( $(left) - TAIL )))
  [ "$to" -lt 30 ] && { stamp "parity skipped: $to s left"; return 0; }
  stamp "parity tests (limit $to s)"
  # shellcheck disable=SC2086
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 10 "$to" "$PY" -m pytest -q -x -p no:cacheprovider \
    ${PARITY_TESTS:-tests/test_bf16.py tests/test_parity_models.py tests/test_pwm_parity.py} 2>&1 | tee "$EXTRAS/parity_log.txt"
  stamp "parity exit code ${PIPESTATUS[0]}"
}

session() {
  stamp "session start: parts ${PARTS:1:-1}, budget $BUDGET s, OUT=$OUT"
  mkdir -p "$EXTRAS"
  install_wheels || return 3
  versions | tee "$EXTRAS/versions.txt"
  background_prep
  IFS=, read -r -a order <<< "${PARTS:1:-1}"
  for p in "${order[@]}"; do
    case "$p" in
      envs) ;;  # started in background_prep
      bench) part_bench ;;
      e2e) part_e2e ;;
      parity) part_parity ;;
      *) stamp "unknown part '$p' (known: envs, bench, e2e, parity)" ;;
    esac
    pack_extras
  done
  if [ -n "${ENVS_PID:-}" ]; then
    wait "$ENVS_PID"
    stamp "simulator check: $(tail -n 2 "$EXTRAS/envs_replay.txt" | tr '\n' ' ')"
  fi
  [ -n "${FIX_PID:-}" ] && wait "$FIX_PID"
  pack_extras
  [ -f "$OUT/e2e_summary.json" ] && "$PY" - "$OUT/e2e_summary.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
x, m = d.get("extrapolation") or {}, d.get("measured") or {}
print(f"e2e recap: complete={d.get('complete')} epochs={m.get('epochs_done')} s/epoch={m.get('steady_s_per_epoch')} "
      f"startup={m.get('startup_s')} compile={m.get('compile_s')} final_eval={m.get('final_evaluation_s')} -> "
      f"{d.get('target', {}).get('epochs')} epochs: {x.get('total_min')} min, lower bound: {x.get('lower_bound')}")
print(f"e2e terms (s): {x.get('terms')}")
EOF
  stamp "session end; files in $OUT:"
  ls -la "$OUT"
}

session 2>&1 | tee "$OUT/session_log.txt"
exit "${PIPESTATUS[0]}"
