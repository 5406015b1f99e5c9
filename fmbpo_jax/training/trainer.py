"""The policy trainer: every (seed, task) run of a RunPlan in one compiled program, driven chunk by chunk.

    Trainer(plan, workdir).run()
      setup      pretrained WM, data feed, per-run state on the run axis, resume from the last checkpoint
      loop       lifecycle.run_chunks: train_chunk (jitted chunk of epochs -> logs, NaN guard, evaluations),
                 save on the checkpoint clock / at the end / after SIGTERM (then Preempted)
      finish     final plain + planning evaluations, results.csv and summary.md

The loop's clocks are the plan's Cadence (should_eval / should_save / should_diagnose); everything it does with the
run axis (padding, sharding, gathering, several processes) goes through sharding.RunAxis; what happens inside one
jitted call is training.program. Several processes (jax.distributed): each feeds and evaluates only the runs on
its devices; metrics and scores are gathered so every process sees all runs, and only process 0 writes and prints.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import bundle, run_config
from fmbpo_jax import world_model as wm
from fmbpo_jax.run_config import ConfigError, RunPlan
from fmbpo_jax.sharding import RunAxis
from fmbpo_jax.training import feed, memory, program
from fmbpo_jax.training.evaluation import Evaluation
from fmbpo_jax.training.lifecycle import (Checkpointer, OutOfDeviceMemory, Preempted, SigtermFlag, TrainingStopped,
                                          out_of_memory_advice, run_chunks)
from fmbpo_jax.training.runlog import RunLog, eta_string, metrics_rows

Params = dict[str, Any]


def train(config, workdir: str, *, on_metrics: Callable | None = None, on_eval: Callable | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Train every (seed, task) run of `config` (an ml_collections config or a RunPlan) in one program; resume from
    `workdir` if it holds a checkpoint.

    Returns {'results': per-run rows, 'epoch': epochs done}. Raises Preempted after checkpointing on SIGTERM.
    on_metrics / on_eval: called with each chunk's metrics rows / each evaluation's rows (e.g. wandb).
    """
    return Trainer(run_config.as_plan(config), workdir, on_metrics=on_metrics, on_eval=on_eval, log=log).run()


def load_pretrained_wm(plan: RunPlan) -> tuple[RunPlan, Params | None]:
    """(the plan with the checkpoint's WM architecture, its params) from --config.checkpoint; (plan, None) when unset.

    A bundle directory or a file a reader is installed for (PyTorch .pt: convert_ckpt's); see fmbpo_jax.bundle.
    """
    path = plan.checkpoint
    if not path:
        return plan, None
    if not os.path.exists(path):
        raise ConfigError(f"--config.checkpoint={path!r} does not exist (see README 'Bring your own checkpoint')")
    try:
        ck_cfg, params = bundle.load_world_model(path)
    except bundle.BundleError as e:
        raise ConfigError(f"--config.checkpoint={path!r}: {e}") from None
    return plan.with_world_model(ck_cfg, path), jax.tree_util.tree_map(jnp.asarray, params)


def _silent(_: str) -> None:
    pass


