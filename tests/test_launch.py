"""launch/: the sweep generator's jobs against the run matrix of docs/phases.md, the generated
sbatch scripts, dry-run hygiene, and the requeue-on-preemption logic of the job script (run with stubs)."""
from __future__ import annotations

import itertools
import os
import shlex
import signal
import stat
import subprocess
import time

import pytest

from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_TASKS = ["reacher-easy", "walker-stand", "cheetah-run"]
SEEDS = [42, 123, 456]

# docs/phases.md, run matrix: phase -> (variants, epochs, eval_freq, finetune_wm, tasks, checkpoint kind, actor/WM kinds)
MATRIX = {
    3: dict(variants={"baseline": ("mlp", "gaussian"), "flowpolicy": ("mlp", "flow")}, epochs=[10_000], eval_freq=200,
            finetune=False, checkpoint="pwm"),
    6: dict(variants={"baseline": ("mlp", "gaussian"), "fullflow": ("flow", "flow")}, epochs=[15_000, 50_000, 100_000, 150_000],
            eval_freq=500, finetune=True, checkpoint=None),
    9: dict(variants={"cond0": ("mlp", "gaussian"), "cond1": ("mlp", "flow"), "cond2": ("flow", "gaussian"),
                      "cond3": ("flow", "flow")}, epochs=[50_000], eval_freq=200, finetune=False, checkpoint="phase8"),
}


def parse_like_main(argv: list[str]):
    """Parse a job's command line exactly as fmbpo_jax.main does (absl + config_flags), in a private FlagValues."""
    from absl import flags
    from ml_collections import config_flags

    assert argv[:3] == ["python", "-m", "fmbpo_jax.main"], argv
    fv = flags.FlagValues()
    cwd = os.getcwd()
    os.chdir(ROOT)  # --config=configs/phaseN.py is relative to the repo, as in the job (#SBATCH --chdir)
    try:
        # config_flags reads the --config.* overrides from the argv given at definition time
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=["main"] + argv[3:])
        flags.DEFINE_string("workdir", "", "", flag_values=fv)
        flags.DEFINE_bool("multihost", False, "", flag_values=fv)
        fv(["main"] + argv[3:])
    finally:
        os.chdir(cwd)
    return fv["config"].value, fv["workdir"].value


def _runs_of(jobs):
    """Every (variant, epochs, seed, task) the jobs really train, read back through the trainer's own RunSpec."""
    import numpy as np

    from fmbpo_jax import run_config
    from fmbpo_jax.envs.tasks import MT30_TASKS
    from fmbpo_jax.training.program import run_keys

    runs, keys, configs = [], [], {}
    for j in jobs:
        config, workdir = parse_like_main(j.argv)
        assert workdir == j.workdir
        spec = run_config.run_spec(config)
        configs[j.name] = config
        for r in range(spec.num_runs):
            runs.append((j.variant, config.epochs, spec.run_seeds[r], MT30_TASKS[spec.run_task_ids[r]]))
        keys.append(np.asarray(run_keys(spec)))
    keys = np.concatenate(keys)
    return runs, keys, configs


