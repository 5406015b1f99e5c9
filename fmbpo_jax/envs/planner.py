"""MPPI planning in the latent world model with the policy as a prior (TD-MPC2's `plan`), and the
"planning" evaluation built on it (the fixed-preset answer to B8: the reference has no planner).

Per env and agent step (spec 5.3; TD-MPC2 `tdmpc2.py:_plan`, `config.yaml`):
  z0 = encode(obs, task)
  policy prior: `num_pi_trajs` trajectories rolled in the WM with the STOCHASTIC actor (tanh, masked),
    drawn once per step and kept for every iteration
  mean = prev_mean shifted by one step (last step 0), std = max_std
  repeat `iterations` times:
    samples = clip(mean + std * N(0, 1), -1, 1) for the other num_samples - num_pi_trajs trajectories
    actions = [policy prior, samples] * mask
    V = sum_t gamma^t r_t + gamma^H min_k V_k(z_H)    (rewards: reward_value(..., pcfg.reward_symexp);
                                                       NaN -> 0 as TD-MPC2's nan_to_num(0))
    top `num_elites` by V; score = exp(temperature * (V - max)) normalised
    mean, std = score-weighted mean and std of the elites; std clipped to [min_std, max_std]; both masked
  executed action: the first action of an elite drawn in proportion to its score (TD-MPC2 eval mode),
    or mean[0] with `deterministic=True`; clipped to [-1, 1] and masked. The final mean is the next
    step's `prev_mean` (zeros at the start of an episode).

Everything is pure and jittable: iterations are a `lax.scan`, the horizon is a `lax.scan`, envs are
vmapped; per-env parameters are chosen by vmapping over the task axis, slots task-major (slot i belongs to
task row i // episodes), exactly like `training.program.make_policy_fn`.

    mcfg = MPPIConfig.from_config(config.eval)
    planner = jax.jit(make_planner_fn(pcfg, mcfg, shared_wm=True))
    actions, mean = planner(bundle, obs [N, O], task_ids [N], prev_mean [N, H, A], key)
    # bundle = {'actor': [T, ...], 'wm': shared (or [T, ...] with shared_wm=False), 'critic': [T, ...]}

`mppi(mcfg, score_fn, prev_mean, pi_actions, mask, key)` is the update on its own: `score_fn(actions
[H, N, A]) -> [N]` is injectable (tests use analytic value functions).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import actors, critic, mathops, nets
from fmbpo_jax import world_model as wm
from fmbpo_jax.envs.evaluate import EvalResult, episode_seeds
from fmbpo_jax.envs.pool import EnvPool
from fmbpo_jax.envs.tasks import MAX_ACTION_DIM, MAX_OBS_DIM, MT30_TASKS

Params = dict[str, Any]
PLANNING_SEED_OFFSET = 3  # planning evaluation env seed = config.eval.seed + 3 (final plain eval: + 1)


@dataclasses.dataclass(frozen=True)
class MPPIConfig:
    """Static MPPI settings (hashable). Defaults: TD-MPC2's config.yaml.

    deterministic: execute mean[0] instead of TD-MPC2's score-proportional draw of an elite's first action.
    """

    horizon: int = 3
    iterations: int = 6
    num_samples: int = 512
    num_elites: int = 64
    num_pi_trajs: int = 24
    temperature: float = 0.5
    min_std: float = 0.05
    max_std: float = 2.0
    deterministic: bool = False

    def __post_init__(self):
        if self.horizon < 1 or self.iterations < 1:
            raise ValueError(f"MPPI horizon and iterations must be >= 1, got {self.horizon}, {self.iterations}")
        if not 0 <= self.num_pi_trajs < self.num_samples:
            raise ValueError(f"mppi_policy_trajs={self.num_pi_trajs} must be in [0, mppi_samples={self.num_samples})")
        if not 1 <= self.num_elites <= self.num_samples:
            raise ValueError(f"mppi_elites={self.num_elites} must be in [1, mppi_samples={self.num_samples}]")
        if not 0 < self.min_std <= self.max_std:
            raise ValueError(f"need 0 < mppi_min_std={self.min_std} <= mppi_max_std={self.max_std}")

    @classmethod
    def from_config(cls, eval_cfg, deterministic: bool | None = None) -> "MPPIConfig":
        """From `config.eval` (fields mppi_*; `mppi_deterministic` optional, default False = TD-MPC2)."""
        get = eval_cfg.get if hasattr(eval_cfg, "get") else (lambda k, d=None: getattr(eval_cfg, k, d))
        if deterministic is None:
            deterministic = bool(get("mppi_deterministic", False))
        return cls(horizon=int(eval_cfg.mppi_horizon), iterations=int(eval_cfg.mppi_iterations),
                   num_samples=int(eval_cfg.mppi_samples), num_elites=int(eval_cfg.mppi_elites),
                   num_pi_trajs=int(eval_cfg.mppi_policy_trajs), temperature=float(eval_cfg.mppi_temperature),
                   min_std=float(eval_cfg.mppi_min_std), max_std=float(eval_cfg.mppi_max_std),
                   deterministic=deterministic)


# ============================================================================================ the update


def shift_mean(prev_mean: jax.Array) -> jax.Array:
    """Warm start: [H, A] -> mean[:-1] = prev_mean[1:], mean[-1] = 0 (TD-MPC2)."""
    return jnp.concatenate([prev_mean[1:], jnp.zeros_like(prev_mean[:1])], axis=0)


def mppi(mcfg: MPPIConfig, score_fn: Callable[[jax.Array], jax.Array], prev_mean: jax.Array,
         pi_actions: jax.Array | None, mask: jax.Array | None, key: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """One planning step for one env.

    score_fn(actions [H, N, A]) -> values [N] (N = num_samples); prev_mean [H, A] (zeros at episode start);
    pi_actions [H, P, A] (P = num_pi_trajs, already tanh-bounded) or None when P = 0; mask [A] or None.
    Returns (action [A], mean [H, A] (the next prev_mean), info {'std' [H, A], 'elite_values' [E],
    'elite_actions' [H, E, A], 'score' [E]}) from the last iteration.
    """
    H, A = prev_mean.shape
    if H != mcfg.horizon:
        raise ValueError(f"prev_mean has horizon {H}, MPPIConfig.horizon={mcfg.horizon}")
    P, E = mcfg.num_pi_trajs, mcfg.num_elites
    n_rand = mcfg.num_samples - P
    dtype = prev_mean.dtype
    if P:
        if pi_actions is None or pi_actions.shape != (H, P, A):
            raise ValueError(f"pi_actions must have shape {(H, P, A)}, got {None if pi_actions is None else pi_actions.shape}")
    else:
        pi_actions = jnp.zeros((H, 0, A), dtype)
    m = jnp.ones((A,), dtype) if mask is None else jnp.asarray(mask, dtype)
    pi_actions = pi_actions * m

    k_iter, k_select = jax.random.split(key)
    mean = shift_mean(prev_mean) * m
    std = jnp.full((H, A), mcfg.max_std, dtype)

    def iteration(carry, k):
        mean, std = carry[0], carry[1]
        eps = jax.random.normal(k, (H, n_rand, A), dtype)
        samples = jnp.clip(mean[:, None] + std[:, None] * eps, -1.0, 1.0)
        actions = jnp.concatenate([pi_actions, samples], axis=1) * m  # [H, N, A]
        value = jnp.nan_to_num(score_fn(actions), nan=0.0)  # [N]
        elite_value, idx = jax.lax.top_k(value, E)
        elite_actions = jnp.take(actions, idx, axis=1)  # [H, E, A]
        logits = mcfg.temperature * (elite_value - jnp.max(elite_value))
        score = jax.nn.softmax(logits)  # exp(temp (V - max)) / sum
        new_mean = jnp.einsum("e,hea->ha", score, elite_actions)
        var = jnp.einsum("e,hea->ha", score, jnp.square(elite_actions - new_mean[:, None]))
        new_std = jnp.clip(jnp.sqrt(var), mcfg.min_std, mcfg.max_std)
        return (new_mean * m, new_std * m, elite_actions, elite_value, logits), None

    init = (mean, std, jnp.zeros((H, E, A), dtype), jnp.zeros((E,), dtype), jnp.zeros((E,), dtype))
    (mean, std, elite_actions, elite_value, logits), _ = jax.lax.scan(
        iteration, init, jax.random.split(k_iter, mcfg.iterations))
    if mcfg.deterministic:
        a = mean[0]
    else:
        a = elite_actions[0, jax.random.categorical(k_select, logits)]
    a = jnp.clip(a, -1.0, 1.0) * m
    info = {"std": std, "elite_values": elite_value, "elite_actions": elite_actions, "score": jax.nn.softmax(logits)}
    return a, mean, info


# ============================================================================= world-model pieces


def trajectory_values(pcfg, wm_params: Params, critic_params: Params, z0: jax.Array, actions: jax.Array, task) -> jax.Array:
    """sum_t gamma^t r_t + gamma^H min_k V_k(z_H) for actions [H, N, A] from latent z0 [L] -> [N]."""
    N = actions.shape[1]
    z = jnp.broadcast_to(z0, (N,) + z0.shape[-1:])

    def body(carry, a):
        z, ret, disc = carry
        z_next, logits = wm.step(pcfg.wm, wm_params, z, a, task)
        r = wm.reward_value(pcfg.wm, logits, pcfg.reward_symexp)[..., 0]
        return (z_next, ret + disc * r, disc * pcfg.gamma), None

    init = (z, jnp.zeros((N,), z.dtype), jnp.ones((), z.dtype))
    (z_h, ret, disc), _ = jax.lax.scan(body, init, actions)
    return ret + disc * critic.min_value(pcfg.critic, critic_params, z_h)


def policy_prior(pcfg, actor_params: Params, wm_params: Params, z0: jax.Array, task, mask: jax.Array | None,
                 num: int, horizon: int, key: jax.Array) -> jax.Array:
    """`num` trajectories of the stochastic actor (tanh, masked) rolled in the WM from z0 [L] -> [H, num, A]."""
    z = jnp.broadcast_to(z0, (num,) + z0.shape[-1:])
    keys = jax.random.split(key, horizon)

    def act(z, k):
        a = mathops.tanh(actors.action(pcfg.actor, actor_params, z, k, deterministic=False))
        return a if mask is None else a * mask

    def body(z, k):
        a = act(z, k)
        return wm.next_latent(pcfg.wm, wm_params, z, a, task), a

    z_last, first = jax.lax.scan(body, z, keys[:-1])  # H-1 transitions; the last action needs no next latent
    return jnp.concatenate([first, act(z_last, keys[-1])[None]], axis=0)


def plan(pcfg, mcfg: MPPIConfig, actor_params: Params, wm_params: Params, critic_params: Params, obs: jax.Array,
         task, prev_mean: jax.Array, key: jax.Array, mask: jax.Array | None = None):
    """MPPI for ONE env: obs [O], scalar task id, prev_mean [H, A] -> (action [A], mean [H, A], info)."""
    z0 = wm.encode(pcfg.wm, wm_params, obs, task)
    k_pi, k_mppi = jax.random.split(key)
    pi = None
    if mcfg.num_pi_trajs:
        pi = policy_prior(pcfg, actor_params, wm_params, z0, task, mask, mcfg.num_pi_trajs, mcfg.horizon, k_pi)
    score_fn = lambda actions: trajectory_values(pcfg, wm_params, critic_params, z0, actions, task)
    return mppi(mcfg, score_fn, prev_mean, pi, mask, k_mppi)


def mask_table(pcfg) -> jax.Array | None:
    """[num_tasks, A] action masks when `pcfg.action_masks` and `pcfg.action_dims` are set, else None."""
    if pcfg.action_masks and pcfg.action_dims:
        return nets.action_mask_table(pcfg.action_dims, pcfg.wm.action_dim)
    return None


def make_planner_fn(pcfg, mcfg: MPPIConfig, shared_wm: bool, task_chunk: int = 0) -> Callable:
    """planner(bundle, obs [N, O], task_ids [N], prev_mean [N, H, A], key) -> (actions [N, A], mean [N, H, A]).

    bundle = {'actor': [T, ...], 'wm': shared params (shared_wm) or [T, ...], 'critic': [T, ...]}; N = T * E with
    slots task-major (slot i -> bundle row i // E); every slot of a row must carry that row's task id. One PRNG
    key per call (split per slot inside). task_chunk > 0: `lax.map` over task rows in groups of that size
    (less memory) instead of one vmap. Pure; wrap in jax.jit.
    """
    masks = mask_table(pcfg)
    H, A = mcfg.horizon, pcfg.wm.action_dim

    def one_task(actor_p, wm_p, critic_p, obs, task, prev_mean, keys):
        m = None if masks is None else masks[task]
        f = lambda o, pm, k: plan(pcfg, mcfg, actor_p, wm_p, critic_p, o, task, pm, k, m)[:2]
        return jax.vmap(f)(obs, prev_mean, keys)

    def planner(bundle, obs, task_ids, prev_mean, key):
        T = jax.tree_util.tree_leaves(bundle["actor"])[0].shape[0]
        N = obs.shape[0]
        if N % T:
            raise ValueError(f"{N} env slots do not split evenly over {T} task rows")
        E = N // T
        if prev_mean.shape != (N, H, A):
            raise ValueError(f"prev_mean must have shape {(N, H, A)}, got {prev_mean.shape}")
        keys = jax.random.split(key, N)
        keys = keys.reshape((T, E) + keys.shape[1:])
        obs_t = obs.reshape(T, E, obs.shape[-1])
        tasks_t = task_ids.reshape(T, E)[:, 0]
        pm_t = prev_mean.reshape(T, E, H, A)
        if shared_wm:
            f = lambda a, c, o, t, pm, k: one_task(a, bundle["wm"], c, o, t, pm, k)
            xs = (bundle["actor"], bundle["critic"], obs_t, tasks_t, pm_t, keys)
        else:
            f = one_task
            xs = (bundle["actor"], bundle["wm"], bundle["critic"], obs_t, tasks_t, pm_t, keys)
        if task_chunk and task_chunk < T:
            acts, means = jax.lax.map(lambda x: f(*x), xs, batch_size=task_chunk)
        else:
            acts, means = jax.vmap(f)(*xs)
        return acts.reshape(N, A), means.reshape(N, H, A)

    return planner


def jitted_planner(pcfg, mcfg: MPPIConfig, shared_wm: bool, task_chunk: int = 0) -> Callable:
    """jax.jit(make_planner_fn(...)), one per static configuration (so repeated evaluations compile once)."""
    return _jitted_planner(pcfg, mcfg, bool(shared_wm), int(task_chunk or 0))


@functools.lru_cache(maxsize=8)
def _jitted_planner(pcfg, mcfg, shared_wm, task_chunk):
    return jax.jit(make_planner_fn(pcfg, mcfg, shared_wm, task_chunk))


# ============================================================================= planning evaluation


class PlanningEvaluator:
    """Env pool for tasks x episodes plus the jitted planner; `run(bundle, seed, key)` -> EvalResult.

    Same layout and "distinct" seeding as `Evaluator(seed_rule="distinct")`: slot i = (task_ids[i // E],
    episode i % E) in an env seeded seed * 1000 + e. prev_mean is zeros at every episode start.
    """

    def __init__(self, pcfg, mcfg: MPPIConfig, task_ids, episodes: int, shared_wm: bool, num_workers: int | None = None,
                 max_steps: int = 500, task_chunk: int = 0, start_method: str = "spawn", pool=None):
        """pool: an existing EnvPool with this slot layout (e.g. the plain evaluator's `ev.pool`) to reuse instead of
        starting workers; it is left open by close()."""
        if pcfg.wm.action_dim > MAX_ACTION_DIM:
            raise ValueError(f"world model action_dim={pcfg.wm.action_dim} exceeds the env's {MAX_ACTION_DIM}")
        if pcfg.wm.obs_dim != MAX_OBS_DIM:
            raise ValueError(f"world model obs_dim={pcfg.wm.obs_dim} != the env's padded {MAX_OBS_DIM}")
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        self.pcfg, self.mcfg = pcfg, mcfg
        self.task_ids = [int(t) for t in task_ids]
        self.task_names = [MT30_TASKS[t] for t in self.task_ids]
        self.episodes = int(episodes)
        self.max_steps = int(max_steps)
        self.slot_tasks = np.repeat(np.array(self.task_ids, np.int32), self.episodes)
        self.num_envs = len(self.slot_tasks)
        self._planner = jitted_planner(pcfg, mcfg, shared_wm, task_chunk)
        self._own_pool = pool is None
        if pool is None:
            pool = EnvPool(self.slot_tasks, num_workers=num_workers, max_steps=self.max_steps, start_method=start_method)
        elif not np.array_equal(np.asarray(pool.task_ids), self.slot_tasks) or pool.max_steps != self.max_steps:
            raise ValueError("the given EnvPool's slots (tasks x episodes, task-major) or max_steps differ from this evaluation's")
        self.pool = pool

    def seeds(self, seed: int) -> np.ndarray:
        s, _ = episode_seeds(int(seed), self.episodes, "distinct")
        return np.tile(s, len(self.task_ids))

    def run(self, bundle, seed: int, key: jax.Array, tag: Any = None) -> EvalResult:
        N, H, A = self.num_envs, self.mcfg.horizon, self.pcfg.wm.action_dim
        cpu0 = self.pool.cpu_times()
        t0 = time.perf_counter()
        env_seeds = self.seeds(seed)
        obs = self.pool.reset(env_seeds)
        task_ids = jnp.asarray(self.slot_tasks)
        prev_mean = jnp.zeros((N, H, A), jnp.float32)  # episode start: no warm start
        returns = np.zeros(N, np.float64)
        success = np.zeros(N, np.float32)
        actions = np.zeros((N, MAX_ACTION_DIM), np.float32)
        plan_time = 0.0
        for t in range(self.max_steps):
            tp = time.perf_counter()
            a, prev_mean = self._planner(bundle, jnp.asarray(obs), task_ids, prev_mean, jax.random.fold_in(key, t))
            actions[:, :A] = np.asarray(a, np.float32)
            plan_time += time.perf_counter() - tp
            obs, rew, done, success = self.pool.step(actions)
            returns += rew
            if t == self.max_steps - 1 and not done.all():
                raise AssertionError("envs not done after max_steps")
        wall = time.perf_counter() - t0
        env_cpu = float(np.sum(np.subtract(self.pool.cpu_times(), cpu0)))
        T, E = len(self.task_ids), self.episodes
        return EvalResult(task_names=list(self.task_names), task_ids=np.array(self.task_ids),
                          returns=returns.reshape(T, E), successes=np.asarray(success, np.float32).reshape(T, E),
                          env_seeds=env_seeds.reshape(T, E), seed=int(seed), seed_rule="distinct",
                          max_steps=self.max_steps, wall_time_s=wall, policy_time_s=plan_time, env_cpu_s=env_cpu,
                          tag=tag)

    def close(self) -> None:
        if self._own_pool:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def evaluate_planning(pcfg, mcfg: MPPIConfig, spec, bundles: list, critic_rows, shared_wm: bool, *, episodes: int,
                      max_steps: int, eval_seed: int, num_workers: int | None = None, task_chunk: int = 0, pool=None,
                      log: Callable[[str], None] | None = None) -> list[EvalResult]:
    """MPPI evaluation of every run: a list over seeds of EvalResult (returns/successes [T, E]).

    bundles[s] = {'actor': [T, ...], 'wm': shared (shared_wm) or [T, ...]}; the critic rows of seed s are
    critic_rows[s*T:(s+1)*T] (runs seed-major). Env seed = eval_seed + 3 ("distinct" rule); the MPPI noise of seed
    s comes from fold_in(PRNGKey(eval_seed + 3), spec.seeds[s]) and then the step index. num_workers: env worker
    processes (None = automatic, 0 = in-process). task_chunk: task rows planned at once (0 = all). pool: reuse an
    EnvPool with the same layout (the trainer's evaluator's pool) instead of starting new workers.
    """
    T = spec.num_tasks
    if len(bundles) != len(spec.seeds):
        raise ValueError(f"{len(bundles)} bundles for {len(spec.seeds)} seeds")
    seed = int(eval_seed) + PLANNING_SEED_OFFSET
    base = jax.random.PRNGKey(seed)
    results = []
    with PlanningEvaluator(pcfg, mcfg, spec.task_ids, episodes, shared_wm=shared_wm, num_workers=num_workers,
                           max_steps=max_steps, task_chunk=task_chunk, pool=pool) as pev:
        for s, b in enumerate(bundles):
            crit = jax.tree_util.tree_map(lambda x: x[s * T:(s + 1) * T], critic_rows)
            bundle = {"actor": b["actor"], "wm": b["wm"], "critic": crit}
            res = pev.run(bundle, seed, jax.random.fold_in(base, int(spec.seeds[s])), tag=("planning", spec.seeds[s]))
            if log is not None:
                log(f"[planning eval seed {spec.seeds[s]}] mean return {res.mean_return:.1f} ({res.wall_time_s:.0f} s)")
            results.append(res)
    return results
