"""The jittable training program: every (seed, task) run of a phase in one compiled call.

Per-run state (`RunState`: pwm's TrainState, the run's PRNG key and NaN streak) is
stacked on a leading run axis R = seeds x tasks. One jitted call trains `num_epochs` epochs: `lax.scan` over
epochs of `vmap(pwm.update)` over runs (or `lax.map` in groups of `task_chunk` runs when memory binds), batches
sampled inside the program from the device-resident store (`make_train_chunk`) or fed from the host prefetcher
(`make_train_chunk_host`), state donated, metrics [N, R] returned once per call. A frozen WM is shared by all
runs (in_axes=None). Also here: the evaluation policy, the diagnostics program and the best-params selection.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fmbpo_jax import actors, diagnostics, mathops, nets, pwm, sharding
from fmbpo_jax import world_model as wm
from fmbpo_jax.data.sampler import WindowData
from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, MAX_ACTION_DIM
from fmbpo_jax.run_config import RunSpec

Params = dict[str, Any]


def run_keys(spec: RunSpec) -> jax.Array:
    """One independent PRNG stream per run: fold_in(PRNGKey(seed), task_id). Raw uint32 [R, 2]."""
    return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), t) for s, t in zip(spec.run_seeds, spec.run_task_ids)])


@struct.dataclass
class RunState:
    """One run in the trainer (stacked on a leading run axis R): the algorithm's state, the run's own PRNG stream,
    and how many updates in a row it skipped for non-finite values (the trainer stops at max_nan_skips)."""

    train: pwm.TrainState
    key: jax.Array
    nan_streak: jax.Array


def init_runs(cfg: pwm.PWMConfig, keys: jax.Array, wm_params: Params | None = None) -> RunState:
    """Stacked per-run training state [R, ...] from raw keys [R, 2].

    wm_params: pretrained WM copied into every run when fine-tuning (None: a fresh WM per run).
    """
    def one(k):
        k_init, k_train = jax.random.split(k)
        return RunState(train=pwm.init_state(cfg, k_init, wm_params), key=k_train, nan_streak=jnp.zeros((), jnp.int32))

    return jax.vmap(one)(keys)


def sample_run(data: WindowData, pos: jax.Array, key: jax.Array, batch_size: int, horizon: int) -> dict:
    """B windows of H+1 steps of task row `pos` of the device store, time-major.

    Indices go straight into the flattened [T * E * L] arrays, so a traced `pos` never copies a task's data.
    Returns obs [H+1, B, O], action [H, B, A], reward [H, B] (action/reward that follow each obs).
    """
    L = data.episode_length
    rows = data.obs.shape[1]
    k_ep, k_start = jax.random.split(key)
    j = jax.random.randint(k_ep, (batch_size,), 0, data.num_entries[pos])
    ep = data.episode_map[pos, j]
    start = jax.random.randint(k_start, (batch_size,), 0, L - horizon)
    idx = (pos * rows + ep * L + start)[:, None] + jnp.arange(horizon + 1)[None, :]  # [B, H+1]
    obs = jnp.take(data.obs.reshape(-1, data.obs.shape[-1]), idx, axis=0)
    act = jnp.take(data.action.reshape(-1, data.action.shape[-1]), idx[:, 1:], axis=0)
    rew = jnp.take(data.reward.reshape(-1), idx[:, 1:], axis=0)
    return {"obs": jnp.swapaxes(obs, 0, 1), "action": jnp.swapaxes(act, 0, 1), "reward": jnp.swapaxes(rew, 0, 1)}


def _epoch_one_run(cfg: pwm.PWMConfig, batch_size: int, wm_batch_size: int, st: RunState, frozen_wm, data, pos, task,
                   constrain: Callable | None = None):
    """One epoch of one run with in-program sampling. Returns (state, metrics).

    constrain: `sharding.constrain_batch(mesh)` to split the batch axis over the mesh's 'data' devices (None: as is).
    """
    key, k_batch, k_wm, k_update = jax.random.split(st.key, 4)
    batch = sample_run(data, pos, k_batch, batch_size, cfg.horizon)
    batch["task"] = task
    if cfg.finetune_wm and cfg.wm_updates == "iterations":
        wm_b = jax.vmap(lambda k: sample_run(data, pos, k, wm_batch_size, cfg.horizon))(jax.random.split(k_wm, cfg.wm_iterations))
        batch["wm"] = wm_b
    if constrain is not None:
        batch = constrain(batch)
    return _update_one_run(cfg, st, batch, key, k_update, frozen_wm)


def _update_one_run(cfg, st: RunState, batch, next_key, k_update, frozen_wm) -> tuple[RunState, dict]:
    train, metrics = pwm.update(cfg, st.train, batch, k_update, frozen_wm)
    skipped = metrics["actor_nan_skip"] + metrics.get("wm_nan_skips", 0)
    return RunState(train=train, key=next_key, nan_streak=jnp.where(skipped > 0, st.nan_streak + 1, 0)), metrics


def _check_constraint(constrain: Callable | None, task_chunk: int) -> None:
    if constrain is not None and task_chunk:
        # lax.map's inner vmap has no spmd_axis_name: the constraint would replicate the run axis over 'task'
        raise ValueError("a batch constraint (mesh 'data' axis > 1, --config.data_parallel) needs --config.task_chunk=0")


def _map_runs(f: Callable, args: tuple, task_chunk: int, constrain: Callable | None):
    """f over the leading run axis of `args`: vmap, lax.map in groups of task_chunk, or vmap with the run axis
    named 'task' so that a batch constraint inside f keeps the runs sharded on 'task'.

    task_chunk=1 and a single run call f unbatched (lax.map without batch_size, or f on the squeezed run):
    a vmapped run axis turns every per-run matmul into a batched dot, which XLA:CPU runs far slower (48M
    frozen epoch: 5.8 s unbatched vs 8.9 s as a vmap of one run)."""
    if task_chunk == 1:
        return jax.lax.map(lambda xs: f(*xs), args)
    if task_chunk:
        return jax.lax.map(lambda xs: f(*xs), args, batch_size=task_chunk)
    if constrain is None and all(np.shape(x)[0] == 1 for x in jax.tree_util.tree_leaves(args)):
        out = f(*jax.tree_util.tree_map(lambda x: x[0], args))
        return jax.tree_util.tree_map(lambda x: x[None], out)
    if constrain is not None:
        return jax.vmap(f, spmd_axis_name=sharding.TASK)(*args)
    return jax.vmap(f)(*args)


def make_train_chunk(cfg: pwm.PWMConfig, num_epochs: int, batch_size: int, wm_batch_size: int, task_chunk: int = 0,
                     constrain: Callable | None = None) -> Callable:
    """jit(state [R], frozen_wm | None, data: WindowData, run_pos [R], run_task [R]) -> (state, metrics [N, R]).

    lax.scan over `num_epochs` epochs; per epoch the runs are vmapped (or lax.map'ed in groups of
    `task_chunk` when memory binds). The state is donated. constrain: see `_epoch_one_run` (needs task_chunk=0).
    """
    _check_constraint(constrain, task_chunk)

    def epoch_all_runs(state, frozen_wm, data, run_pos, run_task):
        f = lambda st, pos, task: _epoch_one_run(cfg, batch_size, wm_batch_size, st, frozen_wm, data, pos, task, constrain)
        return _map_runs(f, (state, run_pos, run_task), task_chunk, constrain)

    def chunk(state, frozen_wm, data, run_pos, run_task):
        return jax.lax.scan(lambda st, _: epoch_all_runs(st, frozen_wm, data, run_pos, run_task), state, None, length=num_epochs)

    return jax.jit(chunk, donate_argnums=(0,))


def make_train_chunk_host(cfg: pwm.PWMConfig, num_seeds: int, batch_size: int, wm_batch_size: int, task_chunk: int = 0,
                          pad_index: np.ndarray | None = None, run_major: bool = False,
                          constrain: Callable | None = None) -> Callable:
    """Host-fed variant: jit(state, frozen_wm, batches, run_task) with batches from the HostSampler.

    batches: obs [N, T, S*(B + I*Bw), H+1, O] (batch-major, as the sampler gives them): window block s of
    each task goes to seed s; within a block the first B windows feed the policy, the rest the WM steps.
    run_major=True: batches are already per run row, obs [N, R_pad, B + I*Bw, H+1, O] (`training.feed.local_host_batches`,
    multi-process), so neither the task->run regrouping nor pad_index applies.
    """
    _check_constraint(constrain, task_chunk)
    per = batch_size + (cfg.wm_iterations * wm_batch_size if cfg.finetune_wm and cfg.wm_updates == "iterations" else 0)

    def to_runs(x):  # [T, S*per, ...] -> [R=S*T, per, ...], seed-major
        T = x.shape[0]
        x = x.reshape((T, num_seeds, per) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape((num_seeds * T, per) + x.shape[3:])

    def one(st, frozen_wm, b, task):
        key, k_update = jax.random.split(st.key)
        tm = lambda x: jnp.swapaxes(x, 0, 1)
        batch = {"obs": tm(b["obs"][:batch_size]), "action": tm(b["action"][:batch_size]),
                 "reward": tm(b["reward"][:batch_size]), "task": task}
        if per > batch_size:
            split = lambda x: jnp.swapaxes(x[batch_size:].reshape((cfg.wm_iterations, wm_batch_size) + x.shape[1:]), 1, 2)
            batch["wm"] = {k: split(b[k]) for k in ("obs", "action", "reward")}
        if constrain is not None:
            batch = constrain(batch)
        return _update_one_run(cfg, st, batch, key, k_update, frozen_wm)

    def chunk(state, frozen_wm, batches, run_task):
        def body(st, b):
            if run_major:
                runs_b = {k: b[k] for k in ("obs", "action", "reward")}
            else:
                runs_b = {k: to_runs(b[k]) for k in ("obs", "action", "reward")}
                if pad_index is not None:  # dummy runs (sharding padding) reuse a real run's batch
                    runs_b = {k: v[pad_index] for k, v in runs_b.items()}
            f = lambda s, bb, t: one(s, frozen_wm, bb, t)
            return _map_runs(f, (st, runs_b, run_task), task_chunk, constrain)

        return jax.lax.scan(body, state, batches)

    return jax.jit(chunk, donate_argnums=(0,))


def make_diagnostics_fn(cfg: pwm.PWMConfig, batch_size: int, num_groups: int, num_probes: int, jac_samples: int) -> Callable:
    """jit(state [R], frozen_wm | None, data, run_pos [R], run_task [R]) -> {name: [R]} diagnostics; state not donated.

    Each run samples a fresh batch from a key folded off its own stream, so training is unchanged by diagnostics.
    """
    def one(st, frozen_wm, data, pos, task):
        k_batch, k_diag = jax.random.split(jax.random.fold_in(st.key, 0x0D1A6))
        batch = sample_run(data, pos, k_batch, batch_size, cfg.horizon)
        batch["task"] = task
        return diagnostics.epoch_diagnostics(cfg, st.train, batch, k_diag, frozen_wm, num_groups=num_groups,
                                             num_probes=num_probes, max_jac_samples=jac_samples)

    def all_runs(state, frozen_wm, data, run_pos, run_task):
        return jax.vmap(lambda st, pos, task: one(st, frozen_wm, data, pos, task))(state, run_pos, run_task)

    return jax.jit(all_runs)


@functools.lru_cache(maxsize=16)
def make_policy_fn(cfg: pwm.PWMConfig, shared_wm: bool, apply_masks: bool) -> Callable:
    """Deterministic evaluation policy for the batched evaluator (one function per setting: the evaluators' jit of it
    compiles once per process).

    policy(bundle, obs [N, 24], task_ids [N]) -> tanh actions [N, 6]; bundle = {'actor': [T, ...],
    'wm': shared or [T, ...]}, slots task-major (slot i belongs to bundle row i // (N / T)), as the
    evaluator lays them out for its task list.
    """
    masks = nets.action_mask_table(ACTION_DIMS_BY_ID, MAX_ACTION_DIM)

    def one_task(actor_p, wm_p, obs, task):
        z = wm.encode(cfg.wm, wm_p, obs, task)
        a = mathops.tanh(actors.action(cfg.actor, actor_p, z, None, deterministic=True))
        return a * masks[task] if apply_masks else a

    def policy(bundle, obs, task_ids):
        T = jax.tree_util.tree_leaves(bundle["actor"])[0].shape[0]
        E = obs.shape[0] // T
        obs_t = obs.reshape(T, E, obs.shape[-1])
        tasks_t = task_ids.reshape(T, E)[:, 0]
        wm_axis = None if shared_wm else 0
        out = jax.vmap(one_task, in_axes=(0, wm_axis, 0, 0))(bundle["actor"], bundle["wm"], obs_t, tasks_t)
        return out.reshape(T * E, MAX_ACTION_DIM)

    return policy


@jax.jit
def select_best(best: dict, snap: dict, improved: jax.Array) -> dict:
    """Per-run where(improved, snapshot, best) over every leaf [R, ...]."""
    def sel(b, s):
        return jnp.where(improved.reshape((-1,) + (1,) * (b.ndim - 1)), s, b)
    return jax.tree_util.tree_map(sel, best, snap)
