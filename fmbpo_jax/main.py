"""The main job: `python -m fmbpo_jax.main --config=configs/phase3.py [--config.key=value ...] [--workdir=DIR]`.

Without --config it runs configs/demo.py, which needs no dataset or checkpoint. A run restarted with
the same --workdir resumes from its last checkpoint. Exit codes: 0 done, 2 bad config, 75 preempted
(SIGTERM: checkpointed; requeue the same command).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

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

    def __init__(self, config, mode: str, workdir: str):
        self.run = None
        if mode == "disabled":
            return
        import jax
        import wandb

        if jax.process_index() != 0:
            return
        c = config
        name = (f"{c.name}_seed{c.seeds.replace(',', '-')}_H{c.alg.horizon}_K{c.model.wm_substeps if c.world_model == 'flow' else 0}"
                f"_Kpol{c.model.actor_substeps if c.actor == 'flow' else 0}")
        self.run = wandb.init(project=c.wandb.project, entity=c.wandb.entity or None, name=name, mode=mode,
                              dir=workdir, config=c.to_dict())

    def metrics(self, rows):
        if self.run is not None:
            for r in rows:
                self.run.log({f"{r['task']}/seed{r['seed']}/{k}": v for k, v in r.items() if k not in ("task", "seed")} | {"epoch": r["epoch"]})

    def evals(self, rows):
        self.metrics(rows)

    def close(self):
        if self.run is not None:
            self.run.finish()


def main(argv):
    del argv
    from fmbpo_jax.run_config import ConfigError
    from fmbpo_jax.train import EXIT_REQUEUE, Preempted, TrainingStopped

    config = _CONFIG.value
    from fmbpo_jax.run_config import apply_xla_flags

    apply_xla_flags(config)  # before jax starts its backends (below), the only time XLA reads XLA_FLAGS
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it renames at INFO
    from fmbpo_jax import sharding

    try:
        dist = distributed_kwargs(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    sharding.initialize_distributed(_MULTIHOST.value, **dist)  # also when SLURM / a TPU slice runs several processes
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    sink = WandbSink(config, _WANDB.value, workdir)
    try:
        if config.mode == "demo":
            from fmbpo_jax.demo import run_demo

            run_demo(config, workdir)
        elif config.mode == "pretrain_wm":
            from fmbpo_jax.pretrain import pretrain_wm

            out = pretrain_wm(config, workdir)
            print(f"best wm_loss {out['best_wm_loss']:.4f} -> {out['best_dir']}")
        else:
            from fmbpo_jax.train import train

            train(config, workdir, on_metrics=sink.metrics, on_eval=sink.evals)
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
