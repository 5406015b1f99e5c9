"""Scale-out: a ('task', 'data') device mesh for the run axis, padding to the device count, sharded chunks,
checkpoints that restore onto any device count, and multi-host start-up.

The trainer's state is a pytree whose every leaf has a leading run axis R (seed-major runs, see
`run_config.RunSpec`). Runs never talk to each other (`vmap` over runs, no cross-run reduction), so the
run axis is embarrassingly parallel: it is sharded on the mesh axis 'task'; the shared frozen world
model and the device data store are replicated; per-run metrics [N, R] are sharded on their run axis.

Padding. R need not divide the device count: `pad_runs` appends dummy runs that duplicate run 0 (its
state, key, task row), so they compute sane numbers and never produce NaN of their own. Because no
reduction crosses runs, a dummy run cannot change a real run's numbers: no loss weight is needed, only
the `valid` mask (dummy runs are dropped by `unpad` before logging, NaN checks and checkpointing).

The data store (`WindowData`, leading task axis T) stays replicated: run r reads task row
`run_pos[r] = r % T` with a traced index, and seed-major runs put every task on every shard of the
run axis, so a task-sharded store would turn each window gather into a cross-device gather.
(A task-sharded store needs task-major runs and a per-shard local task index; see DESIGN notes in
the scale-out issue.) The 'data' axis (size 1 by default) replicates runs; the batch axis of the
sampled windows is split on it when the chunk function constrains its batches with
`constrain_batch` (and vmaps runs with `spmd_axis_name='task'`).

Checkpoints hold the UNPADDED state (R runs), sharded as evenly as R allows on the current mesh
(`unpadded_sharding`): restore it with `restore_target(...)` as orbax's target on any device count,
then `pad_runs` again.

`RunAxis` is what the trainer's loop uses: these operations bound to one mesh and run count (place and pad,
replicate, unpad, gather to the host, this process's rows, collective flags, sharded programs).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

TASK, DATA = "task", "data"
__all__ = [
    "TASK", "DATA", "make_mesh", "runs_spec", "metrics_spec", "run_sharding", "metrics_sharding", "replicated",
    "padded_size", "pad_index", "pad_runs", "unpad", "unpadded_sharding", "restore_target", "put_runs",
    "put_replicated", "shard_chunk_fn", "shard_chunk_fn_host", "constrain_batch", "multihost_requested",
    "initialize_distributed", "process_run_rows", "global_runs_from_local", "is_multiprocess", "put_global",
    "host_gather", "batch_spec", "local_rows", "gather_runs", "RunAxis",
]


# ============================================================================================ the mesh


def make_mesh(num_devices: int | None = None, data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('task', 'data') mesh over the first `num_devices` devices (default: all, every process's).

    data: devices per run group that split the batch axis (1: pure run parallelism). num_devices must be a
    multiple of `data`. Axis types are Auto (GSPMD propagation), so the unmodified trainer code compiles.
    jax.devices() lists devices process by process, so each process's devices are contiguous on 'task'.
    """
    devs = list(devices if devices is not None else jax.devices())
    n = len(devs) if num_devices is None else num_devices
    if not 1 <= n <= len(devs):
        raise ValueError(f"make_mesh: {n} devices requested, {len(devs)} available")
    if data < 1 or n % data:
        raise ValueError(f"make_mesh: data={data} must divide the device count {n}")
    return Mesh(np.asarray(devs[:n], dtype=object).reshape(n // data, data), (TASK, DATA))


def runs_spec() -> P:
    """Leaves [R, ...]: run axis on 'task' (replicated over 'data')."""
    return P(TASK)


def metrics_spec() -> P:
    """Chunk metrics [N, R]: epochs replicated, runs on 'task'."""
    return P(None, TASK)


def run_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, runs_spec())


def metrics_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, metrics_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_runs(tree: Any, mesh: Mesh) -> Any:
    """device_put a run-axis pytree (R divisible by the 'task' axis) sharded on 'task'."""
    return jax.device_put(tree, run_sharding(mesh))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """device_put a pytree (frozen WM, WindowData, ...) replicated on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


# ============================================================================================ padding


def padded_size(num_runs: int, num_shards: int) -> int:
    """The smallest multiple of num_shards that is >= num_runs."""
    return -(-num_runs // num_shards) * num_shards


def _num_shards(n: int | Mesh) -> int:
    return n.shape[TASK] if isinstance(n, Mesh) else int(n)


def pad_index(num_runs: int, n: int | Mesh) -> np.ndarray:
    """Row index [R_pad] into the unpadded run axis: 0..R-1, then 0 for every dummy run."""
    r_pad = padded_size(num_runs, _num_shards(n))
    return np.concatenate([np.arange(num_runs), np.zeros(r_pad - num_runs, np.int64)]).astype(np.int32)


def pad_runs(tree: Any, n: int | Mesh, mesh: Mesh | None = None) -> tuple[Any, np.ndarray]:
    """(tree padded to R_pad = a multiple of n on its leading run axis, valid [R_pad] bool).

    n: the number of shards of the run axis (an int, or a mesh: its 'task' size). Dummy runs duplicate run 0
    (state, PRNG key, task row), so they are numerically sane; they never affect real runs. Works on the
    state, `best`, `run_pos`/`run_task`, numpy or jax leaves. With `mesh`, the result is sharded on 'task'
    (one jitted gather, no host round trip); otherwise the leaves keep their kind.
    """
    if mesh is None and isinstance(n, Mesh):
        mesh = n
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("pad_runs: empty pytree")
    num_runs = int(np.shape(leaves[0])[0])
    bad = [np.shape(x) for x in leaves if not np.shape(x) or np.shape(x)[0] != num_runs]
    if bad:
        raise ValueError(f"pad_runs: every leaf needs the leading run axis of {num_runs}; got shapes {bad[:3]}")
    idx = pad_index(num_runs, n)
    valid = np.arange(idx.size) < num_runs
    if mesh is not None:
        out = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), t),
                      out_shardings=run_sharding(mesh))(tree)
    else:
        out = jax.tree_util.tree_map(lambda x: x[idx] if isinstance(x, np.ndarray) else jnp.take(x, idx, axis=0), tree)
    return out, valid


def unpadded_sharding(mesh: Mesh, num_runs: int) -> NamedSharding:
    """A sharding for unpadded [R, ...] leaves: the run axis split over g = gcd(R, |task|) groups of devices.

    jax.Arrays cannot be split unevenly, so with R = 30 on 8 devices the run axis goes on 2 groups of 4
    (each device holds 15 runs) instead of replicating all 30 on every device. g = |task| gives run_sharding.
    """
    n_task = mesh.shape[TASK]
    g = math.gcd(num_runs, n_task)
    if g == n_task:
        return run_sharding(mesh)
    sub = Mesh(mesh.devices.reshape(g, -1), (TASK, "rest"))
    return NamedSharding(sub, P(TASK))


def unpad(tree: Any, num_runs: int, axis: int = 0, mesh: Mesh | None = None) -> Any:
    """Drop the dummy runs: keep rows [0, num_runs) of `axis` of every leaf.

    axis=0 for the state, 1 for chunk metrics [N, R_pad]. Without `mesh` the leaves are sliced as they are
    (numpy stays numpy: use it for metrics after device_get). With `mesh` (device state for a checkpoint) the
    slice is one jitted program whose result is sharded by `unpadded_sharding` (axis 0 only).
    """
    if mesh is None:
        sl = lambda x: x[(slice(None),) * axis + (slice(0, num_runs),)]
        return jax.tree_util.tree_map(sl, tree)
    if axis != 0:
        raise ValueError("unpad(mesh=...) slices the leading run axis only")
    return jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x[:num_runs], t),
                   out_shardings=unpadded_sharding(mesh, num_runs))(tree)


def restore_target(tree: Any, mesh: Mesh) -> Any:
    """Orbax restore target for an unpadded run-axis pytree on the CURRENT mesh.

    tree: anything with the right shapes/dtypes (e.g. `jax.eval_shape(init_runs, ...)`, the freshly built
    unpadded state, or orbax's own metadata); leaves [R, ...]. Returns jax.ShapeDtypeStruct leaves carrying
    `unpadded_sharding(mesh, R)`, so `ocp.args.StandardRestore(restore_target(...))` reads each device's
    shard straight into place, whatever device count wrote the checkpoint.
    """
    def one(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=unpadded_sharding(mesh, int(np.shape(x)[0])))

    return jax.tree_util.tree_map(one, tree)


# ==================================================================================== sharded programs


def shard_chunk_fn(chunk_fn: Callable, mesh: Mesh, donate: bool = True) -> Callable:
    """jit `training.program.make_train_chunk`'s function with explicit shardings for the mesh.

    Returns fn(state [R_pad], frozen_wm | None, data: WindowData, run_pos [R_pad], run_task [R_pad])
    -> (state [R_pad], metrics [N, R_pad]); state, run_pos, run_task and metrics sharded on 'task', frozen
    WM and data replicated. R_pad must be a multiple of mesh.shape['task'] (use `pad_runs`). The inner jit
    is inlined; the state is donated. Arguments already placed with these shardings are not copied.
    """
    runs, rep = run_sharding(mesh), replicated(mesh)
    return jax.jit(lambda state, frozen_wm, data, run_pos, run_task: chunk_fn(state, frozen_wm, data, run_pos, run_task),
                   in_shardings=(runs, rep, rep, runs, runs), out_shardings=(runs, metrics_sharding(mesh)),
                   donate_argnums=(0,) if donate else ())


def batch_spec() -> P:
    """Run-major host batches [N, R_pad, per, ...]: epochs replicated, runs on 'task' (like the state)."""
    return P(None, TASK)


def shard_chunk_fn_host(chunk_fn: Callable, mesh: Mesh, donate: bool = True, run_major: bool = False) -> Callable:
    """The same for `training.program.make_train_chunk_host`: fn(state, frozen_wm, batches, run_task).

    run_major=False: task-major batches [N, T, S*per, ...] replicated on every device (one process; the chunk
    maps its R = S*T run batches onto the R_pad state rows with `pad_index`). run_major=True: batches
    [N, R_pad, per, ...] sharded on 'task' (`batch_spec`), each process feeding only its own rows
    (multi-process, see `training.feed.local_host_batches`).
    """
    runs, rep = run_sharding(mesh), replicated(mesh)
    b = NamedSharding(mesh, batch_spec()) if run_major else rep
    return jax.jit(lambda state, frozen_wm, batches, run_task: chunk_fn(state, frozen_wm, batches, run_task),
                   in_shardings=(runs, rep, b, runs), out_shardings=(runs, metrics_sharding(mesh)),
                   donate_argnums=(0,) if donate else ())


def constrain_batch(mesh: Mesh, time_major: bool = True) -> Callable[[dict], dict]:
    """A function to apply to one run's sampled batch inside the (vmapped) chunk: split B on 'data'.

    Time-major batch leaves are [H(+1), B, ...] (B is axis 1), 'wm' leaves [I, H(+1), Bw, ...] (axis 2).
    Use it with `jax.vmap(..., spmd_axis_name='task')` so the run axis keeps its 'task' sharding; a no-op
    when mesh.shape['data'] == 1.
    """
    if mesh.shape[DATA] == 1:
        return lambda batch: batch

    def spec(x, b_axis):
        if np.ndim(x) <= b_axis:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*([None] * b_axis + [DATA]))))

    def apply(batch):
        out = dict(batch)
        b_axis = 1 if time_major else 0
        for k in ("obs", "action", "reward"):
            if k in out:
                out[k] = spec(out[k], b_axis)
        if "wm" in out:
            out["wm"] = {k: spec(v, b_axis + 1) for k, v in out["wm"].items()}
        return out

    return apply


# ========================================================================================= multi-host


def multihost_requested(flag: bool = False, env: dict | None = None) -> bool:
    """True when --multihost is given, or SLURM runs this job as several tasks, or a TPU slice has several hosts.

    Signals: SLURM_NTASKS > 1 (srun with --ntasks-per-node / several nodes; one task per node or per GPU),
    TPU_WORKER_HOSTNAMES with more than one host, MEGASCALE_COORDINATOR_ADDRESS (multi-slice). A plain
    single-task sbatch job stays single-process.
    """
    env = os.environ if env is None else env
    if flag:
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return True
    return bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_distributed(flag: bool = False, **kwargs) -> bool:
    """Call jax.distributed.initialize() (once) when `multihost_requested`; jax detects SLURM/TPU itself.

    kwargs go to jax.distributed.initialize (coordinator_address, num_processes, process_id, ... for
    hand-started processes, e.g. the localhost test). Must run before anything touches a device.
    Returns whether this is a multi-process run.
    """
    if not (multihost_requested(flag) or kwargs):
        return False
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1


def process_run_rows(mesh: Mesh, num_runs_padded: int) -> np.ndarray:
    """The rows of the padded run axis whose shards live on this process's devices (sorted)."""
    sharding = run_sharding(mesh)
    rows = set()
    for idx in sharding.addressable_devices_indices_map((num_runs_padded,)).values():
        rows.update(range(num_runs_padded)[idx[0]])
    return np.asarray(sorted(rows), np.int64)


def global_runs_from_local(local_tree: Any, mesh: Mesh, num_runs_padded: int) -> Any:
    """A global run-axis pytree sharded on 'task' from this process's rows (`process_run_rows` order).

    Each process builds only its own runs (or their batches) and passes leaves [len(rows), ...]; with one
    process this is `put_runs`.
    """
    sharding = run_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (num_runs_padded,) + np.shape(x)[1:]),
        local_tree)


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def put_global(tree: Any, sharding: NamedSharding) -> Any:
    """Place a pytree that EVERY process holds in full (same values) with `sharding`, which may span processes.

    One process: a plain device_put (device arrays stay on device). Several: the leaves go through host numpy,
    because one process's committed device array cannot be moved onto other processes' devices; device_put
    of host data to a global sharding keeps the shards this process addresses.
    """
    if not is_multiprocess():
        return jax.device_put(tree, sharding)
    return jax.device_put(jax.tree_util.tree_map(np.asarray, tree), sharding)


