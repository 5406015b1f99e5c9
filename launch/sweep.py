"""SLURM sweep generator for the experiment phases (the run matrix of docs/phases.md).

    python -m launch.sweep --phase 6 --variants baseline,fullflow --seeds 42,123,456 \
        [--epochs 15000,50000] [--tasks reference|all|a,b,c] [--array] [--split-seeds] \
        [--template single_gpu|multi_gpu|multi_node] [--out launch/out] [--submit]

Our trainer runs every (seed, task) pair of a config in ONE program, so the natural unit is one job per
(phase, variant, epochs) with all seeds inside (`--config.seeds=42,123,456`); `--split-seeds` makes one
job per seed instead (each with its own `--config.seeds=S`, never a shared default: the reference's B11).

Dry run by default: the scripts are written into --out (and nothing anywhere else) and the sbatch
commands are printed. `--submit` creates the log folder and runs them.

Naming (documented in docs/cluster.md):
  run / job name   phase{P}_{variant}[_{E}k][_s{seed}]        e.g. phase6_fullflow_50k, phase9_cond2_s123
  workdir          {runs}/{run name}                          checkpoints, metrics.jsonl, eval.jsonl, results.csv
  log (one job)    {logs}/{run name}_%j.out                   %j = job id (a requeued job appends to it)
  log (array)      {logs}/phase{P}_{variant}_%A_%a.out        %A = array job id, %a = element; index.tsv maps %a
  script           {out}/{run name}.sbatch | {out}/phase{P}_{variant}[_{gpu}].array.sbatch
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shlex
import subprocess
import sys
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TEMPLATES = os.path.join(HERE, "templates")

REF_TASKS = ("reacher-easy", "walker-stand", "cheetah-run")  # the reference's tasks, common to all phases but 5 and 8
REF_SEEDS = (42, 123, 456)
PWM_CKPT = "checkpoints/mt30_48M_4900000.pt"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One row group of the run matrix (docs/phases.md)."""

    config: str  # configs/phaseN.py
    variants: tuple[str, ...]  # '' = the config takes no variant argument
    epochs: tuple[int, ...]  # default sweep; () = not a policy phase (phase 8 pretraining)
    tasks: tuple[str, ...] | str = REF_TASKS  # 'all' = MT30
    eval_freq: int = 200
    checkpoint: str = ""  # 'pwm' | 'phase8' | ''
    gpu: str = "h100"
    gpu_by_epochs: dict | None = None  # epochs -> gpu type (phase 6: 100k/150k on H200)


PHASES: dict[int, Phase] = {
    3: Phase("configs/phase3.py", ("baseline", "flowpolicy"), (10_000,), checkpoint="pwm"),
    4: Phase("configs/phase4.py", ("",), (10_000,)),
    5: Phase("configs/phase5.py", ("high_precision_wm", "high_precision_policy", "euler_fast"), (15_000,),
             tasks=("walker-stand", "cheetah-run")),
    6: Phase("configs/phase6.py", ("baseline", "fullflow"), (15_000, 50_000, 100_000, 150_000), eval_freq=500,
             gpu_by_epochs={100_000: "h200", 150_000: "h200"}),
    7: Phase("configs/phase7.py", ("baseline", "flow_std", "flow_high"), (15_000,), eval_freq=500, checkpoint="pwm"),
    8: Phase("configs/phase8.py", ("mlp", "flow"), (), tasks="all"),
    9: Phase("configs/phase9.py", ("cond0", "cond1", "cond2", "cond3"), (50_000,), checkpoint="phase8", gpu="h200"),
}
# phase 4's config has no variant: its runs are named phase4_fullflow; phase 8 writes runs/phase8_{mlp,flow}_wm/wm_best,
# where phase 9 looks for its world models
VARIANT_NAME = {4: {"": "fullflow"}, 8: {"mlp": "mlp_wm", "flow": "flow_wm"}}
PHASE9_WM = {"cond0": "mlp", "cond1": "mlp", "cond2": "flow", "cond3": "flow"}


