"""Replay a golden trajectory file (layout of tests/fixtures/envs/README.md) in our envs and compare.

Per task `<t>` the file holds `obs_<t>` [T+1, 24 or d] (row 0 = reset obs), `reward_<t>` [T], and the
applied actions `action_<t>` [T, A] (fallback: `actions_full[:, :A]`); the env seed is `seed`
(a per-task `seed_<t>` wins if present); `task_names` lists the tasks. Optional `qpos0_<t>`/`qvel0_<t>`
are compared too. Any T, any seed, any subset of tasks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fmbpo_jax.envs.tasks import MT30_TASKS, task_id


@dataclasses.dataclass
class ReplayReport:
    task: str
    seed: int
    steps: int
    obs_max_abs_diff: float
    reward_max_abs_diff: float
    state0_max_abs_diff: float | None  # qpos0/qvel0 after reset, if the file has them
    atol: float

    @property
    def ok(self) -> bool:
        diffs = [self.obs_max_abs_diff, self.reward_max_abs_diff]
        if self.state0_max_abs_diff is not None:
            diffs.append(self.state0_max_abs_diff)
        return all(np.isfinite(d) and d <= self.atol for d in diffs)


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    d = np.abs(a - b)
    return float("inf") if not np.all(np.isfinite(d)) else float(d.max())


def file_tasks(data) -> list[str]:
    if "task_names" in data:
        return [str(t) for t in np.asarray(data["task_names"]).tolist()]
    return [k[len("obs_"):] for k in data.files if k.startswith("obs_")]


def replay_task(data, task: str, atol: float = 1e-6) -> ReplayReport:
    from fmbpo_jax.envs.env import make_env

    name = MT30_TASKS[task_id(task)]
    if f"obs_{name}" not in data or f"reward_{name}" not in data:
        raise KeyError(f"golden file has no obs_{name} / reward_{name}")
    seed = int(data[f"seed_{name}"]) if f"seed_{name}" in data else int(data["seed"])
    env = make_env(name, seed)
    if f"action_{name}" in data:
        actions = np.asarray(data[f"action_{name}"])
    else:
        actions = np.asarray(data["actions_full"])[:, : env.action_dim]
    gold_obs = np.asarray(data[f"obs_{name}"])
    gold_rew = np.asarray(data[f"reward_{name}"])
    T = len(actions)
    if T > env.max_episode_steps:
        raise ValueError(f"{name}: {T} actions exceed one episode ({env.max_episode_steps} steps)")
    obs = [env.reset()]
    state0 = None
    if f"qpos0_{name}" in data and f"qvel0_{name}" in data:
        state0 = max(_max_abs(env.physics.data.qpos, data[f"qpos0_{name}"]),
                     _max_abs(env.physics.data.qvel, data[f"qvel0_{name}"]))
    rew = []
    for a in actions:
        o, r, _, _ = env.step(a)
        obs.append(o)
        rew.append(r)
    obs = np.stack(obs)[:, : gold_obs.shape[1]]
    rew = np.asarray(rew, np.float32)
    env.close()
    return ReplayReport(task=name, seed=seed, steps=T, obs_max_abs_diff=_max_abs(obs, gold_obs),
                        reward_max_abs_diff=_max_abs(rew, gold_rew), state0_max_abs_diff=state0, atol=atol)


def replay_golden(path: str, tasks=None, atol: float = 1e-6) -> list[ReplayReport]:
    with np.load(path, allow_pickle=False) as data:
        names = file_tasks(data) if not tasks else [MT30_TASKS[task_id(t)] for t in tasks]
        return [replay_task(data, n, atol=atol) for n in names]