@pytest.mark.parametrize("phase", [3, 6, 9])
@pytest.mark.parametrize("split", [False, True])
def test_sweep_matches_run_matrix(phase, split):
    m = MATRIX[phase]
    jobs = sweep.plan(phase, split_seeds=split)
    runs, keys, configs = _runs_of(jobs)
    want = list(itertools.product(m["variants"], m["epochs"], SEEDS, REF_TASKS))
    assert sorted(runs) == sorted(want)  # every cell once: no missing, no duplicated run
    # B11: every run is seeded with its own seed: within a (variant, epochs) cell every (seed, task) run has its own
    # PRNG stream, and the stream is a function of (seed, task) only (the same seed means the same run in every cell)
    by_cell, by_run = {}, {}
    for (v, e, seed, task), k in zip(runs, map(tuple, keys.tolist())):
        by_cell.setdefault((v, e), set()).add(k)
        by_run.setdefault((seed, task), set()).add(k)
    assert all(len(ks) == len(SEEDS) * len(REF_TASKS) for ks in by_cell.values())
    assert all(len(ks) == 1 for ks in by_run.values()) and len(by_run) == len(SEEDS) * len(REF_TASKS)
    assert len({j.workdir for j in jobs}) == len(jobs) and len({j.name for j in jobs}) == len(jobs)
    n_jobs = len(m["variants"]) * len(m["epochs"]) * (len(SEEDS) if split else 1)
    assert len(jobs) == n_jobs
    for j in jobs:
        c = configs[j.name]
        assert c.phase == phase and c.eval.freq == m["eval_freq"] and bool(c.finetune_wm) == m["finetune"]
        assert (c.world_model, c.actor) == m["variants"][j.variant]
        if m["checkpoint"] == "pwm":
            assert c.checkpoint.endswith("mt30_48M_4900000.pt")
        elif m["checkpoint"] == "phase8":  # cond0/1 on the phase-8 MLP WM, cond2/3 on the flow WM
            assert c.checkpoint == f"runs/phase8_{c.world_model}_wm/wm_best"
        else:
            assert c.checkpoint == ""
        seeds = sweep._ints(c.seeds)
        assert list(seeds) == (list(j.seeds)) and (len(seeds) == 1) == split
        assert (f"_s{seeds[0]}" in j.name) == split
    if phase == 6:  # GPU of the matrix: 15k/50k on H100, 100k/150k on H200
        assert {(j.epochs, j.gpu) for j in jobs} == {(15_000, "h100"), (50_000, "h100"), (100_000, "h200"), (150_000, "h200")}
    if phase == 9:
        assert {j.gpu for j in jobs} == {"h200"}


def test_phase6_fullflow_config_is_the_flow_k8_k4_variant():
    (job,) = sweep.plan(6, ["fullflow"], epochs=[50_000])
    c, _ = parse_like_main(job.argv)
    assert (c.model.wm_substeps, c.model.actor_substeps, c.epochs) == (8, 4, 50_000)
    assert job.name == "phase6_fullflow_50k"


def test_other_phases_and_options():
    p5 = sweep.plan(5)
    assert {j.variant for j in p5} == {"high_precision_wm", "high_precision_policy", "euler_fast"}
    runs, _, _ = _runs_of(p5)
    assert len(runs) == 18 and {r[3] for r in runs} == {"walker-stand", "cheetah-run"}  # array 0-17
    (p4,) = sweep.plan(4)
    assert p4.argv[3] == "--config=configs/phase4.py" and p4.name == "phase4_fullflow"
    p8 = sweep.plan(8, seeds=[42])
    assert [j.workdir for j in p8] == ["runs/phase8_mlp_wm", "runs/phase8_flow_wm"]  # where phase 9 reads wm_best
    c, _ = parse_like_main(p8[0].argv)
    assert c.mode == "pretrain_wm" and c.pretrain.seed == 42 and c.tasks == "all"
    (j,) = sweep.plan(3, ["baseline"], seeds=[7], tasks="all", extra=["alg.horizon=8"])
    c, _ = parse_like_main(j.argv)
    assert c.tasks == "all" and c.seeds == "7" and c.alg.horizon == 8
    with pytest.raises(SystemExit, match="phase 6 has"):
        sweep.plan(6, ["nope"])
    with pytest.raises(SystemExit, match="distinct"):
        sweep.plan(6, seeds=[42, 42])


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        if any(p in d for p in (".git", "__pycache__", ".pytest_cache")):
            continue
        for f in files:
            p = os.path.join(d, f)
            try:
                out[p] = os.stat(p).st_mtime_ns
            except FileNotFoundError:
                pass
    return out


