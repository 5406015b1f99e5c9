"""Window sampling from the per-task store: B windows of H+1 consecutive steps per task.

Contract (both modes, TD-MPC2 / torchrl ``SliceSampler(strict_length=True)`` semantics):

* For each task independently and each of the B windows: an episode entry is drawn uniformly from the
  task's episode selection (see below), then a start ``s`` uniformly from ``0 .. L-(H+1)``
  (L = the store's episode length). Windows never cross an episode boundary.
* ``obs[k] = obs[e, s+k]`` for k = 0..H; ``action[k] = action[e, s+k+1]``,
  ``reward[k] = reward[e, s+k+1]`` for k = 0..H-1: the action/reward that *follow* ``obs[k]``.
  Index 0 of action/reward (TD-MPC2's filler) is never read.
* Batch: ``dict(obs [T,B,H+1,obs_dim], action [T,B,H,action_dim], reward [T,B,H])``, T = tasks in
  the order given, batch-major (the trainer transposes to time-major itself).

Episode selection (``episode_subsampling``):

* ``'all'`` (default): every episode of the task once, uniform over episodes.
* ``'reference'`` (B10): the reference buffer's ``add_batch``: per source chunk, keep
  ``min(n, capacity // L)`` episodes drawn *with replacement* (``randint``) from that chunk's n
  episodes of the task; overflow of the ring storage keeps the last ``capacity // L``
  (capacity = 24000 * 501 steps). Sampling is then uniform over those (duplicated) entries.

Two modes behind one interface (``next_chunk() -> [N, T, B, ...]`` device arrays):

* :class:`DeviceSampler` -- the task arrays live on the device (:class:`WindowData`, padded to the
  largest episode count) and :func:`sample_windows` draws indices with ``jax.random`` inside jit;
  use it directly inside a jitted training step.
* :class:`HostSampler` -- the arrays stay memory-mapped on the host; background threads gather
  chunks of batches with numpy (contiguous windows copied from a strided view) and ``device_put``
  them ahead of time.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from typing import Any, Iterable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fmbpo_jax.data.store import Store, StoreError, open_store, resolve_tasks

EpisodeSubsampling = Literal["all", "reference"]
#: the reference buffer's capacity in steps (24,000 episodes of 501 steps)
REFERENCE_CAPACITY_STEPS = 24000 * 501

__all__ = [
    "REFERENCE_CAPACITY_STEPS",
    "select_episodes",
    "WindowData",
    "load_device_data",
    "sample_windows",
    "DeviceSampler",
    "HostSampler",
    "make_sampler",
]


def _as_store(store: Store | str | os.PathLike) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def _task_list(store: Store, tasks: Iterable[int | str] | None) -> list[int]:
    if tasks is None:
        tids = store.tasks
    else:
        tids = [resolve_tasks([t])[0] for t in tasks]  # keep the caller's order
    if not tids:
        raise StoreError(f"{store.path}: no tasks to sample")
    for t in tids:
        if store.episodes(t) == 0:
            raise StoreError(f"{store.path}: task {t} has no episodes in the store (store tasks: {store.tasks})")
    return tids


def select_episodes(
    store: Store,
    task: int | str,
    episode_subsampling: EpisodeSubsampling = "all",
    rng: np.random.Generator | int | None = 0,
    capacity_steps: int = REFERENCE_CAPACITY_STEPS,
) -> np.ndarray:
    """Episode indices (into the task's arrays) that sampling draws from, uniformly; may repeat.

    ``'all'``: ``arange(E)``. ``'reference'``: B10, see the module docstring.
    """
    n_total = store.episodes(task)
    if episode_subsampling == "all":
        return np.arange(n_total, dtype=np.int64)
    if episode_subsampling != "reference":
        raise ValueError(f"episode_subsampling must be 'all' or 'reference', not {episode_subsampling!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    cap_eps = capacity_steps // store.episode_length
    if cap_eps < 1:
        raise ValueError(f"capacity {capacity_steps} steps holds no episode of length {store.episode_length}")
    picks = []
    offset = 0
    for _src, n in store.segments(task):  # one add_batch call per source chunk
        k = min(n, cap_eps)
        picks.append(offset + rng.integers(0, n, size=k))
        offset += n
    sel = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    if sel.size > cap_eps:  # circular storage: the last cap_eps episodes written survive
        sel = sel[-cap_eps:]
    return sel.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Device-resident mode
# --------------------------------------------------------------------------------------------


@struct.dataclass
class WindowData:
    """Per-task arrays on device, flattened over (episode, time) and padded to the largest task.

    obs [T, E_max*L, obs_dim], action [T, E_max*L, action_dim], reward [T, E_max*L];
    episode_map [T, K_max] int32 (episode index per selection entry), num_entries [T] int32,
    task_ids [T] int32; episode_length L is static.
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    episode_map: jax.Array
    num_entries: jax.Array
    task_ids: jax.Array
    episode_length: int = struct.field(pytree_node=False)

    @property
    def num_tasks(self) -> int:
        return int(self.obs.shape[0])


def load_device_data(
    store: Store | str | os.PathLike,
    tasks: Sequence[int | str] | None = None,
    *,
    episode_subsampling: EpisodeSubsampling = "all",
    seed: int = 0,
    device: Any = None,
    capacity_steps: int = REFERENCE_CAPACITY_STEPS,
) -> WindowData:
    """Load the tasks' arrays to the device (padded to the largest episode count)."""
    store = _as_store(store)
    tids = _task_list(store, tasks)
    L = store.episode_length
    counts = [store.episodes(t) for t in tids]
    e_max = max(counts)
    rng = np.random.default_rng(seed)
    sels = [select_episodes(store, t, episode_subsampling, rng, capacity_steps) for t in tids]
    k_max = max(s.size for s in sels)
    T, rows = len(tids), e_max * L
    sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
    # Fill the device arrays one task at a time (donated in-place updates): host memory peaks at one
    # task, device memory at the final arrays plus one task.
    out = {
        "obs": jnp.zeros((T, rows, store.obs_dim), jnp.float32, device=sharding),
        "action": jnp.zeros((T, rows, store.action_dim), jnp.float32, device=sharding),
        "reward": jnp.zeros((T, rows), jnp.float32, device=sharding),
    }
    emap = np.zeros((T, k_max), np.int32)
    for i, t in enumerate(tids):
        arr = store.arrays(t)
        n = counts[i]
        for k in ("obs", "action", "reward"):
            x = np.asarray(arr[k]).reshape((n * L,) + out[k].shape[2:])
            if n < e_max:
                x = np.concatenate([x, np.zeros(((e_max - n) * L,) + x.shape[1:], np.float32)])
            out[k] = _set_task(out[k], jax.device_put(x, device), i)
        emap[i, : sels[i].size] = sels[i]
    put = functools.partial(jax.device_put, device=device)
    return WindowData(
        obs=out["obs"],
        action=out["action"],
        reward=out["reward"],
        episode_map=put(emap),
        num_entries=put(np.array([s.size for s in sels], np.int32)),
        task_ids=put(np.array(tids, np.int32)),
        episode_length=L,
    )


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_task(full: jax.Array, x: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(full, x, i, axis=0)


def _sample_task(key, obs, action, reward, episode_map, num_entries, *, batch_size, horizon, episode_length):
    k_ep, k_start = jax.random.split(key)
    j = jax.random.randint(k_ep, (batch_size,), 0, num_entries)
    ep = episode_map[j]
    start = jax.random.randint(k_start, (batch_size,), 0, episode_length - horizon)  # s in 0..L-(H+1)
    base = ep * episode_length + start
    # one contiguous slice per window (a gather with slice size [H+1, dim]): ~1.5x faster on CPU
    # than gathering H+1 single rows
    out = {
        "obs": jax.vmap(lambda b: jax.lax.dynamic_slice_in_dim(obs, b, horizon + 1, axis=0))(base),
        "action": jax.vmap(lambda b: jax.lax.dynamic_slice_in_dim(action, b + 1, horizon, axis=0))(base),
        "reward": jax.vmap(lambda b: jax.lax.dynamic_slice_in_dim(reward, b + 1, horizon, axis=0))(base),
    }
    return out, ep, start


@functools.partial(jax.jit, static_argnames=("batch_size", "horizon", "return_index"))
def sample_windows(data: WindowData, key: jax.Array, batch_size: int, horizon: int, return_index: bool = False):
    """Pure, jittable: one batch ``dict(obs [T,B,H+1,Do], action [T,B,H,Da], reward [T,B,H])``.

    With ``return_index=True`` also returns ``(episode [T,B], start [T,B])`` (for tests/debugging).
    """
    L = data.episode_length
    if not 1 <= horizon <= L - 1:
        raise ValueError(f"horizon {horizon} must be in 1..{L - 1} for episode length {L}")
    keys = jax.random.split(key, data.obs.shape[0])
    fn = functools.partial(_sample_task, batch_size=batch_size, horizon=horizon, episode_length=L)
    out, ep, start = jax.vmap(fn)(keys, data.obs, data.action, data.reward, data.episode_map, data.num_entries)
    if return_index:
        return out, (ep, start)
    return out


@functools.partial(jax.jit, static_argnames=("n", "batch_size", "horizon"))
def sample_chunk(data: WindowData, key: jax.Array, n: int, batch_size: int, horizon: int):
    """``n`` independent batches stacked: ``[n, T, B, ...]``."""
    keys = jax.random.split(key, n)
    return jax.lax.map(lambda k: sample_windows(data, k, batch_size, horizon), keys)


class DeviceSampler:
    """Device-resident sampler. ``sample(key)`` / ``next_chunk()``; ``data`` + :func:`sample_windows` for jit."""

    mode = "device"

    def __init__(
        self,
        store: Store | str | os.PathLike,
        tasks: Sequence[int | str] | None = None,
        *,
        batch_size: int = 512,
        horizon: int = 16,
        chunk_epochs: int = 1,
        episode_subsampling: EpisodeSubsampling = "all",
        seed: int = 0,
        device: Any = None,
        capacity_steps: int = REFERENCE_CAPACITY_STEPS,
    ):
        self.store = _as_store(store)
        self.tasks = _task_list(self.store, tasks)
        self.batch_size, self.horizon, self.chunk_epochs = int(batch_size), int(horizon), int(chunk_epochs)
        _check_horizon(self.horizon, self.store.episode_length)
        self.data = load_device_data(self.store, self.tasks, episode_subsampling=episode_subsampling, seed=seed,
                                     device=device, capacity_steps=capacity_steps)
        self._key = jax.random.key(seed)

    def sample(self, key: jax.Array) -> dict:
        return sample_windows(self.data, key, self.batch_size, self.horizon)

    def next_chunk(self) -> dict:
        self._key, sub = jax.random.split(self._key)
        return sample_chunk(self.data, sub, self.chunk_epochs, self.batch_size, self.horizon)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_chunk()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_horizon(horizon: int, episode_length: int) -> None:
    if not 1 <= horizon <= episode_length - 1:
        raise ValueError(f"horizon {horizon} must be in 1..{episode_length - 1} for episode length {episode_length}")


# --------------------------------------------------------------------------------------------
# Host memory-mapped mode
# --------------------------------------------------------------------------------------------


def _row_items(x: np.ndarray) -> np.ndarray:
    """1-D view of ``x`` [E, L, ...] as E*L void items, one per time step (row).

    ``np.take`` over a C-contiguous 1-D array of void rows with ``out=`` is numpy's fast path: one
    memmove per row straight into the output buffer, with no temporary array (a fancy-indexed
    temporary costs a fresh allocation, i.e. page faults, plus a second copy) and with the GIL
    released, so two worker threads scale on two cores.
    """
    flat = x.reshape(x.shape[0] * x.shape[1], -1)
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    return flat.view(np.dtype((np.void, flat.strides[0]))).reshape(-1)


class _TaskRows:
    """Per-task row views of obs / action / reward (see ``_row_items``)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.obs = _row_items(arrays["obs"])
        self.action = _row_items(arrays["action"])
        self.reward = _row_items(arrays["reward"][..., None])


def _carve(raw: np.ndarray, shapes: dict[str, tuple[int, ...]], align: int = 64) -> dict[str, np.ndarray]:
    """float32 arrays of the given shapes laid out in ``raw`` (uint8), each 64-byte aligned.

    Aligned buffers let ``device_put`` on the CPU backend alias them instead of copying.
    """
    out = {}
    addr = raw.ctypes.data
    pos = 0
    for k, shp in shapes.items():
        pos += (-(addr + pos)) % align  # align the address, not the offset
        nbytes = int(np.prod(shp)) * 4
        out[k] = raw[pos : pos + nbytes].view(np.float32).reshape(shp)
        pos += nbytes
    return out


def _nbytes_needed(shapes: dict[str, tuple[int, ...]], align: int = 64) -> int:
    return sum(int(np.prod(s)) * 4 + align for s in shapes.values()) + align


class _BufferPool:
    """Recycles chunk buffers once nothing references them any more.

    A buffer handed out (as numpy views, possibly aliased by zero-copy device arrays on the CPU
    backend, which keep the views alive) is reused only when its reference count is back to the
    pool's own reference, i.e. every view and every device array using it has been released. This
    avoids re-faulting hundreds of MB of fresh pages per chunk.
    """

    def __init__(self, nbytes: int, max_buffers: int):
        self.nbytes = nbytes
        self.max_buffers = max_buffers
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.allocations = 0  # fresh buffers allocated (the rest were recycled)

    def get(self) -> np.ndarray:
        import sys

        with self._lock:
            for raw in self._bufs:
                # references: the list, the loop variable, getrefcount's argument
                if sys.getrefcount(raw) <= 3:
                    return raw
            raw = np.empty(self.nbytes, np.uint8)
            self.allocations += 1
            if len(self._bufs) < self.max_buffers:
                self._bufs.append(raw)
            return raw


class HostSampler:
    """Memory-mapped host store + background threads that keep the next chunks ready on the device.

    ``next_chunk()`` returns ``dict(obs [N,T,B,H+1,Do], action [N,T,B,H,Da], reward [N,T,B,H])``
    (N = ``chunk_epochs``) as device arrays (``to_device=False``: numpy), starting at chunk ``first_chunk``
    (a resumed run passes epoch // chunk_epochs). Chunk i is drawn from
    ``np.random.default_rng([seed, i])``, so the stream does not depend on ``num_threads``.

    ``gather_tasks``: positions into ``tasks`` whose windows are gathered (default: all); the chunk's task
    axis then has ``len(gather_tasks)`` rows, in that order. Indices are still drawn for every task, so the
    gathered windows equal the same rows of the full stream; only these tasks' arrays are read (a
    multi-process trainer's process gathers the tasks of its own runs).
    """

    mode = "host"

    def __init__(
        self,
        store: Store | str | os.PathLike,
        tasks: Sequence[int | str] | None = None,
        *,
        batch_size: int = 512,
        horizon: int = 16,
        chunk_epochs: int = 1,
        episode_subsampling: EpisodeSubsampling = "all",
        seed: int = 0,
        device: Any = None,
        prefetch: int = 2,
        num_threads: int = 1,
        to_device: bool = True,
        start: bool = True,
        capacity_steps: int = REFERENCE_CAPACITY_STEPS,
        first_chunk: int = 0,
        gather_tasks: Sequence[int] | None = None,
    ):
        self.store = _as_store(store)
        self.tasks = _task_list(self.store, tasks)
        self._gather = list(range(len(self.tasks))) if gather_tasks is None else [int(p) for p in gather_tasks]
        if not self._gather or any(not 0 <= p < len(self.tasks) for p in self._gather):
            raise ValueError(f"gather_tasks={gather_tasks}: need positions in 0..{len(self.tasks) - 1}")
        self.batch_size, self.horizon, self.chunk_epochs = int(batch_size), int(horizon), int(chunk_epochs)
        L = self.store.episode_length
        _check_horizon(self.horizon, L)
        self.seed = int(seed)
        self.device = device
        self.to_device = to_device
        rng = np.random.default_rng(seed)
        self._sel = [select_episodes(self.store, t, episode_subsampling, rng, capacity_steps) for t in self.tasks]
        self._nsel = np.array([s.size for s in self._sel], np.int64)
        self._rows = [_TaskRows(self.store.arrays(self.tasks[p])) for p in self._gather]
        self._dims = (self.store.obs_dim, self.store.action_dim)
        self._pool = _BufferPool(_nbytes_needed(self._shapes(self.chunk_epochs)),
                                 max_buffers=(max(1, int(prefetch)) + 1) * max(1, int(num_threads)) + 1)
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._stop = threading.Event()
        self._next = int(first_chunk)  # a resumed run continues the stream at chunk epoch // chunk_epochs
        self._first_chunk = self._next
        self._prefetch = max(1, int(prefetch))
        self._num_threads = max(1, int(num_threads))
        if start:
            self.start()

    # -- sampling on the host (pure function of the generator)
    def draw_indices(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(episode [n,T,B], start [n,T,B]) following the sampling contract."""
        T, B = len(self.tasks), self.batch_size
        j = rng.integers(0, self._nsel[None, :, None], size=(n, T, B))
        ep = np.empty((n, T, B), np.int64)
        for i in range(T):
            ep[:, i] = self._sel[i][j[:, i]]
        start = rng.integers(0, self.store.episode_length - self.horizon, size=(n, T, B))
        return ep, start

    def _shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        T, B, H, (do, da) = len(self._gather), self.batch_size, self.horizon, self._dims
        return {"obs": (n, T, B, H + 1, do), "action": (n, T, B, H, da), "reward": (n, T, B, H)}

    def _alloc(self, n: int) -> dict[str, np.ndarray]:
        shapes = self._shapes(n)
        if n == self.chunk_epochs:
            raw = self._pool.get()
        else:
            raw = np.empty(_nbytes_needed(shapes), np.uint8)
        return _carve(raw, shapes)

    def gather(self, ep: np.ndarray, start: np.ndarray, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Copy the windows (episode [n,T,B], start [n,T,B]) into ``out`` (allocated when None).

        Window (ep, s) is obs rows s..s+H and action/reward rows s+1..s+H of episode ep (row 0's
        action/reward are filler and are never read). With ``gather_tasks`` only those columns of ep/start
        are gathered (out has their count of task rows).
        """
        n, _, B = ep.shape
        T = len(self._gather)
        H = self.horizon
        out = self._alloc(n) if out is None else out
        first = ep * self.store.episode_length + start  # [n,T,B] flat row of each window's obs 0
        obs_steps, act_steps = np.arange(H + 1), np.arange(1, H + 1)
        r0 = self._rows[0]
        dst = {
            "obs": out["obs"].reshape(n, T, B * (H + 1), -1).view(r0.obs.dtype)[..., 0],
            "action": out["action"].reshape(n, T, B * H, -1).view(r0.action.dtype)[..., 0],
            "reward": out["reward"].reshape(n, T, B * H, 1).view(r0.reward.dtype)[..., 0],
        }
        for i, (p, rows) in enumerate(zip(self._gather, self._rows)):
            obs_idx = (first[:, p, :, None] + obs_steps).reshape(n, -1)
            act_idx = (first[:, p, :, None] + act_steps).reshape(n, -1)
            if obs_idx.size and (obs_idx.min() < 0 or obs_idx.max() >= rows.obs.shape[0]):
                raise IndexError(f"window rows outside task {self.tasks[p]}'s {rows.obs.shape[0]} rows")
            # out= must be contiguous: one epoch of one task at a time. mode="clip" because
            # mode="raise" buffers out (a temporary again); the range was checked just above.
            for e in range(n):
                np.take(rows.obs, obs_idx[e], out=dst["obs"][e, i], mode="clip")
                np.take(rows.action, act_idx[e], out=dst["action"][e, i], mode="clip")
                np.take(rows.reward, act_idx[e], out=dst["reward"][e, i], mode="clip")
        return out

    def sample_host(self, rng: np.random.Generator, n: int | None = None, out=None) -> dict[str, np.ndarray]:
        ep, start = self.draw_indices(rng, self.chunk_epochs if n is None else n)
        return self.gather(ep, start, out)

    def chunk_host(self, i: int, out=None) -> dict[str, np.ndarray]:
        """Chunk number ``i`` of the stream, on the host (deterministic in (seed, i))."""
        return self.sample_host(np.random.default_rng([self.seed, i]), out=out)

    # -- background prefetch
    def start(self) -> None:
        if self._threads:
            return
        self._first_chunk = self._next  # a resumed stream continues from next_chunk()'s position
        self._queues = [queue.Queue(maxsize=self._prefetch) for _ in range(self._num_threads)]
        for w in range(self._num_threads):
            th = threading.Thread(target=self._worker, args=(w,), name=f"HostSampler-{w}", daemon=True)
            th.start()
            self._threads.append(th)

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _worker(self, w: int) -> None:
        i = self._first_chunk + w  # worker w makes chunks first+w, first+w+n, ... (n threads)
        q = self._queues[w]
        try:
            while not self._stop.is_set():
                host = self.chunk_host(i)  # buffer from the pool (recycled when released)
                if self.to_device:
                    batch = jax.device_put(host, self.device)
                    jax.block_until_ready(batch)
                    del host  # a device copy no longer needs it; a zero-copy alias keeps it referenced
                else:
                    batch = host
                if not self._put(q, (i, batch, None)):
                    return
                i += self._num_threads
        except BaseException as exc:  # surface errors in the consumer
            self._put(q, (i, None, exc))

    def next_chunk(self) -> dict:
        if not self._threads:
            self.start()
        i = self._next
        q = self._queues[(i - self._first_chunk) % self._num_threads]
        while True:
            try:
                got_i, batch, exc = q.get(timeout=1.0)
                break
            except queue.Empty:
                if not any(t.is_alive() for t in self._threads):
                    raise RuntimeError("HostSampler worker threads died") from None
        if exc is not None:
            raise RuntimeError(f"HostSampler worker failed on chunk {got_i}") from exc
        assert got_i == i, (got_i, i)
        self._next += 1
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_chunk()

    def close(self) -> None:
        self._stop.set()
        for q in self._queues:
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
        for th in self._threads:
            th.join(timeout=5)
        self._threads = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover
        try:
            self._stop.set()
        except Exception:
            pass


def make_sampler(
    store: Store | str | os.PathLike, mode: Literal["device", "host"] = "device", **kwargs
) -> DeviceSampler | HostSampler:
    """``DeviceSampler`` or ``HostSampler`` with the same arguments (see their docstrings)."""
    if mode == "device":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("prefetch", "num_threads", "to_device", "start")}
        return DeviceSampler(store, **kwargs)
    if mode == "host":
        return HostSampler(store, **kwargs)
    raise ValueError(f"mode must be 'device' or 'host', not {mode!r}")
