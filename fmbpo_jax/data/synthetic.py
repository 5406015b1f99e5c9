"""Synthetic stores for tests and the benchmark: values that encode (task, episode, t).

In task ``tid``, episode ``e``, step ``t``:

* ``obs[..., 0] = e``, ``obs[..., 1] = t``, ``obs[..., 2] = tid``, other dims: small noise;
* ``action[..., 0] = e``, ``action[..., 1] = t``, ``action[..., 2] = tid`` (t >= 1), other dims noise;
* ``reward = e * L + t`` (t >= 1);
* ``action[:, 0]`` and ``reward[:, 0]`` are NaN (TD-MPC2's filler), so reading them shows up.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from fmbpo_jax.data.store import Store, StoreWriter


def encoded_episodes(tid: int, first_episode: int, n: int, episode_length: int, rng: np.random.Generator,
                     obs_dim: int = 24, action_dim: int = 6):
    L = episode_length
    e = np.arange(first_episode, first_episode + n, dtype=np.float32)[:, None]
    t = np.arange(L, dtype=np.float32)[None, :]
    obs = rng.standard_normal((n, L, obs_dim), dtype=np.float32) * 0.01
    obs[..., 0] = e
    obs[..., 1] = t
    obs[..., 2] = tid
    action = rng.uniform(-1, 1, (n, L, action_dim)).astype(np.float32)
    action[..., 0] = e
    action[..., 1] = t
    action[..., 2] = tid
    reward = (e * L + t).astype(np.float32)
    action[:, 0] = np.nan
    reward[:, 0] = np.nan
    return obs, action, reward


def write_synthetic_store(
    dst: str | os.PathLike,
    episodes: dict[int, int] | Sequence[int],
    *,
    episode_length: int = 501,
    sources: int = 1,
    seed: int = 0,
    name: str = "synthetic",
) -> Store:
    """Write a store with ``episodes[tid]`` encoded episodes per task, split over ``sources`` fake sources.

    ``episodes`` may be a dict {task id: count} or a list of counts for task ids 0, 1, 2, ...
    """
    if not isinstance(episodes, dict):
        episodes = {i: int(c) for i, c in enumerate(episodes)}
    rng = np.random.default_rng(seed)
    with StoreWriter(dst, episode_length=episode_length, obs_dim=24, action_dim=6) as w:
        w.index["episode_length"] = episode_length
        w.index["obs_dim"] = 24
        w.index["action_dim"] = 6
        done = {tid: 0 for tid in episodes}
        for s in range(sources):
            tag = f"{name}-{seed}-{s}-{sorted(episodes.items())}-{episode_length}"
            sha = hashlib.sha256(tag.encode()).hexdigest()
            src = w.begin_source(f"{name}_{s}.pt", sha, None, {})
            for tid, total in episodes.items():
                n = total // sources + (1 if s < total % sources else 0)
                if n:
                    o, a, r = encoded_episodes(tid, done[tid], n, episode_length, rng)
                    w.add_episodes(src, tid, o, a, r)
                    done[tid] += n
        return w.commit()