def test_dry_run_prints_and_writes_only_the_out_dir(tmp_path, capsys):
    out = tmp_path / "out"
    before = _snapshot(os.path.join(ROOT, "launch"))
    cwd_before = set(os.listdir(ROOT))
    written = sweep.main(["--phase", "6", "--variants", "baseline,fullflow", "--seeds", "42,123,456", "--epochs", "15000,50000",
                          "--out", str(out)])
    text = capsys.readouterr().out
    assert "dry run" in text and text.count("sbatch ") == 4
    assert sorted(os.listdir(out)) == sorted(f"phase6_{v}_{e}.sbatch" for v in ("baseline", "fullflow") for e in ("15k", "50k"))
    assert len(written) == 4
    assert _snapshot(os.path.join(ROOT, "launch")) == before  # nothing written in the repo (no logs/, runs/)
    assert set(os.listdir(ROOT)) == cwd_before
    script = (out / "phase6_fullflow_50k.sbatch").read_text()
    cmd = ("python -m fmbpo_jax.main --config=configs/phase6.py:fullflow --config.epochs=50000 --config.seeds=42,123,456 "
           "--workdir=runs/phase6_fullflow_50k")
    assert cmd in script and cmd in text
    for line in ("#SBATCH --job-name=phase6_fullflow_50k", "#SBATCH --output=logs/phase6_fullflow_50k_%j.out",
                 "#SBATCH --signal=B:TERM@120", "#SBATCH --requeue", "#SBATCH --gres=gpu:h100:1", f"#SBATCH --chdir={ROOT}",
                 'scontrol requeue "${SLURM_JOB_ID}"', '"$rc" -eq 75'):
        assert line in script, line
    assert subprocess.run(["bash", "-n", str(out / "phase6_fullflow_50k.sbatch")]).returncode == 0


def test_array_and_templates(tmp_path, capsys):
    out = tmp_path / "arr"
    sweep.main(["--phase", "9", "--array", "--split-seeds", "--out", str(out)])
    capsys.readouterr()
    files = sorted(os.listdir(out))
    assert files == sorted([f"phase9_cond{i}.array.sbatch" for i in range(4)] + [f"phase9_cond{i}.index.tsv" for i in range(4)])
    s = (out / "phase9_cond2.array.sbatch").read_text()
    assert "#SBATCH --array=0-2" in s and "#SBATCH --output=logs/phase9_cond2_%A_%a.out" in s and "gpu:h200:1" in s
    for i, seed in enumerate(SEEDS):
        assert f"  {i}) RUN_NAME=phase9_cond2_s{seed};" in s
        assert (f"--config=configs/phase9.py:cond2 --config.epochs=50000 --config.seeds={seed} --workdir=runs/phase9_cond2_s{seed}"
                in s)
    assert "--config.checkpoint=runs/phase8_flow_wm/wm_best" in s and "phase8_mlp" not in s
    assert (out / "phase9_cond2.index.tsv").read_text().splitlines()[1].startswith("1\tphase9_cond2_s123\t")
    assert subprocess.run(["bash", "-n", str(out / "phase9_cond2.array.sbatch")]).returncode == 0

    out = tmp_path / "mn"
    sweep.main(["--phase", "6", "--variants", "fullflow", "--epochs", "150000", "--template", "multi_node", "--nodes", "2",
                "--gpus", "8", "--out", str(out), "--partition", "gpu", "--setup", "source .venv/bin/activate"])
    capsys.readouterr()
    s = (out / "phase6_fullflow_150k.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:h200:8", "#SBATCH --partition=gpu",
                 "srun --kill-on-bad-exit=1 \"${CMD[@]}\" &", "--multihost)", "source .venv/bin/activate"):
        assert line in s, line
    out = tmp_path / "mg"
    sweep.main(["--phase", "3", "--variants", "flowpolicy", "--template", "multi_gpu", "--gpus", "4", "--gpu-type", "none",
                "--out", str(out)])
    capsys.readouterr()
    s = (out / "phase3_flowpolicy.sbatch").read_text()
    assert "#SBATCH --gres=gpu:4" in s and "srun" not in s and "--multihost" not in s


def _stub(path, text):
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_script(tmp_path, python_stub: str, term_after: float | None = None):
    out = tmp_path / "o"
    sweep.main(["--phase", "3", "--variants", "baseline", "--out", str(out), "--repo", str(tmp_path)])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir / "python", python_stub)
    _stub(bin_dir / "scontrol", f'echo "$@" >> {tmp_path}/scontrol.log\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    p = subprocess.Popen(["bash", str(out / "phase3_baseline.sbatch")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if term_after is not None:
        time.sleep(term_after)
        p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=60)
    log = tmp_path / "scontrol.log"
    return p.returncode, stdout, log.read_text() if log.exists() else ""