def host_gather(tree: Any) -> Any:
    """Full numpy values of jax arrays on every process.

    One process: jax.device_get. Several: process_allgather(tiled=True), a collective (every process must call
    it at the same point), because device_get cannot read shards that live on other processes.
    """
    if not is_multiprocess():
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def local_rows(tree: Any) -> tuple[np.ndarray, Any]:
    """(rows [n], tree of numpy [n, ...]): the leading-axis rows of each leaf that this process's devices hold.

    Leaves must be sharded on axis 0 only (run_sharding / unpadded_sharding); rows replicated on several local
    devices (the 'data' axis) appear once. rows is sorted and the same for every leaf.
    """
    def one(x):
        blocks = {}
        for sh in x.addressable_shards:
            sl = sh.index[0] if sh.index else slice(None)
            start, stop, _ = sl.indices(x.shape[0])
            blocks.setdefault(start, (stop, sh.data))
        starts = sorted(blocks)
        rows = np.concatenate([np.arange(a, blocks[a][0]) for a in starts])
        return rows, np.concatenate([np.asarray(blocks[a][1]) for a in starts])

    pairs = [one(x) for x in jax.tree_util.tree_leaves(tree)]
    if not pairs:
        raise ValueError("local_rows: empty pytree")
    rows = pairs[0][0]
    if any(not np.array_equal(p[0], rows) for p in pairs):
        raise ValueError("local_rows: leaves are sharded differently")
    it = iter(p[1] for p in pairs)
    return rows, jax.tree_util.tree_map(lambda _: next(it), tree)