class Trainer:
    """One training job: set up in the constructor, `run()` trains, checkpoints, evaluates and returns the results.

    State between chunks: `state` (padded per-run training state, donated to each call), `epoch`, `elapsed`
    (training seconds, continued across restarts), `evaluation` (best params, evaluation history).
    """

    def __init__(self, plan: RunPlan, workdir: str, *, on_metrics: Callable | None = None,
                 on_eval: Callable | None = None, log: Callable[[str], None] = print):
        self.workdir = workdir
        main_process = jax.process_index() == 0
        self.log = log if main_process else _silent
        self.on_metrics = on_metrics
        plan, pretrained = load_pretrained_wm(plan)
        plan.check_devices(jax.device_count())
        self.plan = plan
        os.makedirs(workdir, exist_ok=True)
        if main_process:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(plan.config_json)
        late = run_config.set_deterministic_xla(plan.deterministic)  # the main job set it before jax started
        if late:
            self.log(f"warning: {late}")
        # The run axis is sharded over every device of every process ('task' mesh axis), padded with dummy runs to
        # a multiple of the 'task' size; checkpoints hold only the R real runs and restore onto any device count.
        self.axis = RunAxis.create(plan.spec.num_runs, plan.data_parallel)
        mode, data = feed.open_data(plan.data, plan.spec, plan.behaviours["episode_subsampling"], plan.pwm.horizon,
                                    multiprocess=self.axis.multiprocess)
        plan.check_sampler(mode)
        self.runlog = RunLog(workdir, write=main_process)
        self.checkpointer = Checkpointer(workdir)
        self._init_state(pretrained, on_eval)
        self._restore()
        self.feed = feed.make_feed(plan, mode, data, self.axis, first_chunk=self.epoch // plan.cadence.chunk_epochs)
        self.programs: dict[int, Callable] = {}  # epochs per call -> the jitted, sharded chunk program
        self.task_chunk = self._choose_task_chunk()
        self.diagnose = None
        if plan.cadence.diagnostics_freq:
            d = plan.diagnostics
            self.diagnose = program.make_diagnostics_fn(plan.pwm, plan.batch_size, d.num_groups, d.num_probes, d.jac_samples)
        self.evaluation.start()

    # ------------------------------------------------------------------------------------- setup

    def _init_state(self, pretrained: Params | None, on_eval: Callable | None) -> None:
        """Fresh per-run state (unpadded [R, ...], placed as a checkpoint holds it), the shared frozen WM, best params."""
        plan = self.plan
        if plan.pwm.finetune_wm:
            frozen = None
            start_wm = pretrained
        else:  # B11 quirk: without a checkpoint the frozen WM is a random one
            frozen = pretrained if pretrained is not None else wm.init(plan.pwm.wm, jax.random.PRNGKey(plan.spec.seeds[0]))
            start_wm = None
        state = program.init_runs(plan.pwm, program.run_keys(plan.spec), start_wm)
        self.frozen_wm = None if frozen is None else self.axis.replicate(frozen)
        # evaluation runs per process, outside the mesh: several processes evaluate with their own copy
        eval_wm = frozen if self.axis.multiprocess else self.frozen_wm
        self.evaluation = Evaluation(plan, self.axis, state, eval_wm, self.runlog, on_eval, self.log)
        self.state = self.axis.place_unpadded(state)
        self.epoch, self.elapsed = 0, 0.0

    def _restore(self) -> None:
        """Continue from the workdir's last checkpoint (if any); then pad the state onto the run axis."""
        if self.checkpointer.latest_step() is not None:
            target = self.axis.restore_target({"state": self.state, "best": self.evaluation.best})
            tree, meta = self.checkpointer.restore(target)
            self.state = tree["state"]
            self.evaluation.restore(tree["best"], meta)
            self.epoch, self.elapsed = int(meta["epoch"]), float(meta["elapsed"])
            self.runlog.resume_at(self.epoch, meta["last_eval_epoch"])
            self.log(f"resumed from {self.workdir} at epoch {meta['epoch']}")
        self.state = self.axis.place(self.state)

    def _choose_task_chunk(self) -> int:
        """--config.task_chunk, or with -1 the largest group of runs whose compiled step fits the memory budget."""
        plan = self.plan
        if plan.task_chunk != -1:
            return plan.task_chunk
        n0 = min(plan.cadence.chunk_epochs, max(1, plan.epochs - self.epoch))
        compiled: dict[int, Any] = {}
        task_chunk = memory.choose_task_chunk(self.axis.padded, functools.partial(self._program_bytes, n0, compiled),
                                              memory.device_memory_budget(plan.task_chunk_memory_gb), self.log)
        if task_chunk in compiled:
            self.programs[n0] = compiled[task_chunk]  # the compiled step of the first chunk: not compiled twice
        self.log(f"task_chunk=-1: using --config.task_chunk={task_chunk}")
        return task_chunk

    def _program_bytes(self, n: int, compiled: dict, task_chunk: int) -> int | None:
        with jax.default_matmul_precision(self.plan.matmul_precision):
            compiled[task_chunk] = self.feed.program(n, task_chunk).lower(self.state, self.frozen_wm,
                                                                          *self.feed.args(n)).compile()
        return memory.program_bytes(compiled[task_chunk])

    def program(self, n: int) -> Callable:
        """The jitted chunk of n epochs (n < chunk_epochs for a last, shorter chunk)."""
        if n not in self.programs:
            self.programs[n] = self.feed.program(n, self.task_chunk)
        return self.programs[n]

    # ------------------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Train to plan.epochs; returns {'results': per-run rows, 'epoch': epochs done}; Preempted after a SIGTERM."""
        plan = self.plan
        self.t_start = time.time() - self.elapsed  # total_time in the logs continues across restarts
        try:
            with SigtermFlag() as self.sigterm, jax.default_matmul_precision(plan.matmul_precision):
                if self.evaluation.due(self.epoch) and self.evaluation.last_epoch < self.epoch:
                    self.evaluation.submit(self.epoch, self.state)  # the reference evaluates at i = 0 too
                self.epoch, stopped = run_chunks(self.epoch, plan.epochs, plan.cadence.chunk_epochs, self.train_chunk,
                                                 self.save, plan.cadence.should_save, self.should_stop)
        finally:
            self.feed.close()
        if stopped:
            self.evaluation.close()
            self.checkpointer.close()
            raise Preempted(f"SIGTERM: checkpointed at epoch {self.epoch} in {self.workdir}; rerun the same command to resume")
        self.evaluation.wait()
        results = self.evaluation.final(self.state, self.workdir)
        self.evaluation.close()
        self.checkpointer.close()
        return {"results": results, "epoch": self.epoch}

    def train_chunk(self, epoch: int, n: int) -> None:
        """Epochs [epoch, epoch + n): one jitted call, then its logs, the NaN guard and the evaluations due."""
        plan = self.plan
        t0 = time.time()
        self.state, metrics = self._call(n)
        metrics = self.axis.gather_metrics(metrics)
        rows = metrics_rows(plan.spec, metrics, epoch, plan.cadence.log_freq, time.time() - self.t_start)
        end = epoch + n
        self.runlog.metrics(rows)
        if self.diagnose is not None and plan.cadence.should_diagnose(end):
            self.write_diagnostics(end)
        if self.on_metrics and rows:
            self.on_metrics(rows)
        self.check_nan(metrics)
        self.log_speed(end, n, time.time() - t0, metrics)
        self.evaluation.collect()
        if self.evaluation.due(end) and end < plan.epochs:
            self.evaluation.submit(end, self.state)
        self.epoch, self.elapsed = end, time.time() - self.t_start

    def _call(self, n: int) -> tuple[dict, dict]:
        """(state, metrics [n, R_pad]); XLA's out-of-memory error becomes one naming the flags that shrink the step."""
        try:
            return self.program(n)(self.state, self.frozen_wm, *self.feed.args(n))
        except Exception as e:  # noqa: BLE001 - only an out-of-memory error is rewritten, anything else re-raised
            advice = out_of_memory_advice(e, self.axis.per_device, self.task_chunk, self.plan.pwm.remat)
            if advice is None:
                raise
            raise OutOfDeviceMemory(advice) from e

    def write_diagnostics(self, epoch: int) -> None:
        diag = self.diagnose(self.state, self.frozen_wm, *self.feed.data_args())  # device data: check_sampler
        self.runlog.diagnostics(metrics_rows(self.plan.spec, {k: v[None] for k, v in diag.items()}, epoch, 1,
                                             time.time() - self.t_start))

    def check_nan(self, metrics: dict) -> None:
        """TrainingStopped when a run skipped max_nan_skips updates in a row for non-finite values."""
        streak = self.axis.gather(self.state.nan_streak)
        if streak.max() < self.plan.max_nan_skips:
            return
        r = int(streak.argmax())
        wm_skips = float(np.asarray(metrics.get("wm_nan_skips", np.zeros(1)))[-1].max())
        what = "world-model loss/gradients" if wm_skips > 0 else "actor loss/gradients"
        raise TrainingStopped(f"run {self.plan.spec.run_name(r)}: {int(streak[r])} consecutive updates skipped for "
                              f"non-finite {what} (--config.max_nan_skips={self.plan.max_nan_skips})")

    def log_speed(self, epoch: int, n: int, seconds: float, metrics: dict) -> None:
        eps = n / max(seconds, 1e-9)
        epochs = self.plan.epochs
        self.log(f"[epoch {epoch}/{epochs}] {eps:.2f} epochs/s, {eps * self.plan.spec.num_runs:.1f} task-epochs/s, "
                 f"ETA {eta_string((epochs - epoch) / eps)}, actor_loss {float(np.mean(np.asarray(metrics['actor_loss'])[-1])):.4g}")

    def should_stop(self) -> bool:
        """A SIGTERM on any process stops them all (a collective: every process takes the same branch)."""
        return self.axis.any(self.sigterm.flag)

    def save(self, epoch: int) -> None:
        """Checkpoint the R real runs, the best params and the bookkeeping of the evaluations recorded so far.

        It does not wait for an evaluation of THIS epoch in flight (at 30 tasks one takes about as long as 500 epochs
        of phase 3): its result is recorded when it arrives, and a run resumed from this checkpoint evaluates this
        epoch again. An evaluation of an earlier epoch could not be redone from here, so that one is waited for.
        """
        self.evaluation.collect()
        if self.evaluation.recorded_epoch < self.evaluation.last_epoch < epoch:
            self.evaluation.wait()
        ev = self.evaluation.meta()
        meta = {"epoch": self.epoch, "last_eval_epoch": ev["last_eval_epoch"], "elapsed": self.elapsed, "evals": ev["evals"]}
        self.checkpointer.save(epoch, {"state": self.axis.unpad(self.state), "best": self.evaluation.best}, meta)
