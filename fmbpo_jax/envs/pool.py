"""A lockstep pool of MT30 envs spread over worker processes. No JAX in here (workers never import it).

Each worker owns a fixed subset of env slots (balanced by a per-task cost estimate) and steps them
sequentially; the parent scatters actions and gathers observations once per agent step. Envs are built
once per slot (the first env of a task in a worker from XML, the others as deep copies: ~8x faster; with a
tiny skybox texture, `lean=True`: ~0.3 MB instead of ~12 MB per env) and
re-seeded for every evaluation with `MT30Env.seed`, which is equivalent to a fresh `make_env(task, seed)`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from typing import Sequence

import numpy as np

from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, EPISODE_LENGTH, MAX_ACTION_DIM, MAX_OBS_DIM, MT30_TASKS

# Rough cost of one agent step in microseconds on one core (measured by `python -m fmbpo_jax.envs bench
# --measure-costs`, 2-core EPYC); only used to balance env slots over workers.
TASK_STEP_COST_US = {
    "walker": 300.0, "cheetah": 130.0, "reacher": 110.0, "acrobot": 120.0, "pendulum": 80.0,
    "cartpole": 190.0, "ball_in_cup": 200.0, "finger": 170.0, "fish": 230.0, "hopper": 190.0,
}


def task_cost(task_id: int) -> float:
    from fmbpo_jax.envs.tasks import dmc_names

    return TASK_STEP_COST_US.get(dmc_names(task_id)[0], 200.0)


def assign_slots(task_ids: Sequence[int], num_workers: int) -> list[np.ndarray]:
    """Greedy longest-processing-time assignment of env slots to workers (deterministic)."""
    costs = np.array([task_cost(t) for t in task_ids])
    order = sorted(range(len(task_ids)), key=lambda i: (-costs[i], i))
    loads = np.zeros(num_workers)
    groups: list[list[int]] = [[] for _ in range(num_workers)]
    for i in order:
        w = int(np.argmin(loads))
        groups[w].append(i)
        loads[w] += costs[i]
    return [np.array(sorted(g), dtype=np.int64) for g in groups]


class EnvGroup:
    """A list of MT30 envs stepped in lockstep in the current process."""

    def __init__(self, task_ids: Sequence[int], max_steps: int = EPISODE_LENGTH):
        import copy

        from fmbpo_jax.envs.env import MT30Env

        self.task_ids = np.asarray(task_ids, dtype=np.int64)
        self.max_steps = int(max_steps)
        self.envs = []
        templates: dict[int, MT30Env] = {}
        for t in self.task_ids.tolist():
            if t not in templates:
                templates[t] = MT30Env(t, 0, max_episode_steps=self.max_steps, lean=True)
                self.envs.append(templates[t])
            else:
                self.envs.append(copy.deepcopy(templates[t]))
        self._action_dims = np.array([ACTION_DIMS_BY_ID[t] for t in self.task_ids.tolist()])

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, seeds: Sequence[int], skips: Sequence[int] | None = None) -> np.ndarray:
        """Seed every env, discard `skips[i]` episodes' initial states, and return the reset obs [n, 24]."""
        skips = np.zeros(len(self.envs), np.int64) if skips is None else np.asarray(skips)
        obs = np.zeros((len(self.envs), MAX_OBS_DIM), np.float32)
        for i, (env, s, k) in enumerate(zip(self.envs, np.asarray(seeds).tolist(), skips.tolist())):
            env.seed(int(s))
            for _ in range(int(k)):
                env.reset()
            obs[i] = env.reset()
        return obs

    def step(self, actions: np.ndarray):
        actions = np.asarray(actions)
        if actions.shape != (len(self.envs), MAX_ACTION_DIM):
            raise ValueError(f"actions must have shape ({len(self.envs)}, {MAX_ACTION_DIM}), got {actions.shape}")
        checked = [env.check_action(a) for env, a in zip(self.envs, actions)]  # all before stepping any
        n = len(self.envs)
        obs = np.zeros((n, MAX_OBS_DIM), np.float32)
        rew = np.zeros(n, np.float32)
        done = np.zeros(n, bool)
        succ = np.zeros(n, np.float32)
        for i, (env, a) in enumerate(zip(self.envs, checked)):
            obs[i], rew[i], done[i], info = env.step_checked(a)
            succ[i] = info["success"]
        return obs, rew, done, succ

    def close(self) -> None:
        for env in self.envs:
            env.close()


class WorkerError(RuntimeError):
    """An exception raised inside an env worker (message carries the worker traceback)."""


def _worker_main(conn, task_ids, max_steps):
    try:
        group = EnvGroup(task_ids, max_steps)
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ok", None))
    while True:
        try:
            cmd, payload = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if cmd == "close":
            break
        try:
            if cmd == "reset":
                out = group.reset(*payload)
            elif cmd == "step":
                out = group.step(payload)
            elif cmd == "cpu_time":
                out = time.process_time()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", out))
        except BaseException as e:  # noqa: BLE001
            kind = "value_error" if isinstance(e, ValueError) else "error"
            conn.send((kind, traceback.format_exc()))
    group.close()
    conn.close()


