"""launch/gpu_session.sh with a stub interpreter: which parts run, in which order, with which flags and limits, and
what lands in $OUT (the device returns at most 8 files). The real runs are the CPU smoke in the scripts' headers."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEP = "\x1f"


def _session(tmp_path, **env_extra):
    tmp_path = tmp_path / str(len(list(tmp_path.iterdir())))  # each session its own directory and call log
    tmp_path.mkdir()
    log = tmp_path / "calls"
    stub = tmp_path / "python"
    # logs each call's arguments on one line; reads a heredoc script from stdin so the pipe does not break
    stub.write_text('#!/bin/bash\nIFS=$\'\\x1f\'; echo "$*" >> "$STUB_LOG"\n[ "$1" = - ] && cat > /dev/null\nexit 0\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log), OUT=str(out), GPU_WHEEL_DIR=str(tmp_path / "no_wheels"),
               GPU_EXTRAS=str(tmp_path / "extras"), E2E_WORK=str(tmp_path / "e2e"), XLA_FLAGS="", **env_extra)
    env.pop("PYTHONPATH", None)
    p = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_session.sh")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    calls = [line.split(SEP) for line in log.read_text().splitlines()]
    return calls, out, p.stdout


def _module_calls(calls, module):
    return [c for c in calls if len(c) > 1 and module in c[:3]]


def test_default_session_runs_envs_bench_then_e2e_with_phase3_flags(tmp_path):
    calls, out, stdout = _session(tmp_path)
    order = [next(m for m in ("fmbpo_jax.bench", "launch.e2e_main") if m in c) for c in calls
             if "fmbpo_jax.bench" in c or "launch.e2e_main" in c]
    assert order == ["fmbpo_jax.bench", "launch.e2e_main"]  # the autotune probe is off in a session
    assert len(_module_calls(calls, "fmbpo_jax.envs")) == 1
    bench = _module_calls(calls, "fmbpo_jax.bench")[0]
    assert bench[bench.index("--max-seconds") + 1] == "190"  # BENCH_TIMEOUT 230 - 40
    fixtures = _module_calls(calls, "launch.e2e_fixtures")
    assert any("--store" in c for c in fixtures) and any("--checkpoint" in c and "48M" in c for c in fixtures)
    run = _module_calls(calls, "launch.e2e_main")[0]
    for flag in ("--config=configs/phase3.py", "--config.epochs=1000", "--config.eval.freq=500", "--config.seeds=42",
                 "--config.precision=bf16", "--config.tasks=all", "--config.model.size=48M", "--config.data.sampler=host"):
        assert flag in run, flag
    summary = _module_calls(calls, "launch.e2e_summary")[-1]
    assert summary[summary.index("--target-epochs") + 1] == "15000" and "--exit-code" in summary
    files = [f for _, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and "extras.tar.gz" in files and "session_log.txt" in files
    assert "session end" in stdout


def test_parts_can_be_chosen_and_a_part_without_time_is_skipped(tmp_path):
    calls, _, _ = _session(tmp_path, GPU_PARTS="e2e")
    assert not _module_calls(calls, "fmbpo_jax.bench") and not _module_calls(calls, "fmbpo_jax.envs")
    assert len(_module_calls(calls, "launch.e2e_main")) == 1
    calls, _, stdout = _session(tmp_path, GPU_PARTS="bench,e2e", SESSION_SECONDS="100")
    assert not _module_calls(calls, "launch.e2e_main") and "e2e skipped" in stdout
    bench = _module_calls(calls, "fmbpo_jax.bench")[0]
    assert int(bench[bench.index("--max-seconds") + 1]) <= 100 - 15 - 40  # the budget caps the bench too