@dataclasses.dataclass
class Job:
    """One run directory = one program = one SLURM job (or one array element)."""

    phase: int
    variant: str
    epochs: int | None
    seeds: tuple[int, ...]
    name: str
    workdir: str
    argv: list[str]  # the full command line, argv[0] = 'python'
    gpu: str

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.replace(" ", "").split(",") if x)


def variant_name(phase: int, variant: str) -> str:
    return VARIANT_NAME.get(phase, {}).get(variant, variant)


def _epochs_tag(e: int) -> str:
    return f"{e // 1000}k" if e % 1000 == 0 else str(e)


def plan(phase: int, variants: Sequence[str] | None = None, seeds: Sequence[int] = REF_SEEDS, epochs: Sequence[int] | None = None,
         tasks: str = "reference", split_seeds: bool = False, runs_dir: str = "runs", dataset_dir: str = "data/mt30_store",
         checkpoint: str = PWM_CKPT, phase8_dir: str | None = None, extra: Sequence[str] = (), multihost: bool = False,
         epochs_in_name: bool | None = None) -> list[Job]:
    """The jobs of one phase: variants x epochs (x seeds with split_seeds), each with its full command line."""
    if phase not in PHASES:
        raise SystemExit(f"--phase {phase}: known phases {sorted(PHASES)}")
    ph = PHASES[phase]
    variants = tuple(variants) if variants else ph.variants
    names = {variant_name(phase, v): v for v in ph.variants}
    unknown = [v for v in variants if v not in ph.variants and v not in names]
    if unknown:
        raise SystemExit(f"--variants {','.join(unknown)}: phase {phase} has {', '.join(names)}")
    variants = tuple(names.get(v, v) for v in variants)
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {seeds}: give distinct seeds")
    if phase == 8:
        if epochs:
            raise SystemExit("--epochs: phase 8 pretrains the WM for --config.pretrain.iters; set it with --set")
        epoch_list: tuple = (None,)
        split_seeds = True  # pretraining is one seed per job
    else:
        epoch_list = tuple(epochs) if epochs else ph.epochs
    if epochs_in_name is None:
        epochs_in_name = len(ph.epochs) > 1 or set(epoch_list) != set(ph.epochs)
    if tasks == "reference":
        task_arg = ph.tasks if isinstance(ph.tasks, str) else ",".join(ph.tasks)
    else:
        task_arg = tasks
    phase8_dir = phase8_dir if phase8_dir is not None else runs_dir
    seed_groups = [(s,) for s in seeds] if split_seeds else [seeds]
    jobs = []
    for v, e, sg in itertools.product(variants, epoch_list, seed_groups):
        vname = variant_name(phase, v)
        name = f"phase{phase}_{vname}" + (f"_{_epochs_tag(e)}" if e is not None and epochs_in_name else "") \
            + (f"_s{sg[0]}" if split_seeds and phase != 8 else "")
        workdir = os.path.join(runs_dir, name)
        argv = ["python", "-m", "fmbpo_jax.main", f"--config={ph.config}" + (f":{v}" if v else "")]
        if e is not None:
            argv.append(f"--config.epochs={e}")
        argv.append(f"--config.seeds={','.join(map(str, sg))}")
        if phase == 8:
            argv.append(f"--config.pretrain.seed={sg[0]}")
        argv += [f"--workdir={workdir}", f"--config.tasks={task_arg}", f"--config.data.dataset_dir={dataset_dir}"]
        if ph.checkpoint == "pwm":
            argv.append(f"--config.checkpoint={checkpoint}")
        elif ph.checkpoint == "phase8":
            argv.append(f"--config.checkpoint={os.path.join(phase8_dir, f'phase8_{PHASE9_WM[v]}_wm', 'wm_best')}")
        argv += [f"--config.{kv}" for kv in extra]
        if multihost:
            argv.append("--multihost")
        gpu = (ph.gpu_by_epochs or {}).get(e, ph.gpu)
        jobs.append(Job(phase, vname, e, sg, name, workdir, argv, gpu))
    return jobs


# ============================================================================================ scripts


def _read(name: str) -> str:
    with open(os.path.join(TEMPLATES, name)) as f:
        return f.read()


