"""MT30 on dm_control: the 30 tasks, TD-MPC2's wrapper stack, and a batched multi-process evaluator.

Importing this package sets ``MUJOCO_GL=disable`` when it is unset (state observations need no GL;
set ``MUJOCO_GL=egl`` yourself, before importing, to render videos). It imports neither dm_control
nor JAX until an env or the evaluator is used.

    from fmbpo_jax.envs import MT30_TASKS, make_env, task_id
    env = make_env("walker-walk", seed=1)       # or make_env(1, seed=1)
    obs = env.reset()                            # float32[24], zero-padded
    obs, reward, done, info = env.step(a)        # a: [6] or [env.action_dim]; done after 500 steps

    from fmbpo_jax.envs.evaluate import evaluate, Evaluator, BackgroundEvaluator
"""

import os

os.environ.setdefault("MUJOCO_GL", "disable")

from fmbpo_jax.envs.tasks import (  # noqa: E402
    ACTION_DIMS,
    ACTION_DIMS_BY_ID,
    ACTION_REPEAT,
    CUSTOM_TASKS,
    EPISODE_LENGTH,
    MAX_ACTION_DIM,
    MAX_OBS_DIM,
    MT30_TASKS,
    OBS_DIMS,
    OBS_DIMS_BY_ID,
    dmc_names,
    task_id,
    task_name,
)


def make_env(task, seed, max_episode_steps=EPISODE_LENGTH, lean=False):
    """Build one MT30 task (name or id), seeded like TD-MPC2: ``task_kwargs={'random': seed}``.

    ``lean=True``: same physics, 8x8 skybox texture (~12 MB less per env; for state-only use).
    See :class:`fmbpo_jax.envs.env.MT30Env`.
    """
    from fmbpo_jax.envs.env import make_env as _make_env

    return _make_env(task, seed, max_episode_steps=max_episode_steps, lean=lean)


def action_mask(task) -> "list[float]":
    """TD-MPC2's per-task action mask: 1 for the task's own action dims, 0 for the padding."""
    a = ACTION_DIMS_BY_ID[task_id(task)]
    return [1.0] * a + [0.0] * (MAX_ACTION_DIM - a)


__all__ = [
    "ACTION_DIMS", "ACTION_DIMS_BY_ID", "ACTION_REPEAT", "CUSTOM_TASKS", "EPISODE_LENGTH", "MAX_ACTION_DIM",
    "MAX_OBS_DIM", "MT30_TASKS", "OBS_DIMS", "OBS_DIMS_BY_ID", "action_mask", "dmc_names", "make_env",
    "task_id", "task_name",
]
