"""Batched MT30 evaluation: all task x episode envs in lockstep, ONE jitted policy call per agent step.

    result = evaluate(policy_fn, params, tasks=MT30_TASKS, episodes=10, seed=0, num_workers=2)
    result.return_mean["walker-walk"], result.metrics()["episode_reward+avg"]

`policy_fn(params, obs[N, 24] float32, task_ids[N] int32) -> actions[N, 6]` is jitted once per
`Evaluator`; slot i = (task tasks[i // episodes], episode i % episodes). Choosing per-task parameters
from `task_ids` is the policy's business.

Seeding (`seed_rule`):
  * "distinct" (default): episode e of every task runs in an env seeded `episode_seed(seed, e) =
    seed * 1000 + e` (e < 1000), i.e. exactly `make_env(task, seed * 1000 + e)` followed by its first
    reset. Different episodes start from different states; the same (seed, e) is the same start state
    for every task, as in TD-MPC2 where all tasks share the run seed.
  * "reference": TD-MPC2's own protocol: one env per task seeded `seed`, episode e is its (e+1)-th reset.

Returns are float64 sums of the per-agent-step float32 rewards over `max_steps` agent steps (500 = full
MT30 episode, return in [0, 1000]); std is the population std (ddof=0) over episodes.
The evaluation is deterministic given (params, seed) when the policy is deterministic.

`BackgroundEvaluator` runs the same thing in a thread on a snapshot of params while training goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from fmbpo_jax.envs.pool import EnvPool
from fmbpo_jax.envs.tasks import EPISODE_LENGTH, MAX_ACTION_DIM, MAX_OBS_DIM, MT30_TASKS, task_id

SEED_STRIDE = 1000
SEED_RULES = ("distinct", "reference")


def episode_seed(seed: int, episode: int) -> int:
    """Env seed of episode `episode` under the "distinct" rule: seed * 1000 + episode."""
    if not 0 <= episode < SEED_STRIDE:
        raise ValueError(f"episode index must be in [0, {SEED_STRIDE}), got {episode}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed) * SEED_STRIDE + int(episode)


def episode_seeds(seed: int, episodes: int, seed_rule: str = "distinct") -> tuple[np.ndarray, np.ndarray]:
    """(env seeds [episodes], resets to skip [episodes]) for one task under `seed_rule`."""
    if seed_rule == "distinct":
        return np.array([episode_seed(seed, e) for e in range(episodes)], np.int64), np.zeros(episodes, np.int64)
    if seed_rule == "reference":
        return np.full(episodes, int(seed), np.int64), np.arange(episodes, dtype=np.int64)
    raise ValueError(f"seed_rule must be one of {SEED_RULES}, got {seed_rule!r}")


def _resolve_tasks(tasks) -> list[int]:
    if tasks is None or (isinstance(tasks, str) and tasks in ("all", "mt30")):
        return list(range(len(MT30_TASKS)))
    if isinstance(tasks, (str, int)):
        tasks = [tasks]
    ids = [task_id(t) for t in tasks]
    if not ids:
        raise ValueError("tasks is empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate tasks in {tasks}")
    return ids


@dataclasses.dataclass(frozen=True)
class EvalResult:
    task_names: list[str]
    task_ids: np.ndarray  # [T] int
    returns: np.ndarray  # [T, E] float64
    successes: np.ndarray  # [T, E] float32 (final info['success'])
    env_seeds: np.ndarray  # [T, E] env seed of each episode
    seed: int
    seed_rule: str
    max_steps: int
    wall_time_s: float
    policy_time_s: float
    env_cpu_s: float = float("nan")  # CPU seconds of all env workers during the run (num_workers=0: incl. policy)
    tag: Any = None

    @property
    def episodes(self) -> int:
        return int(self.returns.shape[1])

    @property
    def env_steps(self) -> int:
        """Agent steps simulated (each = 2 dm_control control steps)."""
        return int(self.returns.size * self.max_steps)

    @property
    def return_mean(self) -> dict[str, float]:
        return {n: float(r.mean()) for n, r in zip(self.task_names, self.returns)}

    @property
    def return_std(self) -> dict[str, float]:
        return {n: float(r.std()) for n, r in zip(self.task_names, self.returns)}

    @property
    def success_mean(self) -> dict[str, float]:
        return {n: float(s.mean()) for n, s in zip(self.task_names, self.successes)}

    @property
    def mean_return(self) -> float:
        """Mean over tasks of the per-task mean return."""
        return float(self.returns.mean(axis=1).mean())

    @property
    def normalized_score(self) -> float:
        """TD-MPC2's DMC score: mean over tasks of return / 10 (0-100 for full 500-step episodes)."""
        return self.mean_return / 10.0

    def per_task(self) -> dict[str, dict[str, float]]:
        return {n: {"return_mean": float(r.mean()), "return_std": float(r.std()), "success_mean": float(s.mean())}
                for n, r, s in zip(self.task_names, self.returns, self.successes)}

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat dict with TD-MPC2's metric names (`episode_reward+<task>`, `episode_reward+avg`, ...)."""
        out: dict[str, float] = {}
        for n, r, s in zip(self.task_names, self.returns, self.successes):
            out[f"{prefix}episode_reward+{n}"] = float(r.mean())
            out[f"{prefix}episode_reward_std+{n}"] = float(r.std())
            out[f"{prefix}episode_success+{n}"] = float(s.mean())
        out[f"{prefix}episode_reward+avg"] = self.mean_return
        out[f"{prefix}episode_success+avg"] = float(self.successes.mean())
        out[f"{prefix}eval_wall_s"] = self.wall_time_s
        out[f"{prefix}eval_env_steps_per_s"] = self.env_steps / max(self.wall_time_s, 1e-9)
        return out

    def table(self) -> str:
        lines = [f"{'task':28s} {'return':>9s} {'std':>8s} {'success':>7s}"]
        for n, d in self.per_task().items():
            lines.append(f"{n:28s} {d['return_mean']:9.2f} {d['return_std']:8.2f} {d['success_mean']:7.2f}")
        lines.append(f"{'mean over tasks':28s} {self.mean_return:9.2f}")
        return "\n".join(lines)