def workers_from_flag(flag: int) -> int | None:
    """`num_workers` for a --config.eval.workers / --config.online.env_workers value: -1 steps the envs in this
    process (0 workers), 0 chooses automatically (None), N > 0 is N worker processes."""
    return {-1: 0, 0: None}.get(flag, flag)


def default_num_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class EnvPool:
    """N env slots (`task_ids[i]` is slot i's task) stepped in lockstep by `num_workers` processes.

    num_workers=0 steps everything in the calling process (no subprocesses; handy for debugging).
    `reset(seeds, skips)` -> obs [N, 24]; `step(actions [N, 6])` -> (obs [N, 24], reward [N] f32,
    done [N] bool, success [N] f32). Errors inside a worker are re-raised here: ValueError for bad
    actions, WorkerError otherwise.
    """

    def __init__(self, task_ids: Sequence[int], num_workers: int | None = None, max_steps: int = EPISODE_LENGTH,
                 start_method: str = "spawn"):
        self.task_ids = np.asarray([int(t) for t in task_ids], dtype=np.int64)
        if len(self.task_ids) == 0:
            raise ValueError("EnvPool needs at least one env slot")
        if np.any((self.task_ids < 0) | (self.task_ids >= len(MT30_TASKS))):
            raise ValueError(f"task ids must be in [0, {len(MT30_TASKS)})")
        self.max_steps = int(max_steps)
        dims = np.array([ACTION_DIMS_BY_ID[t] for t in self.task_ids.tolist()])
        self._action_mask = np.arange(MAX_ACTION_DIM)[None, :] < dims[:, None]
        if num_workers is None:
            num_workers = default_num_workers()
        self.num_workers = min(int(num_workers), len(self.task_ids))
        self._closed = False
        self._local: EnvGroup | None = None
        self._procs, self._conns = [], []
        if self.num_workers <= 0:
            self.num_workers = 0
            self._groups = [np.arange(len(self.task_ids))]
            self._local = EnvGroup(self.task_ids, self.max_steps)
            return
        self._groups = assign_slots(self.task_ids.tolist(), self.num_workers)
        ctx = mp.get_context(start_method)
        try:
            for g in self._groups:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, args=(child, self.task_ids[g].tolist(), self.max_steps),
                                daemon=True, name="fmbpo-env-worker")
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
            for conn in self._conns:
                self._recv(conn)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.task_ids)

    @property
    def groups(self) -> list[np.ndarray]:
        """Slot indices owned by each worker."""
        return list(self._groups)

    def _recv(self, conn):
        try:
            kind, out = conn.recv()
        except EOFError:
            raise WorkerError("an env worker died (see its stderr)") from None
        if kind == "ok":
            return out
        if kind == "value_error":
            raise ValueError(f"in env worker:\n{out}")
        raise WorkerError(f"in env worker:\n{out}")

    def _call(self, cmd, payloads):
        if self._closed:
            raise RuntimeError("EnvPool is closed")
        for conn, payload in zip(self._conns, payloads):
            conn.send((cmd, payload))
        results, first_error = [], None
        for conn in self._conns:  # always drain every worker so the pipes stay in sync
            try:
                results.append(self._recv(conn))
            except BaseException as e:  # noqa: BLE001
                results.append(None)
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return results

    def reset(self, seeds: Sequence[int], skips: Sequence[int] | None = None) -> np.ndarray:
        seeds = np.asarray(seeds, dtype=np.int64)
        skips = np.zeros(len(self), np.int64) if skips is None else np.asarray(skips, dtype=np.int64)
        if seeds.shape != (len(self),) or skips.shape != (len(self),):
            raise ValueError(f"seeds and skips must have shape ({len(self)},)")
        if self._local is not None:
            return self._local.reset(seeds, skips)
        outs = self._call("reset", [(seeds[g], skips[g]) for g in self._groups])
        obs = np.zeros((len(self), MAX_OBS_DIM), np.float32)
        for g, o in zip(self._groups, outs):
            obs[g] = o
        return obs

    def step(self, actions: np.ndarray):
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (len(self), MAX_ACTION_DIM):
            raise ValueError(f"actions must have shape ({len(self)}, {MAX_ACTION_DIM}), got {actions.shape}")
        # Validate here, before any worker steps, so that a bad action cannot desynchronise the workers.
        bad = ~np.isfinite(actions) & self._action_mask
        if bad.any():
            i = int(np.nonzero(bad.any(axis=1))[0][0])
            raise ValueError(f"non-finite action for env slot {i} ({MT30_TASKS[self.task_ids[i]]}): {actions[i]}")
        if self._local is not None:
            return self._local.step(actions)
        outs = self._call("step", [actions[g] for g in self._groups])
        n = len(self)
        obs = np.zeros((n, MAX_OBS_DIM), np.float32)
        rew = np.zeros(n, np.float32)
        done = np.zeros(n, bool)
        succ = np.zeros(n, np.float32)
        for g, (o, r, d, s) in zip(self._groups, outs):
            obs[g], rew[g], done[g], succ[g] = o, r, d, s
        return obs, rew, done, succ

    def cpu_times(self) -> list[float]:
        """CPU seconds used so far by each worker process (num_workers=0: this process)."""
        if self._local is not None:
            return [time.process_time()]
        return list(self._call("cpu_time", [None] * len(self._conns)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._local is not None:
            self._local.close()
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except (OSError, BrokenPipeError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for conn in self._conns:
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
