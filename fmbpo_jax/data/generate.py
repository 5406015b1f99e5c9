"""Generate MT30-format dataset chunks from real dm_control rollouts.

A chunk is ``torch.save`` of a plain dict (readable by ``convert_ckpt dataset``)::

    obs    float32 [N, L, 24]  obs[n, 0] = reset obs, obs[n, t] = obs after agent step t; zero-padded
    action float32 [N, L, 6]   action[n, t] (t >= 1) = action of agent step t, dims >= A_task are 0
    reward float32 [N, L]      reward[n, t] (t >= 1) = reward of agent step t
    task   int32   [N, L]      MT30 task id, constant along time

Index 0 follows TD-MPC2's writer (tests/fixtures/data/README.md): ``reward[n, 0] = NaN``,
``action[n, 0, :A_task] = NaN``, ``action[n, 0, A_task:] = 0``. L = ``episode_length`` = 1 + agent steps
(501 for MT30; shorter only for tests).

With the default random policy, ``generate_chunk(task_sequence, seed=101, env_seed=1)`` reproduces
the construction of the fixture chunks: one ``np.random.default_rng(seed)`` for the whole build, per
episode ``a_all = rng.uniform(-1, 1, (L-1, 6))``; one env per task built once with ``env_seed``.

``noise="ou"`` replaces those i.i.d. uniform actions by a clipped Ornstein-Uhlenbeck process (temporally
correlated random actions, see ``random_actions``): a random policy that pushes in one direction for a
while reaches far more of the state space (a swung-up pole, a caught ball) than i.i.d. noise, whose pushes
average out within a few steps.

    python -m fmbpo_jax.data.generate --out chunk_0.pt --tasks walker-stand cheetah-run --episodes 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Callable, Sequence

import numpy as np

from fmbpo_jax.envs import MAX_ACTION_DIM, MAX_OBS_DIM, make_env, task_id

#: policy(obs float32[24], task id, rng) -> action (6 or A_task values in [-1, 1])
Policy = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

__all__ = ["generate_chunk", "write_chunk", "generate", "rollout", "random_actions", "Policy", "NOISES"]

#: the random-action processes of ``random_actions``
NOISES = ("uniform", "ou")


def random_actions(rng: np.random.Generator, steps: int, noise: str = "uniform", ou_theta: float = 0.15,
                   ou_sigma: float = 0.4) -> np.ndarray:
    """``[steps, 6]`` float32 random actions in [-1, 1], the action sequence of one random-policy episode.

    "uniform": i.i.d. U(-1, 1) (one ``rng.uniform`` call: the fixtures' exact stream). "ou": per dimension
    x[t+1] = (1 - ou_theta) x[t] + ou_sigma N(0, 1), started from its stationary law and clipped to [-1, 1];
    the correlation time is about 1 / ou_theta steps, the stationary std ou_sigma / sqrt(1 - (1 - ou_theta)^2)
    (0.76 for the defaults, so the clip still lets actions reach the bounds).
    """
    if noise == "uniform":
        return rng.uniform(-1, 1, size=(steps, MAX_ACTION_DIM)).astype(np.float32)
    if noise != "ou":
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if not 0.0 < ou_theta <= 1.0 or ou_sigma <= 0.0:
        raise ValueError(f"need 0 < ou_theta <= 1 and ou_sigma > 0, got {ou_theta}, {ou_sigma}")
    decay = 1.0 - ou_theta
    eps = rng.standard_normal((steps, MAX_ACTION_DIM))
    x = eps[0] * ou_sigma / np.sqrt(1.0 - decay**2)  # a stationary start: no warm-up transient near 0
    out = np.empty((steps, MAX_ACTION_DIM))
    for t in range(steps):
        out[t] = x
        x = decay * x + ou_sigma * eps[t]
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def rollout(env, episode_length: int, rng: np.random.Generator, policy: Policy | None = None,
            noise: str = "uniform", ou_theta: float = 0.15, ou_sigma: float = 0.4) -> dict[str, np.ndarray]:
    """One episode of ``episode_length - 1`` agent steps in the chunk layout (index 0 = fillers).

    Without ``policy`` the actions are ``random_actions(rng, L - 1, noise, ou_theta, ou_sigma)``.
    """
    L = int(episode_length)
    A = env.action_dim
    obs = np.zeros((L, MAX_OBS_DIM), np.float32)
    action = np.zeros((L, MAX_ACTION_DIM), np.float32)
    reward = np.zeros((L,), np.float32)
    action[0, :A] = np.nan
    reward[0] = np.nan
    o = env.reset()
    obs[0] = o
    a_all = random_actions(rng, L - 1, noise, ou_theta, ou_sigma) if policy is None else None
    for t in range(1, L):
        if policy is None:
            a = a_all[t - 1]
        else:
            a = np.asarray(policy(o, env.task_id, rng), np.float32).reshape(-1)
            if a.shape[0] not in (A, MAX_ACTION_DIM):
                raise ValueError(f"policy returned {a.shape[0]} action dims for task {env.task_id} (want {A} or 6)")
            a = np.pad(a, (0, MAX_ACTION_DIM - a.shape[0]))
        o, r, done, _info = env.step(a)
        obs[t] = o
        action[t, :A] = a[:A]
        reward[t] = r
        if done != (t == L - 1):
            raise RuntimeError(f"task {env.task_id}: done={done} at agent step {t} of {L - 1}")
    return {"obs": obs, "action": action, "reward": reward}


def generate_chunk(
    task_sequence: Sequence[int | str],
    *,
    seed: int = 101,
    env_seed: int = 1,
    episode_length: int = 501,
    policy: Policy | None = None,
    noise: str = "uniform",
    ou_theta: float = 0.15,
    ou_sigma: float = 0.4,
) -> dict[str, np.ndarray]:
    """Roll out one episode per entry of ``task_sequence`` (names or ids, in file order); return the arrays.

    Each task keeps one env (built once with ``env_seed``) across its episodes; one action generator
    ``np.random.default_rng(seed)`` serves the whole chunk. ``noise``, ``ou_theta``, ``ou_sigma``: the
    random actions' process without ``policy`` (``random_actions``).
    """
    L = int(episode_length)
    if not 2 <= L <= 501:
        raise ValueError(f"episode_length must be in 2..501, got {L}")
    ids = [task_id(t) for t in task_sequence]
    if not ids:
        raise ValueError("empty task_sequence")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    rng = np.random.default_rng(seed)
    envs = {}
    n = len(ids)
    out = {
        "obs": np.zeros((n, L, MAX_OBS_DIM), np.float32),
        "action": np.zeros((n, L, MAX_ACTION_DIM), np.float32),
        "reward": np.zeros((n, L), np.float32),
        "task": np.zeros((n, L), np.int32),
    }
    try:
        for i, tid in enumerate(ids):
            if tid not in envs:
                envs[tid] = make_env(tid, env_seed, max_episode_steps=L - 1)
            ep = rollout(envs[tid], L, rng, policy, noise, ou_theta, ou_sigma)
            for k in ("obs", "action", "reward"):
                out[k][i] = ep[k]
            out["task"][i] = tid
    finally:
        for env in envs.values():
            try:
                env.close()
            except Exception:  # pragma: no cover
                pass
    return out


def write_chunk(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> str:
    """``torch.save`` the four arrays as a plain dict of tensors (atomic: temp file + rename)."""
    import torch

    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".chunk-", suffix=".pt.tmp", dir=d)
    os.close(fd)
    try:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in ("obs", "action", "reward", "task")}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def generate(
    path: str | os.PathLike,
    tasks: Sequence[int | str],
    episodes_per_task: int,
    *,
    interleave: bool = True,
    seed: int = 101,
    env_seed: int = 1,
    episode_length: int = 501,
    policy: Policy | None = None,
    noise: str = "uniform",
) -> dict[str, np.ndarray]:
    """Generate ``episodes_per_task`` episodes of each task and write them to ``path``.

    ``interleave=True`` orders episodes t0, t1, ..., t0, t1, ... (like the fixtures); False groups
    them in per-task runs (like the released chunks).
    """
    if interleave:
        seq = [t for _ in range(episodes_per_task) for t in tasks]
    else:
        seq = [t for t in tasks for _ in range(episodes_per_task)]
    arrays = generate_chunk(seq, seed=seed, env_seed=env_seed, episode_length=episode_length, policy=policy,
                            noise=noise)
    write_chunk(path, arrays)
    return arrays


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.data.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", nargs="+", required=True, help="MT30 task names or ids")
    p.add_argument("--episodes", type=int, default=1, help="episodes per task")
    p.add_argument("--episode-length", type=int, default=501)
    p.add_argument("--seed", type=int, default=101, help="action generator seed")
    p.add_argument("--env-seed", type=int, default=1)
    p.add_argument("--noise", choices=NOISES, default="uniform", help="random actions: i.i.d. uniform or Ornstein-Uhlenbeck")
    p.add_argument("--grouped", action="store_true", help="per-task runs instead of interleaved episodes")
    a = p.parse_args(argv)
    arrays = generate(a.out, [int(t) if t.isdigit() else t for t in a.tasks], a.episodes,
                      interleave=not a.grouped, seed=a.seed, env_seed=a.env_seed, episode_length=a.episode_length, noise=a.noise)
    print(f"wrote {a.out}: {arrays['obs'].shape[0]} episodes x {arrays['obs'].shape[1]} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