class Evaluator:
    """Holds a persistent pool of env workers and a jitted policy; `run(params, seed)` evaluates.

    Build it once (worker start-up and env construction are paid here) and call `run` as often as
    needed; `close()` (or `with Evaluator(...) as ev:`) stops the workers.
    """

    def __init__(self, policy_fn: Callable, tasks: Sequence[str | int] | str | None = None, episodes: int = 10,
                 num_workers: int | None = None, max_steps: int = EPISODE_LENGTH, seed_rule: str = "distinct",
                 start_method: str = "spawn", jit: bool = True):
        import jax

        if seed_rule not in SEED_RULES:
            raise ValueError(f"seed_rule must be one of {SEED_RULES}, got {seed_rule!r}")
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        if seed_rule == "distinct" and episodes > SEED_STRIDE:
            raise ValueError(f"at most {SEED_STRIDE} episodes per task with seed_rule='distinct'")
        self.task_ids = _resolve_tasks(tasks)
        self.task_names = [MT30_TASKS[t] for t in self.task_ids]
        self.episodes = int(episodes)
        self.max_steps = int(max_steps)
        self.seed_rule = seed_rule
        self.slot_tasks = np.repeat(np.array(self.task_ids, np.int32), self.episodes)  # [N]
        self.num_envs = len(self.slot_tasks)
        self._policy = jax.jit(policy_fn) if jit else policy_fn
        self._task_ids_dev = None
        self.pool = EnvPool(self.slot_tasks, num_workers=num_workers, max_steps=self.max_steps,
                            start_method=start_method)

    @property
    def num_workers(self) -> int:
        return self.pool.num_workers

    def seeds(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(env seed, skipped resets) per slot, [N] each."""
        s, k = episode_seeds(int(seed), self.episodes, self.seed_rule)
        T = len(self.task_ids)
        return np.tile(s, T), np.tile(k, T)

    def _task_ids(self):
        import jax.numpy as jnp

        if self._task_ids_dev is None:
            self._task_ids_dev = jnp.asarray(self.slot_tasks, dtype=jnp.int32)
        return self._task_ids_dev

    def warmup(self, params) -> None:
        """Compile the policy for this batch shape (the first run() would otherwise pay for it)."""
        import jax

        obs = np.zeros((self.num_envs, MAX_OBS_DIM), np.float32)
        jax.block_until_ready(self._policy(params, obs, self._task_ids()))

    def run(self, params, seed: int = 0, tag: Any = None) -> EvalResult:
        self._task_ids()
        cpu0 = self.pool.cpu_times()
        t0 = time.perf_counter()
        env_seeds, skips = self.seeds(seed)
        obs = self.pool.reset(env_seeds, skips)
        N = self.num_envs
        returns = np.zeros(N, np.float64)
        success = np.zeros(N, np.float32)
        policy_time = 0.0
        for t in range(self.max_steps):
            tp = time.perf_counter()
            actions = np.asarray(self._policy(params, obs, self._task_ids_dev), dtype=np.float32)
            policy_time += time.perf_counter() - tp
            if actions.shape != (N, MAX_ACTION_DIM):
                raise ValueError(f"policy_fn must return actions of shape ({N}, {MAX_ACTION_DIM}), "
                                 f"got {actions.shape}")
            obs, rew, done, success = self.pool.step(actions)
            returns += rew
            if t == self.max_steps - 1 and not done.all():
                raise AssertionError("envs not done after max_steps")
        wall = time.perf_counter() - t0
        env_cpu = float(np.sum(np.subtract(self.pool.cpu_times(), cpu0)))
        T, E = len(self.task_ids), self.episodes
        return EvalResult(
            task_names=list(self.task_names), task_ids=np.array(self.task_ids), returns=returns.reshape(T, E),
            successes=success.reshape(T, E), env_seeds=env_seeds.reshape(T, E), seed=int(seed),
            seed_rule=self.seed_rule, max_steps=self.max_steps, wall_time_s=wall,
            policy_time_s=policy_time, env_cpu_s=env_cpu, tag=tag)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def evaluate(policy_fn: Callable, params, tasks: Sequence[str | int] | str | None = None, episodes: int = 10,
             seed: int = 0, num_workers: int | None = None, max_steps: int = EPISODE_LENGTH,
             seed_rule: str = "distinct", start_method: str = "spawn") -> EvalResult:
    """One-shot evaluation (starts and stops its own workers). See the module docstring."""
    with Evaluator(policy_fn, tasks, episodes=episodes, num_workers=num_workers, max_steps=max_steps,
                   seed_rule=seed_rule, start_method=start_method) as ev:
        return ev.run(params, seed)


def snapshot(params):
    """A copy of a params pytree that later in-place updates or buffer donation cannot touch."""
    import jax
    import jax.numpy as jnp

    def _copy(x):
        if isinstance(x, jax.Array):
            return jnp.array(x, copy=True)
        if isinstance(x, np.ndarray):
            return np.array(x, copy=True)
        return copy.deepcopy(x)

    return jax.tree.map(_copy, params)


class BackgroundEvaluator:
    """Evaluate snapshots of params in a background thread while training continues.

        bg = BackgroundEvaluator(policy_fn, MT30_TASKS, episodes=10, num_workers=4)
        ...
        bg.submit(state.params, seed=epoch, tag=epoch)   # snapshots params, returns immediately
        for tag, res in bg.poll(): log(res.metrics())    # finished results, non-blocking
        ...
        tag, res = bg.result()                           # block until the in-flight one is done
        bg.close()

    One evaluation runs at a time. `submit` while busy waits for the running one when block=True
    (default) and returns False without submitting when block=False. Exceptions raised by an
    evaluation are re-raised by the next poll()/result()/submit().
    """

    def __init__(self, policy_fn: Callable, tasks=None, episodes: int = 10, num_workers: int | None = None,
                 max_steps: int = EPISODE_LENGTH, seed_rule: str = "distinct", start_method: str = "spawn"):
        self._ev = Evaluator(policy_fn, tasks, episodes=episodes, num_workers=num_workers, max_steps=max_steps,
                             seed_rule=seed_rule, start_method=start_method)
        self._thread: threading.Thread | None = None
        self._done: queue.Queue = queue.Queue()
        self._last = None

    @property
    def evaluator(self) -> Evaluator:
        return self._ev

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _work(self, params, seed, tag):
        try:
            self._done.put(("ok", self._ev.run(params, seed, tag=tag)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._done.put(("error", e))

    def submit(self, params, seed: int = 0, tag: Any = None, block: bool = True) -> bool:
        if self.busy:
            if not block:
                return False
            self._thread.join()
        snap = snapshot(params)
        self._thread = threading.Thread(target=self._work, args=(snap, seed, tag), daemon=True,
                                        name="fmbpo-background-eval")
        self._thread.start()
        return True

    def poll(self) -> list[tuple[Any, EvalResult]]:
        """All evaluations finished since the last poll/result, as (tag, EvalResult), oldest first."""
        out = []
        while True:
            try:
                kind, value = self._done.get_nowait()
            except queue.Empty:
                return out
            if kind == "error":
                raise value
            self._last = value
            out.append((value.tag, value))

    def wait(self, timeout: float | None = None) -> None:
        """Block until the in-flight evaluation (if any) has finished; its result is then in poll()."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("background evaluation still running")

    def result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        """wait(), then the latest finished (tag, result) (None if none ever finished).

        Drains the finished queue like poll(); use wait() + poll() to see every result.
        """
        self.wait(timeout)
        done = self.poll()
        if done:
            return done[-1]
        return None if self._last is None else (self._last.tag, self._last)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self._ev.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