def _gres(gpu: str, n: int, gpu_type: str | None) -> str:
    t = gpu if gpu_type is None else gpu_type
    return f"gpu:{n}" if t in ("", "none", "any") else f"gpu:{t}:{n}"


def render(template: str, *, job_name: str, log: str, jobs: list[Job], array: bool, repo: str, cpus: int, mem: str,
           gres: str, time: str, nodes: int = 1, setup: str = "", extra_sbatch: Sequence[str] = ()) -> str:
    """One sbatch script: a single job, or a job array whose element i runs jobs[i]."""
    sb = list(extra_sbatch)
    if array:
        sb.insert(0, f"--array=0-{len(jobs) - 1}")
    def sel(j: Job) -> str:
        return f"RUN_NAME={shlex.quote(j.name)}; WORKDIR={shlex.quote(j.workdir)}; CMD=({j.command})"
    if array:
        cases = "\n".join(f"  {i}) {sel(j)} ;;" for i, j in enumerate(jobs))
        select = (f'case "${{SLURM_ARRAY_TASK_ID:?this script is a job array}}" in\n{cases}\n'
                  f'  *) echo "no run for array index $SLURM_ARRAY_TASK_ID"; exit 2 ;;\nesac')
    else:
        (j,) = jobs
        select = sel(j)
    body = _read("body.sh")
    body = body.replace("@@SETUP@@", setup or "# environment: pass --setup 'module load ...; source .venv/bin/activate'")
    body = body.replace("@@SELECT@@", select)
    body = body.replace("@@LAUNCH@@", "srun --kill-on-bad-exit=1 " if template == "multi_node" else "")
    out = _read(f"{template}.sbatch")
    for k, v in dict(JOB_NAME=job_name, LOG=log, REPO=repo, CPUS=str(cpus), MEM=mem, GRES=gres, TIME=time, NODES=str(nodes),
                     EXTRA_SBATCH="\n".join(f"#SBATCH {s}" for s in sb), BODY=body).items():
        out = out.replace(f"@@{k}@@", v)
    return out.replace("\n\n\n", "\n\n")


def write_scripts(jobs: list[Job], args) -> list[tuple[str, list[Job]]]:
    """Write the sbatch scripts into args.out; returns [(script path, jobs)]."""
    os.makedirs(args.out, exist_ok=True)
    n_gpus = args.gpus if args.template != "single_gpu" else 1
    common = dict(repo=args.repo, cpus=args.cpus, mem=args.mem, time=args.time, nodes=args.nodes, setup=args.setup,
                  extra_sbatch=[f"--partition={args.partition}"] * bool(args.partition)
                  + [f"--account={args.account}"] * bool(args.account) + list(args.sbatch))
    written = []
    if args.array:
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            groups.setdefault((j.phase, j.variant, j.gpu), []).append(j)
        for (p, v, gpu), js in groups.items():
            multi_gpu_types = sum(1 for k in groups if k[:2] == (p, v)) > 1
            stem = f"phase{p}_{v}" + (f"_{gpu}" if multi_gpu_types else "")
            path = os.path.join(args.out, f"{stem}.array.sbatch")
            text = render(args.template, job_name=stem, log=os.path.join(args.log_dir, f"phase{p}_{v}_%A_%a.out"), jobs=js,
                          array=True, gres=_gres(gpu, n_gpus, args.gpu_type), **common)
            _write(path, text)
            _write(os.path.join(args.out, f"{stem}.index.tsv"),
                   "".join(f"{i}\t{j.name}\t{j.workdir}\t{j.command}\n" for i, j in enumerate(js)))
            written.append((path, js))
    else:
        for j in jobs:
            path = os.path.join(args.out, f"{j.name}.sbatch")
            text = render(args.template, job_name=j.name, log=os.path.join(args.log_dir, f"{j.name}_%j.out"), jobs=[j],
                          array=False, gres=_gres(j.gpu, n_gpus, args.gpu_type), **common)
            _write(path, text)
            written.append((path, [j]))
    return written


def _task_count(job: Job) -> int | None:
    """Tasks of a job's command line (None: all 30)."""
    t = next(a.split("=", 1)[1] for a in job.argv if a.startswith("--config.tasks="))
    return None if t in ("all", "mt30", "") else len(t.split(","))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    if path.endswith(".sbatch"):
        os.chmod(path, 0o755)