def test_job_script_requeues_on_exit_75_and_forwards_sigterm(tmp_path, capsys):
    # the trainer checkpoints on SIGTERM and exits 75: the script forwards the signal, then requeues itself
    stub = ('echo "args: $*" > "$PWD/python_args.txt"\ntrap \'echo trainer got TERM; exit 75\' TERM\n'
            'for i in $(seq 300); do sleep 0.1; done\nexit 0\n')
    rc, out, sc = _run_script(tmp_path, stub, term_after=1.5)
    capsys.readouterr()
    assert "trainer got TERM" in out and "trainer exited with 75" in out, out
    assert rc == 0 and sc.strip() == "requeue 4242"
    args = (tmp_path / "python_args.txt").read_text()
    assert "-m fmbpo_jax.main --config=configs/phase3.py:baseline --config.epochs=10000 --config.seeds=42,123,456" in args
    # a normal failure is not requeued and keeps its exit status
    (tmp_path / "scontrol.log").unlink()
    rc, out, sc = _run_script(tmp_path, "exit 3\n")
    assert rc == 3 and sc == ""
    rc, out, sc = _run_script(tmp_path, "exit 75\n")
    assert rc == 0 and sc.strip() == "requeue 4242"


def test_tpu_vm_script_is_a_dry_run():
    p = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), "all"], capture_output=True, text=True,
                       env=dict(os.environ, ACCEL="v4-32", CONFIG="configs/phase9.py:cond3", PATH="/usr/bin:/bin"))
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("gcloud ")]
    assert lines[0].startswith("gcloud compute tpus tpu-vm create fmbpo-tpu") and "--accelerator-type=v4-32" in lines[0]
    train = shlex.split(lines[-1])
    assert "--worker=all" in train and any("--multihost" in a and "configs/phase9.py:cond3" in a for a in train)


def test_gpu_bench_script_runs_valid_bench_commands(tmp_path):
    """launch/gpu_bench.sh with a stub interpreter: every bench command it would run parses, the 12 rows come
    in priority order (bf16 first, 30 tasks first), and the main pass pipelines under the fast-compile flags."""
    log = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nif [ "$1" = -m ]; then printf "%s\\0" "XLA_FLAGS=$XLA_FLAGS" "$@" >> "$LOG"; '
                    'printf "\\n" >> "$LOG"; fi\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), LOG=str(log), PATH="/usr/bin:/bin", XLA_FLAGS="")
    p = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_bench.sh"), str(tmp_path / "b.json")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    calls = [c.strip("\n").split("\0") for c in log.read_text().split("\0\n") if c.strip("\n")]
    assert len(calls) == 2  # main pass + autotune probe
    from fmbpo_jax import bench

    (flags, m, mod, *argv), (flags2, _, _, *argv2) = calls
    assert (m, mod) == ("-m", "fmbpo_jax.bench")
    assert "--xla_gpu_enable_triton_gemm=false" in flags and "--xla_gpu_autotune_level=0" in flags
    assert "triton" not in flags2  # the probe keeps XLA's default GEMM autotuning
    a, a2 = bench.parse_args(argv), bench.parse_args(argv2)
    plan = bench.row_plan(a)
    assert len(plan) == 12 and len(set(plan)) == 12 and a.pipeline and a.compile_workers > 1
    assert {(v, t, x) for v, _, t, x in plan} == set(itertools.product(
        ["baseline-frozen", "baseline-finetune", "fullflow-finetune-k8k4"], [1, 30], ["bf16", "fp32-highest"]))
    assert [x for *_, x in plan] == ["bf16"] * 6 + ["fp32-highest"] * 6 and plan[0] == ("baseline-frozen", "48M", 30, "bf16")
    # 48M full flow K8/K4 x 30 tasks in lax.map groups of 3 (groups of 10 needed 164-177 GB on an H200)
    assert {k: c for k, c in a.row_chunks.items()} == {("fullflow-finetune-k8k4", "48M", 30, "bf16"): 3,
                                                       ("fullflow-finetune-k8k4", "48M", 30, "fp32-highest"): 3}
    assert a.finetune_task_chunk == 10
    assert a.json == str(tmp_path / "b.json") and a2.json == str(tmp_path / "b_autotune.json") and not a2.pipeline
