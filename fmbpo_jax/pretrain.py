"""Phase 8: world-model pretraining on all selected tasks (multitask batches, task id per sequence).

The reference keeps `{name}_best.pt` by the loss of ONE training batch checked every 1000 iterations (B15);
we keep the best by the mean loss of the last `best_every` iterations, which ranks checkpoints by far
less noise. Unlike the reference, a killed pretraining run resumes where it stopped. Outputs are bundle
directories (`wm_best/`, `wm_last/`, fmbpo_jax.bundle) that `--config.checkpoint` and `python -m convert_ckpt export`
accept. The loop skeleton, checkpointer and SIGTERM handling are the policy trainer's (training.lifecycle).
"""
from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import bundle, pwm, run_config
from fmbpo_jax.data.sampler import WindowData
from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.run_config import ConfigError, RunPlan
from fmbpo_jax.training import feed
from fmbpo_jax.training.lifecycle import Checkpointer, Preempted, SigtermFlag, every, run_chunks
from fmbpo_jax.training.program import sample_run
from fmbpo_jax.textio import append_jsonl, read_jsonl, truncate_jsonl


def sample_multitask(data: WindowData, key: jax.Array, batch_size: int, horizon: int) -> dict:
    """B windows drawn uniformly over all episode entries of all tasks; task ids [B] per sequence (time-major)."""
    k_task, k_win = jax.random.split(key)
    # task row of each window, proportional to its episode count (uniform over episodes)
    probs = data.num_entries.astype(jnp.float32) / jnp.sum(data.num_entries)
    pos = jax.random.choice(k_task, data.num_entries.shape[0], (batch_size,), p=probs)
    one = jax.vmap(lambda p, k: sample_run(data, p, k, 1, horizon))(pos, jax.random.split(k_win, batch_size))
    batch = {k: v[:, :, 0] for k, v in one.items()}  # [B, T, ...]
    batch = {k: jnp.swapaxes(v, 0, 1) for k, v in batch.items()}  # time-major
    batch["task"] = data.task_ids[pos]
    return batch


def make_pretrain_chunk(cfg: pwm.PWMConfig, num_iters: int, batch_size: int) -> Callable:
    def chunk(state, data, key):
        def body(st, k):
            kb, ku = jax.random.split(k)
            return pwm.wm_pretrain_step(cfg, st, sample_multitask(data, kb, batch_size, cfg.horizon), ku)

        return jax.lax.scan(body, state, jax.random.split(key, num_iters))

    return jax.jit(chunk, donate_argnums=(0,))


def save_wm(cfg: pwm.PWMConfig, params, dst: str, tasks: list[str], info: dict) -> None:
    bundle.save_world_model(cfg.wm, params, dst, tasks,
                            {"obs_dim": cfg.wm.obs_dim, "act_dim": cfg.wm.action_dim, "horizon": cfg.horizon, **info})