# =============================================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", type=int, required=True, help=f"one of {sorted(PHASES)} (docs/phases.md)")
    p.add_argument("--variants", default="", help="comma-separated (default: every variant of the phase)")
    p.add_argument("--seeds", default=",".join(map(str, REF_SEEDS)), help="comma-separated, distinct (default 42,123,456)")
    p.add_argument("--epochs", default="", help="comma-separated policy epochs (default: the phase's run matrix)")
    p.add_argument("--tasks", default="reference",
                   help="'reference' (the matrix's tasks: reacher-easy,walker-stand,cheetah-run; phase 5 two; phase 8 all), "
                        "'all' (MT30) or comma-separated names")
    p.add_argument("--split-seeds", action="store_true", help="one job per seed instead of all seeds in one job")
    p.add_argument("--array", action="store_true", help="one job array per (phase, variant, GPU type) instead of one sbatch per job")
    p.add_argument("--template", choices=("single_gpu", "multi_gpu", "multi_node"), default="single_gpu")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (multi_gpu, multi_node)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (multi_node)")
    p.add_argument("--gpu-type", default=None, help="gres type for every job, e.g. a100 or 'none' (default: the matrix's h100/h200)")
    p.add_argument("--cpus", type=int, default=16)
    p.add_argument("--mem", default="450G")
    p.add_argument("--time", default="24:00:00", help="per job; preempted or timed-out jobs checkpoint and requeue")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH line, e.g. --sbatch=--qos=high (repeatable)")
    p.add_argument("--setup", default="", help="shell lines run before training, e.g. 'source .venv/bin/activate'")
    p.add_argument("--runs-dir", default="runs", help="workdirs: RUNS_DIR/<run name> (relative to --repo)")
    p.add_argument("--log-dir", default="logs", help="SLURM logs (relative to --repo)")
    p.add_argument("--dataset-dir", default=os.environ.get("FMBPO_DATASET_DIR", "data/mt30_store"))
    p.add_argument("--checkpoint", default=PWM_CKPT, help="phases 3 and 7: the pretrained PWM/TD-MPC2 WM")
    p.add_argument("--phase8-dir", default=None, help="phase 9: where phase8_{mlp,flow}_wm/wm_best live (default --runs-dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra --config.KEY=VALUE (repeatable)")
    p.add_argument("--repo", default=REPO, help="the checkout the jobs run in (#SBATCH --chdir)")
    p.add_argument("--out", default=os.path.join("launch", "out"), help="where the scripts are written")
    p.add_argument("--submit", action="store_true", help="run sbatch (default: dry run, print the commands)")
    return p


def main(argv: Sequence[str] | None = None) -> list[tuple[str, list[Job]]]:
    args = build_parser().parse_args(argv)
    if args.template == "multi_node" and args.nodes < 2:
        raise SystemExit("--template multi_node: give --nodes >= 2")
    jobs = plan(args.phase, [v for v in args.variants.split(",") if v] or None, _ints(args.seeds), _ints(args.epochs) or None,
                args.tasks, args.split_seeds, args.runs_dir, args.dataset_dir, args.checkpoint, args.phase8_dir, args.set,
                multihost=args.template == "multi_node")
    written = write_scripts(jobs, args)
    mode = "submitting" if args.submit else "dry run (add --submit to run these)"
    n_tasks = 30 if jobs and _task_count(jobs[0]) is None else _task_count(jobs[0]) if jobs else 0
    print(f"# phase {args.phase}: {len(jobs)} job(s), {sum(len(j.seeds) for j in jobs) * n_tasks} (seed, task) runs; {mode}")
    if args.submit:
        os.makedirs(os.path.join(args.repo, args.log_dir), exist_ok=True)
    for path, js in written:
        print(f"sbatch {shlex.quote(path)}")
        for i, j in enumerate(js):
            print(f"#   {'[' + str(i) + '] ' if args.array else ''}{j.name}: {j.command}")
        if args.submit:
            subprocess.run(["sbatch", path], check=True)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
