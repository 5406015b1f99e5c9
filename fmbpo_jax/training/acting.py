"""What online training does in the environment, as pure functions of (run, episode, step): no state to checkpoint.

- `episode_env_seed`: the env seed of a run's episode (its reset state and the task's own randomness);
- `seed_actions`: the seed episodes' OU random actions (`data.generate.random_actions`);
- `make_act_fn`: the jitted exploration policy of every run at once (the actor's sample plus Gaussian noise), its
  draws folded from the run's key and the global env step;
- `make_wm_probe`: the WM loss of the current WM on a fresh (not yet trained on) episode and on the buffer, same
  batch size and draws: how well the WM generalises to the data the policy just collected.

A run resumed at an episode boundary therefore acts exactly as the uninterrupted one: the env is re-seeded per
episode, and every random draw is a function of (run, episode, step).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import actors, mathops, nets, pwm
from fmbpo_jax import world_model as wm
from fmbpo_jax.data.generate import random_actions
from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, MAX_ACTION_DIM
from fmbpo_jax.training.program import sample_run

_ACT_STREAM = 0xAC7  # folded into a run's key for its acting draws (the update's stream is untouched)
_PROBE_STREAM = 0x9B0BE


def episode_env_seed(run_seed: int, task_id: int, episode: int) -> int:
    """The env seed of episode `episode` of run (run_seed, task_id): a uint32 hash, far from evaluation's seeds."""
    return int(np.random.SeedSequence([int(run_seed), int(task_id), int(episode), 0x5EED]).generate_state(1)[0])


def seed_actions(run_seed: int, task_id: int, episode: int, steps: int, theta: float, sigma: float) -> np.ndarray:
    """[steps, 6] OU random actions of a seed episode (dims past the task's action dim zeroed)."""
    rng = np.random.default_rng([int(run_seed), int(task_id), int(episode), 0x0C])
    a = random_actions(rng, steps, "ou", theta, sigma)
    a[:, ACTION_DIMS_BY_ID[task_id]:] = 0.0
    return a


def act_keys(run_keys: jax.Array) -> jax.Array:
    """[R, 2] base keys of the runs' acting draws."""
    return jax.vmap(lambda k: jax.random.fold_in(k, _ACT_STREAM))(run_keys)


def make_act_fn(cfg: pwm.PWMConfig, noise_std: float) -> Callable:
    """jit(train: pwm.TrainState [R], obs [R, 24], task [R], keys [R, 2], step) -> actions [R, 6] in [-1, 1].

    tanh of the actor's sample (Gaussian: mu + std * eps; flow: the ODE from a noisy start) on the run's own WM
    latent, plus N(0, noise_std^2), clipped, masked to the task's action dims. step: the global env step (a draw
    per run per step).
    """
    masks = nets.action_mask_table(ACTION_DIMS_BY_ID, MAX_ACTION_DIM)

    def one(train, obs, task, key, step):
        k_act, k_noise = jax.random.split(jax.random.fold_in(key, step))
        z = wm.encode(cfg.wm, train.wm, obs[None], task)
        a = mathops.tanh(actors.action(cfg.actor, train.actor, z, k_act))[0]
        a = a + noise_std * jax.random.normal(k_noise, a.shape, a.dtype)
        return jnp.clip(a, -1.0, 1.0) * masks[task]

    def act(train, obs, task, keys, step):
        return jax.vmap(one, in_axes=(0, 0, 0, 0, None))(train, obs, task, keys, step)

    return jax.jit(act)


def make_wm_probe(cfg: pwm.PWMConfig, batch_size: int) -> Callable:
    """jit(train [R], fresh: WindowData, buffer: WindowData, run_task [R], step) -> {'wm_loss_fresh', 'wm_loss_buffer'} [R].

    The WM loss (no gradient step) on B windows of the fresh episode (row r of `fresh`) and of run r's buffer, with
    the same draws: their gap is the WM's generalisation error on the data the current policy reaches.
    """
    def loss(train, data, pos, task, key):
        k_batch, k_tau = jax.random.split(key)
        b = sample_run(data, pos, k_batch, batch_size, cfg.horizon)
        return pwm.wm_objective(cfg, train.wm, b["obs"], b["action"], b["reward"], task, k_tau)[0]

    def one(train, fresh, buffer, pos, task, key):
        return {"wm_loss_fresh": loss(train, fresh, pos, task, key), "wm_loss_buffer": loss(train, buffer, pos, task, key)}

    def probe(train, fresh, buffer, run_task, step):
        R = run_task.shape[0]
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(_PROBE_STREAM), r * 1_000_003 + step))(jnp.arange(R))
        return jax.vmap(one, in_axes=(0, None, None, 0, 0, 0))(train, fresh, buffer, jnp.arange(R), run_task, keys)

    return jax.jit(probe)
