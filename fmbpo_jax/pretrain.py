"""Phase 8: world-model pretraining on all selected tasks (multitask batches, task id per sequence).

The reference keeps `{name}_best.pt` by the loss of ONE training batch checked every 1000 iterations (B15);
we keep the best by the mean loss of the last `best_every` iterations, which ranks checkpoints by far
less noise. Unlike the reference, a killed pretraining run resumes where it stopped. Outputs are converted
checkpoint directories (`wm_best/`, `wm_last/`) that `--config.checkpoint` and `python -m convert_ckpt export` accept.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import bundle, pwm
from fmbpo_jax.data.sampler import WindowData
from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.train import sample_run


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


def save_wm(cfg, params, dst: str, tasks: list[str], info: dict) -> None:
    bundle.save_world_model(cfg.wm, params, dst, tasks,
                            {"obs_dim": cfg.wm.obs_dim, "act_dim": cfg.wm.action_dim, "horizon": cfg.horizon, **info})


def pretrain_wm(config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Train the WM for config.pretrain.iters steps; write wm_best/ and wm_last/ in workdir. Returns a summary.

    Resumable: the WM, its Adam state and the best-so-far params are checkpointed (orbax, atomic) every
    `pretrain.checkpoint_every` iterations, at the end and on SIGTERM (then `Preempted` is raised); a rerun with
    the same workdir continues from the last checkpoint and ends bitwise identical to an uninterrupted run.
    """
    import json

    import orbax.checkpoint as ocp

    from fmbpo_jax import run_config
    from fmbpo_jax.train import Preempted, SigtermFlag, open_data, read_jsonl, truncate_jsonl

    run_config.validate(config)
    p = config.pretrain
    spec = run_config.run_spec(config)
    beh = run_config.behaviours(config)
    cfg = run_config.pwm_config(config)
    os.makedirs(workdir, exist_ok=True)
    mode, data = open_data(config, spec, beh["episode_subsampling"], cfg.horizon)
    if mode != "device":
        raise run_config.ConfigError("--config.data.sampler: WM pretraining samples in-program; use 'device' (or a smaller task set)")
    key = jax.random.PRNGKey(p.seed)
    k_init, k_run = jax.random.split(key)
    state = pwm.wm_pretrain_init(cfg, k_init)
    every = max(1, min(p.best_every, p.iters))
    chunk_fns: dict[int, Callable] = {}

    def chunk_fn(n: int) -> Callable:  # `every` iterations per call; a shorter last call when iters is not a multiple
        if n not in chunk_fns:
            chunk_fns[n] = make_pretrain_chunk(cfg, n, p.batch_size)
        return chunk_fns[n]
    log_path = os.path.join(workdir, "pretrain.jsonl")
    tasks = [MT30_TASKS[t] for t in spec.task_ids]
    best, best_params, done, elapsed = float("inf"), None, 0, 0.0
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    if mngr.latest_step() is not None:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            train=ocp.args.StandardRestore({"state": state, "best_params": state["wm"]}), meta=ocp.args.JsonRestore()))
        state, meta = restored["train"]["state"], restored["meta"]
        done, elapsed = int(meta["iter"]), float(meta["elapsed"])
        if meta["best"] is not None:
            best, best_params = float(meta["best"]), restored["train"]["best_params"]
        truncate_jsonl(log_path, lambda r: r["iter"] <= done)  # rows logged after that checkpoint are redone
        log(f"resumed WM pretraining from {workdir} at iter {done}")

    t0 = time.time() - elapsed  # elapsed_sec in the log continues across restarts

    def save():
        kept = state["wm"] if best_params is None else best_params
        mngr.save(done, args=ocp.args.Composite(
            train=ocp.args.StandardSave({"state": state, "best_params": kept}),
            meta=ocp.args.JsonSave({"iter": done, "best": None if best_params is None else best,
                                    "elapsed": time.time() - t0})), force=True)
        mngr.wait_until_finished()

    with SigtermFlag() as sigterm, jax.default_matmul_precision(run_config.matmul_precision(config)):
        while done < p.iters:
            n = min(every, p.iters - done)
            state, m = chunk_fn(n)(state, data, jax.random.fold_in(k_run, done))
            done += n
            loss = float(np.mean(np.asarray(m["wm_loss"])))
            row = {"iter": done, "wm_loss": loss, "dynamics_loss": float(np.mean(np.asarray(m["dynamics_loss"]))),
                   "reward_loss": float(np.mean(np.asarray(m["reward_loss"]))), "grad_norm": float(np.asarray(m["wm_grad_norm"])[-1]),
                   "lr": cfg.model_lr, "elapsed_sec": round(time.time() - t0, 2)}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if loss < best:
                best = loss
                best_params = jax.tree_util.tree_map(jnp.array, state["wm"])
                save_wm(cfg, best_params, os.path.join(workdir, "wm_best"), tasks, {"iter": done, "is_best": True, "wm_loss": loss})
            log(f"[pretrain {done}/{p.iters}] wm_loss {loss:.4f} (best {best:.4f})")
            if done % p.checkpoint_every == 0 or done >= p.iters or sigterm.flag:
                save()
            if sigterm.flag and done < p.iters:
                mngr.close()
                raise Preempted(f"SIGTERM: checkpointed WM pretraining at iter {done} in {workdir}; rerun the same command to resume")
    mngr.close()
    save_wm(cfg, state["wm"], os.path.join(workdir, "wm_last"), tasks, {"iter": done, "is_best": False})
    return {"best_wm_loss": best, "total_iters": done, "total_time_sec": time.time() - t0, "history": read_jsonl(log_path),
            "best_dir": os.path.join(workdir, "wm_best"), "last_dir": os.path.join(workdir, "wm_last")}
