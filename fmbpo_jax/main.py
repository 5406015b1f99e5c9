"""The main job: `python -m fmbpo_jax.main --config=configs/phase3.py [--config.key=value ...] [--workdir=DIR]`.

Without --config it runs configs/demo.py, which needs no dataset or checkpoint. A run restarted with
the same --workdir resumes from its last checkpoint. Exit codes: 0 done, 2 bad config, 75 preempted
(SIGTERM: checkpointed; requeue the same command).
"""
from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fmbpo_jax import sharding
from fmbpo_jax.demo import run_demo
from fmbpo_jax.pretrain import pretrain_wm
from fmbpo_jax.run_config import ConfigError, RunPlan, set_deterministic_xla
from fmbpo_jax.training.lifecycle import EXIT_REQUEUE, Preempted, TrainingStopped
from fmbpo_jax.training.online import train_online
from fmbpo_jax.training.trainer import train

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(os.path.dirname(_HERE), "configs", "demo.py")

_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "experiment config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "run directory (checkpoints, logs, results); default runs/<config.name>")
_WANDB = flags.DEFINE_enum("wandb", "disabled", ["disabled", "offline", "online"], "wandb mode")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() at start-up")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0 (hand-started processes; SLURM/TPU detect it)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator)")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator)")


def distributed_kwargs(coordinator: str, num_processes: int, process_id: int) -> dict:
    """jax.distributed.initialize arguments from the flags: all three or none (clusters detect them)."""
    given = [bool(coordinator), num_processes > 0, process_id >= 0]
    if not any(given):
        return {}
    if not all(given):
        raise ValueError("--coordinator, --num_processes and --process_id go together (all three or none)")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


class WandbSink:
    """Forwards log rows to wandb (process 0 only); a no-op when disabled."""

    def __init__(self, plan: RunPlan, mode: str, workdir: str):
        self.run = None
        if mode == "disabled" or jax.process_index() != 0:
            return
        import wandb  # optional: only with --wandb

        p = plan
        name = (f"{p.name}_seed{'-'.join(map(str, p.spec.seeds))}_H{p.pwm.horizon}"
                f"_K{p.pwm.wm.substeps if p.pwm.wm.kind == 'flow' else 0}"
                f"_Kpol{p.pwm.actor.substeps if p.pwm.actor.kind == 'flow' else 0}")
        self.run = wandb.init(project=p.wandb_project, entity=p.wandb_entity or None, name=name, mode=mode,
                              dir=workdir, config=json.loads(p.config_json))

    def metrics(self, rows):
        if self.run is not None:
            for r in rows:
                self.run.log({f"{r['task']}/seed{r['seed']}/{k}": v for k, v in r.items() if k not in ("task", "seed")} | {"epoch": r["epoch"]})

    def evals(self, rows):
        self.metrics(rows)

    def close(self):
        if self.run is not None:
            self.run.finish()


def run(config, plan: RunPlan, workdir: str, sink: WandbSink) -> None:
    """The plan's mode. The demo composes three runs (WM pretraining, two policy variants) from the config itself."""
    if plan.mode == "demo":
        run_demo(config, workdir)
    elif plan.mode == "pretrain_wm":
        out = pretrain_wm(plan, workdir)
        print(f"best wm_loss {out['best_wm_loss']:.4f} -> {out['best_dir']}")
    elif plan.mode == "online":
        train_online(plan, workdir, on_metrics=sink.metrics, on_eval=sink.evals)
    else:
        train(plan, workdir, on_metrics=sink.metrics, on_eval=sink.evals)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it renames at INFO
    config = _CONFIG.value
    try:
        plan = RunPlan.from_config(config)  # every config error (exit code 2) before anything starts
        dist = distributed_kwargs(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:  # ConfigError is one
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    set_deterministic_xla(plan.deterministic)  # before jax starts its backends (below), the only time XLA reads XLA_FLAGS
    sharding.initialize_distributed(_MULTIHOST.value, **dist)  # also when SLURM / a TPU slice runs several processes
    workdir = _WORKDIR.value or os.path.join("runs", plan.name)
    sink = WandbSink(plan, _WANDB.value, workdir)
    try:
        run(config, plan, workdir, sink)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(EXIT_REQUEUE)
    finally:
        sink.close()


if __name__ == "__main__":
    app.run(main)
