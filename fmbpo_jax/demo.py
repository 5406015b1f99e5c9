"""The embedded default of the main job (configs/demo.py): the whole pipeline on a laptop-sized problem.

1. collect a small dataset from real dm_control rollouts (random policy) into a per-task store;
2. pretrain a small world model on it (the phase-8 path);
3. train policies on that frozen WM (the phase-3 path) and jointly with the WM (fine-tuning, the phase-7 path);
4. evaluate both in the simulator against a uniform random policy and print the table.
Each stage resumes/skips when its outputs exist in the workdir.

The demo composes three runs from one config (pretraining, then two policy variants on its WM), so it takes the
config itself and resolves one RunPlan per stage; its own settings come from the config's plan.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax.data.generate import generate_chunk
from fmbpo_jax.data.store import StoreWriter
from fmbpo_jax.envs.evaluate import evaluate
from fmbpo_jax.envs.tasks import MAX_ACTION_DIM, MT30_TASKS
from fmbpo_jax.pretrain import pretrain_wm
from fmbpo_jax.run_config import RunPlan
from fmbpo_jax.textio import rows_table
from fmbpo_jax.training.trainer import train


def _variant(config, **changes):
    c = config.copy_and_resolve_references()
    with c.unlocked():
        for k, v in changes.items():
            node = c
            *path, leaf = k.split(".")
            for p in path:
                node = node[p]
            node[leaf] = v
    return c


def random_policy(params, obs, task_ids):
    """Uniform random actions in [-1, 1]^6, a deterministic function of (params['key'], obs)."""
    key = jax.random.fold_in(params["key"], jax.lax.bitcast_convert_type(jnp.sum(obs), jnp.int32))
    return jax.random.uniform(key, (obs.shape[0], MAX_ACTION_DIM), minval=-1.0, maxval=1.0)


def collect(plan: RunPlan, workdir: str, log: Callable) -> str:
    """Random-policy rollouts of the demo tasks straight into a per-task store (no torch, no .pt). Returns its dir.

    The actions follow --config.demo.exploration (i.i.d. uniform or temporally correlated OU noise): only the
    world model's training data, never the "random" baseline of the results table.
    """
    store = os.path.join(workdir, "store")
    if os.path.exists(os.path.join(store, "index.json")):
        return store
    # a collection killed before StoreWriter's final rename leaves its temporary directory; a demo workdir is one
    # job's, so nothing else can be writing one now
    stale = [os.path.join(workdir, d) for d in os.listdir(workdir) if d.startswith(".store.tmp-")]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    if stale:
        log(f"[demo] removed {len(stale)} unfinished collection(s) left by a stopped run")
    tids = list(plan.spec.task_ids)
    d = plan.demo
    L = d.episode_length
    noise = {"noise": d.exploration} | ({"ou_theta": d.ou_theta, "ou_sigma": d.ou_sigma} if d.exploration == "ou" else {})
    log(f"[demo] collecting {d.episodes_per_task} random episodes ({d.exploration} actions) x {len(tids)} tasks in dm_control")
    seq = [t for t in tids for _ in range(d.episodes_per_task)]
    arrays = generate_chunk(seq, seed=plan.pretrain.seed, episode_length=L, **noise)
    tag = hashlib.sha256(repr((seq, plan.pretrain.seed, L, sorted(noise.items()))).encode()).hexdigest()
    with StoreWriter(store, episode_length=L, obs_dim=arrays["obs"].shape[-1], action_dim=arrays["action"].shape[-1]) as w:
        src = w.begin_source("demo_random_rollouts", tag, None, {"policy": "random", **noise})
        for t in tids:
            sel = arrays["task"][:, 0] == t
            w.add_episodes(src, t, arrays["obs"][sel], arrays["action"][sel], arrays["reward"][sel])
        w.commit()
    return store


def untrained_returns(run_dir: str) -> dict[str, float]:
    """Per task, the epoch-0 evaluation of a policy run (its initial actor, mean over seeds), from eval.jsonl.

    The reference point for "learned": a do-little initial actor already beats the uniform random policy on
    tasks that punish control effort or reward keeping still (cartpole-swingup, a ball that starts in the cup).
    """
    per_task: dict[str, list[float]] = {}
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        for row in map(json.loads, filter(str.strip, f)):
            if row["epoch"] == 0:
                per_task.setdefault(row["task"], []).append(row["episode_reward"])
    return {t: float(np.mean(v)) for t, v in per_task.items()}


def run_demo(config, workdir: str, log: Callable[[str], None] = print) -> list[dict]:
    plan = RunPlan.from_config(config)  # a bad flag fails now, not after minutes of collection and pretraining
    os.makedirs(workdir, exist_ok=True)
    store = collect(plan, workdir, log)
    pre_dir = os.path.join(workdir, "pretrain")
    best = os.path.join(pre_dir, "wm_best")
    if not os.path.exists(os.path.join(pre_dir, "wm_last")):
        log("[demo] pretraining the world model (phase-8 path)")
        pretrain_wm(_variant(config, mode="pretrain_wm", **{"data.dataset_dir": store}), pre_dir, log=log)
    out = {}
    for name, finetune in (("frozen_wm", False), ("joint", True)):
        log(f"[demo] training policies: {name}")
        lr = {"alg.model_lr": plan.demo.joint_model_lr} if finetune and plan.demo.joint_model_lr > 0 else {}
        c = _variant(config, mode="policy", finetune_wm=finetune, checkpoint=best, **{"data.dataset_dir": store}, **lr)
        out[name] = train(c, os.path.join(workdir, name), log=log)["results"]
    tasks = [MT30_TASKS[t] for t in plan.spec.task_ids]
    ev = plan.eval
    rnd = evaluate(random_policy, {"key": jax.random.PRNGKey(0)}, tasks, episodes=ev.episodes,
                   seed=ev.seed + 1, max_steps=ev.max_steps, num_workers=ev.workers or None)
    log("[demo] random policy per-episode return std (the baseline's noise): "
        + ", ".join(f"{task} {rnd.returns[t].std():.1f}" for t, task in enumerate(tasks)))
    # both variants start from the same actor (same seeds), so one epoch-0 evaluation stands for both
    untrained = untrained_returns(os.path.join(workdir, "frozen_wm"))
    rows = [_result_row(task, float(rnd.returns[t].mean()), untrained.get(task, float("nan")), out)
            for t, task in enumerate(tasks)]
    table = rows_table(rows, ["task", "random", "untrained", "frozen_wm", "frozen_wm best", "frozen_wm+planning", "joint", "joint best",
                                "joint+planning"])
    with open(os.path.join(workdir, "demo_results.md"), "w") as f:
        f.write(table + "\n")
    log("[demo] final evaluation return (mean over episodes and seeds):\n" + table)
    return rows


def _result_row(task: str, random: float, untrained: float, out: dict[str, list[dict]]) -> dict:
    """One task's row of the demo table: mean over seeds of each variant's final, best-params and planning returns."""
    row = {"task": task, "random": random, "untrained": untrained}
    for name in out:
        mine = [r for r in out[name] if r["task"] == task]
        row[name] = float(np.mean([r["final_return"] for r in mine]))
        # the params kept at the best periodic evaluation, re-evaluated on fresh episodes
        row[f"{name} best"] = float(np.mean([r["best_params_return"] for r in mine]))
        row[f"{name}+planning"] = float(np.mean([r["planning_return"] for r in mine]))
    return row
