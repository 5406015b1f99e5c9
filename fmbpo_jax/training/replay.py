"""The online replay buffer on the device: pure functions on a `data.sampler.WindowData`, one row per run.

The buffer IS the offline trainer's device store layout, so the offline program samples it unchanged
(`program.make_train_chunk`: `sample_run(data, pos=r, ...)` draws B windows of H+1 steps of run r's complete
episodes). Row r holds run r's episodes, flattened: obs [R, E*L, O], action [R, E*L, A], reward [R, E*L] with
L = episode_length + 1 entries per episode in the MT30 chunk layout (data/generate.py): entry 0 holds the reset obs,
entry t >= 1 the obs after agent step t and that step's action and reward (entry 0's action/reward are zeros and
never sampled). Like TD-MPC2's buffer, an episode enters when it ends: windows come from complete episodes only.

Capacity E episodes per run; episode k goes to slot k % E (oldest overwritten once full).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax.data.sampler import WindowData
from fmbpo_jax.envs.tasks import MAX_ACTION_DIM, MAX_OBS_DIM


def empty(task_ids, capacity_episodes: int, episode_length: int) -> WindowData:
    """An empty buffer for runs with MT30 task ids `task_ids` [R]: E = capacity_episodes slots of episode_length
    agent steps each (L = episode_length + 1 entries)."""
    R, E, L = len(task_ids), int(capacity_episodes), int(episode_length) + 1
    return WindowData(obs=jnp.zeros((R, E * L, MAX_OBS_DIM), jnp.float32),
                      action=jnp.zeros((R, E * L, MAX_ACTION_DIM), jnp.float32),
                      reward=jnp.zeros((R, E * L), jnp.float32),
                      episode_map=jnp.tile(jnp.arange(E, dtype=jnp.int32), (R, 1)),
                      num_entries=jnp.zeros((R,), jnp.int32), task_ids=jnp.asarray(task_ids, jnp.int32),
                      episode_length=L)


@jax.jit
def add_episode(data: WindowData, obs: jax.Array, action: jax.Array, reward: jax.Array, episode: jax.Array) -> WindowData:
    """The buffer with every run's episode number `episode` (0-based, the same for all runs: they act in lockstep).

    obs [R, L, O], action [R, L, A], reward [R, L] in the layout above (entry 0: reset obs, zero action/reward).
    """
    E, L = data.episode_map.shape[1], data.episode_length
    start = (episode % E) * L
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), start, axis=1)  # noqa: E731
    n = jnp.minimum(episode + 1, E).astype(jnp.int32)
    return data.replace(obs=put(data.obs, obs), action=put(data.action, action), reward=put(data.reward, reward),
                        num_entries=jnp.full_like(data.num_entries, n))


def episode_arrays(num_runs: int, episode_length: int) -> dict[str, np.ndarray]:
    """Host arrays one episode of every run is written into: obs [R, L, O], action [R, L, A], reward [R, L]."""
    L = episode_length + 1
    return {"obs": np.zeros((num_runs, L, MAX_OBS_DIM), np.float32),
            "action": np.zeros((num_runs, L, MAX_ACTION_DIM), np.float32),
            "reward": np.zeros((num_runs, L), np.float32)}


def single_episode(task_ids, episode: dict[str, np.ndarray]) -> WindowData:
    """A one-episode WindowData of host episode arrays (e.g. the fresh episode, before it enters the buffer)."""
    R, L = episode["reward"].shape
    return WindowData(obs=jnp.asarray(episode["obs"]), action=jnp.asarray(episode["action"]),
                      reward=jnp.asarray(episode["reward"]), episode_map=jnp.zeros((R, 1), jnp.int32),
                      num_entries=jnp.ones((R,), jnp.int32), task_ids=jnp.asarray(task_ids, jnp.int32), episode_length=L)