def pretrain_wm(config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Train the WM for pretrain.iters steps; write wm_best/ and wm_last/ in workdir. Returns a summary.

    config: an ml_collections config or a RunPlan. Resumable: the WM, its Adam state and the best-so-far params
    are checkpointed (orbax, atomic) every `pretrain.checkpoint_every` iterations, at the end and on SIGTERM (then
    `Preempted` is raised); a rerun with the same workdir continues from the last checkpoint and ends bitwise
    identical to an uninterrupted run.
    """
    return Pretrainer(run_config.as_plan(config), workdir, log).run()


class Pretrainer:
    """One WM pretraining job: the WM state, the best params by mean loss, and the loop's steps as methods."""

    def __init__(self, plan: RunPlan, workdir: str, log: Callable[[str], None] = print):
        self.plan, self.workdir, self.log = plan, workdir, log
        os.makedirs(workdir, exist_ok=True)
        mode, self.data = feed.open_data(plan.data, plan.spec, plan.behaviours["episode_subsampling"], plan.pwm.horizon)
        if mode != "device":
            raise ConfigError("--config.data.sampler: WM pretraining samples in-program; use 'device' (or a smaller task set)")
        k_init, self.k_run = jax.random.split(jax.random.PRNGKey(plan.pretrain.seed))
        self.state = pwm.wm_pretrain_init(plan.pwm, k_init)
        self.programs: dict[int, Callable] = {}
        self.log_path = os.path.join(workdir, "pretrain.jsonl")
        self.tasks = [MT30_TASKS[t] for t in plan.spec.task_ids]
        self.best, self.best_params, self.done, self.elapsed = float("inf"), None, 0, 0.0
        self.checkpointer = Checkpointer(workdir)
        if self.checkpointer.latest_step() is not None:
            self._restore()

    def _restore(self) -> None:
        tree, meta = self.checkpointer.restore({"state": self.state, "best_params": self.state.wm})
        self.state, self.done, self.elapsed = tree["state"], int(meta["iter"]), float(meta["elapsed"])
        if meta["best"] is not None:
            self.best, self.best_params = float(meta["best"]), tree["best_params"]
        truncate_jsonl(self.log_path, lambda r: r["iter"] <= self.done)  # rows logged after that checkpoint are redone
        self.log(f"resumed WM pretraining from {self.workdir} at iter {self.done}")

    def program(self, n: int) -> Callable:
        """`n` iterations per call (best_every; a shorter last call when iters is not a multiple)."""
        if n not in self.programs:
            self.programs[n] = make_pretrain_chunk(self.plan.pwm, n, self.plan.pretrain.batch_size)
        return self.programs[n]

    def run(self) -> dict:
        p = self.plan.pretrain
        self.t0 = time.time() - self.elapsed  # elapsed_sec in the log continues across restarts
        chunk = max(1, min(p.best_every, p.iters))  # iterations per call: the best is checked after each
        with SigtermFlag() as sigterm, jax.default_matmul_precision(self.plan.matmul_precision):
            self.done, stopped = run_chunks(self.done, p.iters, chunk, self.train_chunk, self.save,
                                            every(p.checkpoint_every), lambda: sigterm.flag)
        self.checkpointer.close()
        if stopped and self.done < p.iters:
            raise Preempted(f"SIGTERM: checkpointed WM pretraining at iter {self.done} in {self.workdir}; "
                            "rerun the same command to resume")
        save_wm(self.plan.pwm, self.state.wm, os.path.join(self.workdir, "wm_last"), self.tasks,
                {"iter": self.done, "is_best": False})
        return {"best_wm_loss": self.best, "total_iters": self.done, "total_time_sec": time.time() - self.t0,
                "history": read_jsonl(self.log_path), "best_dir": os.path.join(self.workdir, "wm_best"),
                "last_dir": os.path.join(self.workdir, "wm_last")}

    def train_chunk(self, done: int, n: int) -> None:
        """Iterations [done, done + n): one jitted call, its log row, and wm_best/ when the mean loss improved."""
        self.state, m = self.program(n)(self.state, self.data, jax.random.fold_in(self.k_run, done))
        done += n
        loss = float(np.mean(np.asarray(m["wm_loss"])))
        row = {"iter": done, "wm_loss": loss, "dynamics_loss": float(np.mean(np.asarray(m["dynamics_loss"]))),
               "reward_loss": float(np.mean(np.asarray(m["reward_loss"]))), "grad_norm": float(np.asarray(m["wm_grad_norm"])[-1]),
               "lr": self.plan.pwm.model_lr, "elapsed_sec": round(time.time() - self.t0, 2)}
        append_jsonl(self.log_path, [row])
        if loss < self.best:
            self.best = loss
            self.best_params = jax.tree_util.tree_map(jnp.array, self.state.wm)
            save_wm(self.plan.pwm, self.best_params, os.path.join(self.workdir, "wm_best"), self.tasks,
                    {"iter": done, "is_best": True, "wm_loss": loss})
        self.log(f"[pretrain {done}/{self.plan.pretrain.iters}] wm_loss {loss:.4f} (best {self.best:.4f})")
        self.done = done

    def save(self, done: int) -> None:
        kept = self.state.wm if self.best_params is None else self.best_params
        self.checkpointer.save(done, {"state": self.state, "best_params": kept},
                               {"iter": done, "best": None if self.best_params is None else self.best,
                                "elapsed": time.time() - self.t0})