def gather_runs(values: np.ndarray, owned: np.ndarray) -> np.ndarray:
    """Combine per-run host values that each process computed for its own runs: float64 [..., R] on every process.

    values [..., R] (anything where `owned` is False), owned [R] bool. One process: `values`. Several: allgather
    and, per run, the value of the first process that owns it (a run held by two processes, e.g. a 'data' axis
    spanning them, was computed identically by both). The values travel as raw bits: with jax_enable_x64 off
    a float64 gather would round them to float32.
    """
    values = np.ascontiguousarray(values, np.float64)
    if not is_multiprocess():
        if not owned.all():
            raise ValueError(f"gather_runs: runs {np.flatnonzero(~owned).tolist()} have no owner")
        return values
    bits, own = multihost_utils.process_allgather((values.view(np.uint32), owned.astype(np.int32)))  # [P, ..., 2R], [P, R]
    v = np.ascontiguousarray(bits).view(np.float64)  # [P, ..., R]
    if (own.sum(0) == 0).any():
        raise ValueError(f"gather_runs: runs {np.flatnonzero(own.sum(0) == 0).tolist()} have no owner")
    first = own.argmax(0)  # [R]
    vm = np.moveaxis(v, 0, -1)  # [..., R, P]
    return np.take_along_axis(vm, np.broadcast_to(first[:, None], vm.shape[:-1] + (1,)), axis=-1)[..., 0]


