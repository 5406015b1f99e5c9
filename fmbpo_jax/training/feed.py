"""How batches reach the training program: the data store opened for the plan's tasks, and one feed per data mode.

- `DeviceFeed`: the whole store on the accelerator (replicated), windows sampled inside the program.
- `HostFeed`: the store memory-mapped on the host; a prefetching HostSampler gathers each chunk's windows in
  threads. With several processes each gathers only the tasks of its own runs and feeds its rows of the
  run-major global batch (`local_run_layout`, `local_host_batches`).

A feed gives the jitted, sharded chunk program (`program(n, task_chunk)`) and its data arguments for the next
chunk (`args(n)`), so the loop calls `program(n, task_chunk)(state, frozen_wm, *feed.args(n))` either way.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from fmbpo_jax.data.sampler import HostSampler, WindowData, load_device_data
from fmbpo_jax.data.store import Store, StoreError, open_store
from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.run_config import ConfigError, DataPlan, RunPlan, RunSpec
from fmbpo_jax.sharding import RunAxis
from fmbpo_jax.training import program


def open_data(data: DataPlan, spec: RunSpec, episode_subsampling: str, horizon: int, multiprocess: bool = False):
    """The per-task store of the plan's tasks: ('device', WindowData) or ('host', Store).

    multiprocess: several JAX processes train this config; only the host sampler splits the data by process
    (each reads only its own runs' tasks), so 'auto' picks it and 'device' is an error.
    """
    d = data.dataset_dir
    if not d:
        raise ConfigError("--config.data.dataset_dir is empty: convert the MT30 chunks once with "
                          "`python -m convert_ckpt dataset --src CHUNKS --dst DIR` (README 'Getting and converting the MT30 dataset')")
    try:
        store = open_store(d)
    except (StoreError, OSError) as e:
        raise ConfigError(f"--config.data.dataset_dir={d!r}: {e}") from None
    missing = [MT30_TASKS[t] for t in spec.task_ids if t not in store.tasks or store.episodes(t) == 0]
    if missing:
        raise ConfigError(f"--config.data.dataset_dir={d!r} has no episodes for task(s) {missing}")
    if horizon + 1 > store.episode_length:
        raise ConfigError(f"--config.alg.horizon={horizon}: windows of H+1 steps exceed the store's episode length {store.episode_length}")
    nbytes = sum(store.episodes(t) for t in spec.task_ids) * store.episode_length * (store.obs_dim + store.action_dim + 1) * 4
    mode = data.sampler
    if mode == "auto":
        mode = "device" if nbytes <= data.device_budget_gb * 2**30 and not multiprocess else "host"
    if mode == "device" and multiprocess:
        raise ConfigError("--config.data.sampler=device: a multi-process run needs --config.data.sampler=host (or auto): "
                          "the device store is replicated on every device, the host sampler reads per process only "
                          "the tasks of that process's runs")
    if mode == "device":
        return "device", load_device_data(store, list(spec.task_ids), episode_subsampling=episode_subsampling,
                                          seed=spec.seeds[0])
    return "host", store


class DeviceFeed:
    """In-program sampling from the device store: args = (data, run_pos [R_pad], run_task [R_pad])."""

    def __init__(self, plan: RunPlan, data: WindowData, axis: RunAxis):
        self.plan, self.axis = plan, axis
        self.data = axis.replicate(data)
        spec = plan.spec
        self.run_pos, self.run_task = axis.place_host((np.asarray(spec.run_task_pos, np.int32),
                                                       np.asarray(spec.run_task_ids, np.int32)))

    def program(self, n: int, task_chunk: int) -> Callable:
        p = self.plan
        fn = program.make_train_chunk(p.pwm, n, p.batch_size, p.wm_batch_size, task_chunk, constrain=self.axis.constrain())
        return self.axis.shard_chunk(fn)

    def args(self, n: int) -> tuple:
        return self.data_args()

    def data_args(self) -> tuple:
        """(data, run_pos, run_task): what every program sampling in-program takes (the chunk, diagnostics)."""
        return self.data, self.run_pos, self.run_task

    def close(self) -> None:
        pass


class HostFeed:
    """Host-gathered chunks: args = (batches, run_task [R_pad]); batches task-major on device (one process) or
    run-major global arrays of every process's own rows (several)."""

    def __init__(self, plan: RunPlan, store: Store, axis: RunAxis, first_chunk: int):
        self.plan, self.axis = plan, axis
        spec, pcfg = plan.spec, plan.pwm
        self.run_major = axis.multiprocess
        self.run_task = axis.place_host(np.asarray(spec.run_task_ids, np.int32))
        per = plan.batch_size + (pcfg.wm_iterations * plan.wm_batch_size
                                 if pcfg.finetune_wm and pcfg.wm_updates == "iterations" else 0)
        # several processes: gather only the tasks of this process's rows, on the host; `args` builds the global
        # run-major arrays from them (one process: the sampler's task-major chunks, already on device)
        self.my_pos, self.my_seed = local_run_layout(spec, axis.rows)
        self.gathered = sorted(set(self.my_pos.tolist()))
        self.sampler = HostSampler(store, list(spec.task_ids), batch_size=per * len(spec.seeds), horizon=pcfg.horizon,
                                   chunk_epochs=plan.cadence.chunk_epochs,
                                   episode_subsampling=plan.behaviours["episode_subsampling"], seed=spec.seeds[0],
                                   num_threads=plan.data.host_threads,
                                   first_chunk=first_chunk,  # chunk i: a pure function of (seed, i)
                                   to_device=not self.run_major, gather_tasks=self.gathered if self.run_major else None)

    def program(self, n: int, task_chunk: int) -> Callable:
        p = self.plan
        fn = program.make_train_chunk_host(p.pwm, len(p.spec.seeds), p.batch_size, p.wm_batch_size, task_chunk,
                                           pad_index=self.axis.pad_index(), run_major=self.run_major,
                                           constrain=self.axis.constrain())
        return self.axis.shard_chunk_host(fn, run_major=self.run_major)

    def args(self, n: int) -> tuple:
        """The next host chunk trimmed to n epochs (several processes: run-major global arrays [n, R_pad, per, ...])."""
        batches = self.sampler.next_chunk()
        if n < self.plan.cadence.chunk_epochs:
            batches = jax.tree_util.tree_map(lambda x: x[:n], batches)
        if self.run_major:
            local = local_host_batches(batches, self.gathered, self.my_pos, self.my_seed, len(self.plan.spec.seeds))
            batches = self.axis.global_batches(local, n)
        return batches, self.run_task

    def close(self) -> None:
        self.sampler.close()


def make_feed(plan: RunPlan, mode: str, data, axis: RunAxis, first_chunk: int) -> DeviceFeed | HostFeed:
    """The feed of `open_data`'s (mode, data); first_chunk: the chunk index training resumes at."""
    return DeviceFeed(plan, data, axis) if mode == "device" else HostFeed(plan, data, axis, first_chunk)



def local_run_layout(spec: RunSpec, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(task position [n], seed index [n]) whose windows feed the padded run rows `rows` [n] of one process.

    Real row r (< R) is run (seed r // T, task r % T). A dummy row (>= R, sharding padding) reuses the first
    real row among `rows` (run 0 when there is none), so a process reads no task beyond its own runs'.
    """
    R, T = spec.num_runs, spec.num_tasks
    real = rows[rows < R]
    fill = int(real[0]) if real.size else 0
    src = np.where(rows < R, rows, fill)
    return (src % T).astype(np.int64), (src // T).astype(np.int64)


def local_host_batches(chunk: dict, gathered: list[int], task_pos: np.ndarray, seed_idx: np.ndarray, num_seeds: int) -> dict:
    """One process's run-major batches from its HostSampler chunk (numpy).

    chunk: obs [N, Tg, S*per, H+1, O] over the task positions `gathered` (HostSampler gather_tasks); row j of
    the result is window block seed_idx[j] of task task_pos[j]: obs [N, n, per, H+1, O] (n = len(task_pos)),
    the same windows the task-major chunk gives that run.
    """
    col = np.searchsorted(gathered, task_pos)
    def one(x):
        N, Tg, SB = x.shape[:3]
        x = x.reshape((N, Tg, num_seeds, SB // num_seeds) + x.shape[3:])
        return x[:, col, seed_idx]
    return {k: one(chunk[k]) for k in ("obs", "action", "reward")}