# ======================================================================================== the run axis


@dataclasses.dataclass(frozen=True)
class RunAxis:
    """The run axis of one training job: R real runs padded to R_pad rows sharded over the mesh's 'task' axis.

    Everything the loop does with the run axis goes through here, the same code for one process or several
    (the collectives are no-ops in one process): place a run-axis pytree (`place`, `place_host`, `place_unpadded`),
    `replicate` shared values, drop the dummy rows for a checkpoint or a snapshot (`unpad`), read values back to
    the host on every process (`gather`, `gather_metrics`, `gather_runs`), this process's own rows (`rows`,
    `local`), agree on a flag (`any`, `all`), and wrap a chunk program with the mesh's shardings.
    """

    mesh: Mesh
    num_runs: int

    @classmethod
    def create(cls, num_runs: int, data_parallel: int = 1) -> "RunAxis":
        """Every device of every process: 'task' x 'data' (data_parallel devices split each run's batch)."""
        return cls(make_mesh(data=data_parallel), num_runs)

    @property
    def padded(self) -> int:
        """R_pad: the run count padded to a multiple of the 'task' axis."""
        return padded_size(self.num_runs, self.mesh.shape[TASK])

    @property
    def per_device(self) -> int:
        """Padded runs on each device."""
        return self.padded // self.mesh.shape[TASK]

    @property
    def multiprocess(self) -> bool:
        return is_multiprocess()

    @functools.cached_property
    def rows(self) -> np.ndarray:
        """The padded run rows whose shards live on this process's devices (sorted)."""
        return process_run_rows(self.mesh, self.padded)

    # ------------------------------------------------------------------------------------- placing

    def place(self, tree: Any) -> Any:
        """A run-axis pytree [R, ...] (device arrays, global when several processes) padded to [R_pad, ...] on 'task'."""
        return pad_runs(tree, self.mesh)[0]

    def place_host(self, tree: Any) -> Any:
        """The same for numpy leaves [R, ...] every process holds in full (e.g. each run's task row)."""
        padded, _ = pad_runs(tree, self.mesh.shape[TASK])
        return put_global(padded, run_sharding(self.mesh))

    def place_unpadded(self, tree: Any) -> Any:
        """Leaves [R, ...] every process holds in full, sharded as a checkpoint holds them (`unpadded_sharding`)."""
        return put_global(tree, unpadded_sharding(self.mesh, self.num_runs))

    def replicate(self, tree: Any) -> Any:
        """A pytree every run shares (frozen WM, device data store) on every device of the mesh."""
        return put_global(tree, replicated(self.mesh))

    def restore_target(self, tree: Any) -> Any:
        """Orbax restore target for unpadded run-axis leaves [R, ...] on this mesh (see `restore_target`)."""
        return restore_target(tree, self.mesh)

    # ------------------------------------------------------------------------------------- reading back

    def unpad(self, tree: Any) -> Any:
        """New device arrays of the R real rows (a snapshot a donated state cannot change; what checkpoints hold)."""
        return unpad(tree, self.num_runs, mesh=self.mesh)

    def gather(self, tree: Any) -> Any:
        """Numpy values of the R real rows of run-axis leaves, on every process (a collective with several)."""
        return jax.tree_util.tree_map(lambda x: np.asarray(x)[:self.num_runs], host_gather(tree))

    def gather_metrics(self, metrics: dict) -> dict:
        """Chunk metrics [N, R_pad] -> numpy [N, R] on every process."""
        return unpad(host_gather(metrics), self.num_runs, axis=1)

    def gather_runs(self, values: np.ndarray, owned: np.ndarray) -> np.ndarray:
        """Per-run host values [..., R] each process computed for the runs it `owned`: all of them, every process."""
        return gather_runs(values, owned)

    def local(self, tree: Any, snapshot: Any = None) -> tuple[np.ndarray, Any]:
        """(real rows r, leaves [len(r), ...]) of a padded run-axis pytree that this process evaluates.

        One process: rows 0..R-1 as an unpadded device snapshot (`snapshot` when given: `unpad(tree)` already
        taken). Several: this process's rows, copied to the host (a process cannot read the others' shards).
        """
        if not self.multiprocess:
            return np.arange(self.num_runs), self.unpad(tree) if snapshot is None else snapshot
        rows, local = local_rows(tree)
        assert np.array_equal(rows, self.rows), (rows, self.rows)
        return rows, local

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is on any (a collective with several processes)."""
        return self._agree(flag, np.any)

    def all(self, flag: bool) -> bool:
        """True on every process when `flag` is on all of them (a collective with several processes)."""
        return self._agree(flag, np.all)

    def _agree(self, flag: bool, how: Callable) -> bool:
        if not self.multiprocess:
            return bool(flag)
        return bool(how(multihost_utils.process_allgather(np.asarray(flag))))

    # ------------------------------------------------------------------------------------- programs

    def constrain(self) -> Callable[[dict], dict] | None:
        """The batch constraint of a 'data' axis > 1 (None without one): see `constrain_batch`."""
        return constrain_batch(self.mesh) if self.mesh.shape[DATA] > 1 else None

    def pad_index(self) -> np.ndarray:
        return pad_index(self.num_runs, self.mesh)

    def shard_chunk(self, chunk_fn: Callable) -> Callable:
        """`shard_chunk_fn` on this mesh (device-sampled chunks)."""
        return shard_chunk_fn(chunk_fn, self.mesh)

    def shard_chunk_host(self, chunk_fn: Callable, run_major: bool) -> Callable:
        """`shard_chunk_fn_host` on this mesh (host-fed chunks)."""
        return shard_chunk_fn_host(chunk_fn, self.mesh, run_major=run_major)

    def global_batches(self, local: dict, epochs: int) -> dict:
        """Run-major host batches of this process's rows [N, n, per, ...] -> global arrays [N, R_pad, per, ...]."""
        bs = NamedSharding(self.mesh, batch_spec())
        return {k: jax.make_array_from_process_local_data(bs, v, (epochs, self.padded) + v.shape[2:]) for k, v in local.items()}
