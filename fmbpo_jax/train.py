"""The multitask trainer: every (seed, task) run of a phase in one compiled program.

Per-run state (actor, critic, their Adam states, ret_rms, epoch, PRNG key; the WM too when fine-tuned) is
stacked on a leading run axis R = seeds x tasks. One jitted call trains `chunk_epochs` epochs:
`lax.scan` over epochs of `vmap(pwm.update)` over runs, batches sampled inside the program from the
device-resident store (or fed from the host prefetcher), state donated, metrics returned once per chunk.
A frozen WM is shared by all runs (in_axes=None). Evaluation runs in a background thread on a params
snapshot; checkpoints are orbax (atomic) with the run's host-side bookkeeping as JSON in the same step.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import actors, nets, pwm, sharding
from fmbpo_jax import world_model as wm
from fmbpo_jax.data.sampler import WindowData
from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, MAX_ACTION_DIM, MT30_TASKS
from fmbpo_jax.run_config import RunSpec

Params = dict[str, Any]
EXIT_REQUEUE = 75  # EX_TEMPFAIL: the launch scripts requeue on it (SIGTERM -> checkpoint -> exit)


# ===================================================================================== pure, jittable parts


def run_keys(spec: RunSpec) -> jax.Array:
    """One independent PRNG stream per run: fold_in(PRNGKey(seed), task_id). Raw uint32 [R, 2]."""
    return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), t) for s, t in zip(spec.run_seeds, spec.run_task_ids)])


def init_runs(cfg: pwm.PWMConfig, keys: jax.Array, wm_params: Params | None = None) -> dict:
    """Stacked per-run training state [R, ...] from raw keys [R, 2].

    wm_params: pretrained WM copied into every run when fine-tuning (None: a fresh WM per run).
    """
    def one(k):
        k_init, k_train = jax.random.split(k)
        st = pwm.init_state(cfg, k_init, wm_params)
        st["key"] = k_train
        st["nan_streak"] = jnp.zeros((), jnp.int32)
        return st

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


def _epoch_one_run(cfg: pwm.PWMConfig, batch_size: int, wm_batch_size: int, st: dict, frozen_wm, data, pos, task,
                   constrain: Callable | None = None):
    """One epoch of one run with in-program sampling. Returns (state, metrics).

    constrain: `sharding.constrain_batch(mesh)` to split the batch axis over the mesh's 'data' devices (None: as is).
    """
    key, k_batch, k_wm, k_update = jax.random.split(st["key"], 4)
    batch = sample_run(data, pos, k_batch, batch_size, cfg.horizon)
    batch["task"] = task
    if cfg.finetune_wm and cfg.wm_updates == "iterations":
        wm_b = jax.vmap(lambda k: sample_run(data, pos, k, wm_batch_size, cfg.horizon))(jax.random.split(k_wm, cfg.wm_iterations))
        batch["wm"] = wm_b
    if constrain is not None:
        batch = constrain(batch)
    return _update_one_run(cfg, st, batch, key, k_update, frozen_wm)


def _update_one_run(cfg, st, batch, next_key, k_update, frozen_wm):
    inner = {k: v for k, v in st.items() if k not in ("key", "nan_streak")}
    new, metrics = pwm.update(cfg, inner, batch, k_update, frozen_wm)
    skipped = metrics["actor_nan_skip"] + metrics.get("wm_nan_skips", 0)
    new["nan_streak"] = jnp.where(skipped > 0, st["nan_streak"] + 1, 0)
    new["key"] = next_key
    return new, metrics


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
    run_major=True: batches are already per run row, obs [N, R_pad, B + I*Bw, H+1, O] (`local_host_batches`,
    multi-process), so neither the task->run regrouping nor pad_index applies.
    """
    _check_constraint(constrain, task_chunk)
    per = batch_size + (cfg.wm_iterations * wm_batch_size if cfg.finetune_wm and cfg.wm_updates == "iterations" else 0)

    def to_runs(x):  # [T, S*per, ...] -> [R=S*T, per, ...], seed-major
        T = x.shape[0]
        x = x.reshape((T, num_seeds, per) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape((num_seeds * T, per) + x.shape[3:])

    def one(st, frozen_wm, b, task):
        key, k_update = jax.random.split(st["key"])
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


def eval_groups(spec: RunSpec, rows: np.ndarray) -> list[tuple[int, tuple[int, ...]]]:
    """[(seed index s, task positions)]: the real runs among `rows` (padded run rows of one process), per seed.

    One process holding every run: [(s, (0..T-1)) for each seed], the evaluator's per-seed layout.
    """
    T = spec.num_tasks
    real = sorted(int(r) for r in rows if r < spec.num_runs)
    out: dict[int, list[int]] = {}
    for r in real:
        out.setdefault(r // T, []).append(r % T)
    return [(s, tuple(p)) for s, p in out.items()]


def group_bundles(spec: RunSpec, groups: list, rows: np.ndarray, local: dict, frozen_wm) -> tuple[list[dict], list]:
    """(evaluation bundles, critic rows) per group from one process's rows of the run axis.

    local: {'actor': [n, ...], 'critic'?: [n, ...], 'wm'?: [n, ...]} holding run rows `rows` [n] (numpy).
    bundle i = {'actor': rows of group i [len(pos), ...], 'wm': frozen_wm or its rows}; critic rows likewise
    (None without 'critic').
    """
    where = {int(r): i for i, r in enumerate(rows)}
    bundles, critics = [], []
    for s, pos in groups:
        idx = np.array([where[s * spec.num_tasks + p] for p in pos])
        take = lambda tree: jax.tree_util.tree_map(lambda x: x[idx], tree)  # noqa: E731
        bundles.append({"actor": take(local["actor"]), "wm": frozen_wm if frozen_wm is not None else take(local["wm"])})
        critics.append(take(local["critic"]) if "critic" in local else None)
    return bundles, critics


def per_run_values(spec: RunSpec, groups: list, results: list, fields: list[Callable]) -> tuple[np.ndarray, np.ndarray]:
    """(values [len(fields), R] float64, owned [R] bool) from one EvalResult per group.

    fields: functions (returns [E], successes [E]) -> float for one task row; runs not in `groups` stay 0.
    """
    T = spec.num_tasks
    vals = np.zeros((len(fields), spec.num_runs), np.float64)
    owned = np.zeros(spec.num_runs, bool)
    for (s, pos), res in zip(groups, results):
        for i, p in enumerate(pos):
            r = s * T + p
            vals[:, r] = [f(res.returns[i], res.successes[i]) for f in fields]
            owned[r] = True
    return vals, owned


def make_diagnostics_fn(cfg: pwm.PWMConfig, batch_size: int, num_groups: int, num_probes: int, jac_samples: int) -> Callable:
    """jit(state [R], frozen_wm | None, data, run_pos [R], run_task [R]) -> {name: [R]} diagnostics; state not donated.

    Each run samples a fresh batch from a key folded off its own stream, so training is unchanged by diagnostics.
    """
    from fmbpo_jax import diagnostics

    def one(st, frozen_wm, data, pos, task):
        k_batch, k_diag = jax.random.split(jax.random.fold_in(st["key"], 0x0D1A6))
        batch = sample_run(data, pos, k_batch, batch_size, cfg.horizon)
        batch["task"] = task
        inner = {k: v for k, v in st.items() if k not in ("key", "nan_streak")}
        return diagnostics.epoch_diagnostics(cfg, inner, batch, k_diag, frozen_wm, num_groups=num_groups,
                                             num_probes=num_probes, max_jac_samples=jac_samples)

    def all_runs(state, frozen_wm, data, run_pos, run_task):
        return jax.vmap(lambda st, pos, task: one(st, frozen_wm, data, pos, task))(state, run_pos, run_task)

    return jax.jit(all_runs)


def make_policy_fn(cfg: pwm.PWMConfig, shared_wm: bool, apply_masks: bool) -> Callable:
    """Deterministic evaluation policy for the batched evaluator.

    policy(bundle, obs [N, 24], task_ids [N]) -> tanh actions [N, 6]; bundle = {'actor': [T, ...],
    'wm': shared or [T, ...]}, slots task-major (slot i belongs to bundle row i // (N / T)), as the
    evaluator lays them out for its task list.
    """
    masks = nets.action_mask_table(ACTION_DIMS_BY_ID, MAX_ACTION_DIM)

    def one_task(actor_p, wm_p, obs, task):
        z = wm.encode(cfg.wm, wm_p, obs, task)
        a = jnp.tanh(actors.action(cfg.actor, actor_p, z, None, deterministic=True))
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


def seed_bundles(spec: RunSpec, snap: dict, frozen_wm) -> list[dict]:
    """Per seed, the evaluation policy's params: {'actor': rows of that seed [T, ...], 'wm': shared or [T, ...]}."""
    T = spec.num_tasks
    out = []
    for s in range(len(spec.seeds)):
        rows = lambda x: x[s * T:(s + 1) * T]
        out.append({"actor": jax.tree_util.tree_map(rows, snap["actor"]),
                    "wm": frozen_wm if frozen_wm is not None else jax.tree_util.tree_map(rows, snap["wm"])})
    return out


@jax.jit
def _select_best(best: dict, snap: dict, improved: jax.Array) -> dict:
    """Per-run where(improved, snapshot, best) over every leaf [R, ...]."""
    def sel(b, s):
        return jnp.where(improved.reshape((-1,) + (1,) * (b.ndim - 1)), s, b)
    return jax.tree_util.tree_map(sel, best, snap)


# ===================================================================================== host-side helpers


def truncate_jsonl(path: str, keep: Callable[[dict], bool]) -> None:
    """Keep only the rows of a JSONL log that `keep` accepts (rows written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            if keep(r):
                f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class RunLog:
    """Append-only JSONL logs in the workdir; on resume rows at or past the restored epoch are dropped."""

    def __init__(self, workdir: str):
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.eval_path = os.path.join(workdir, "eval.jsonl")
        self.diag_path = os.path.join(workdir, "diagnostics.jsonl")

    def resume_at(self, epoch: int, last_eval_epoch: int) -> None:
        truncate_jsonl(self.metrics_path, lambda r: r["epoch"] < epoch)
        truncate_jsonl(self.eval_path, lambda r: r["epoch"] <= last_eval_epoch)
        truncate_jsonl(self.diag_path, lambda r: r["epoch"] <= epoch)

    @staticmethod
    def _append(path: str, rows: list[dict]) -> None:
        if rows:
            with open(path, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def diagnostics(self, rows):
        self._append(self.diag_path, rows)

    def metrics(self, rows):
        self._append(self.metrics_path, rows)

    def evals(self, rows):
        self._append(self.eval_path, rows)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class EvalThread:
    """Evaluates params snapshots group by group in a background thread (one evaluation at a time).

    evs: one Evaluator per task-position tuple of `groups` ([(seed index, task positions)], `eval_groups`); one
    process holding every run has a single evaluator over all tasks, used for every seed.
    """

    def __init__(self, evs: dict, groups: list, seeds: tuple[int, ...], eval_seed: int, background: bool):
        self.evs = evs
        self.groups = groups
        self.seeds = seeds
        self.eval_seed = eval_seed
        self.background = background
        self._thread: threading.Thread | None = None
        self._results: list = []
        self._lock = threading.Lock()

    def idle(self) -> bool:
        """No evaluation running (every submitted one has its result queued)."""
        return self._thread is None or not self._thread.is_alive()

    def _work(self, epoch: int, bundles: list, snap_state: Any, seed_offset: int):
        try:
            res = [self.evs[pos].run(b, seed=self.eval_seed + seed_offset, tag=(epoch, self.seeds[s]))
                   for (s, pos), b in zip(self.groups, bundles)]
            with self._lock:
                self._results.append(("ok", epoch, res, snap_state))
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            with self._lock:
                self._results.append(("error", epoch, e, None))

    def submit(self, epoch: int, bundles: list, snap_state: Any = None, seed_offset: int = 0) -> None:
        self.wait()
        if self.background:
            self._thread = threading.Thread(target=self._work, args=(epoch, bundles, snap_state, seed_offset), daemon=True)
            self._thread.start()
        else:
            self._work(epoch, bundles, snap_state, seed_offset)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def poll(self) -> list:
        with self._lock:
            out, self._results = self._results, []
        for kind, epoch, value, _ in out:
            if kind == "error":
                raise value
        return out

    def close(self) -> None:
        self.wait()
        for ev in self.evs.values():
            ev.close()


class Preempted(Exception):
    """SIGTERM arrived: the trainer checkpointed and should exit with EXIT_REQUEUE."""


class SigtermFlag:
    """Installs a SIGTERM handler that only sets a flag; the loop checks it between jitted chunks."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def format_table(rows: list[dict], cols: list[str]) -> str:
    """A plain-text table (also valid Markdown)."""
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([fmt(r.get(c, "")) for c in cols]) for r in rows]
    return "\n".join(out)


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def eta_string(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


# ========================================================================================= the driver


class TrainingStopped(RuntimeError):
    """A run kept producing non-finite updates; the message names the run and the quantity."""


class OutOfDeviceMemory(TrainingStopped):
    """The jitted chunk of epochs did not fit the device; the message names the flags that shrink it."""


def out_of_memory_advice(err: BaseException, runs: int, task_chunk: int, remat: bool) -> str | None:
    """What to change after XLA's RESOURCE_EXHAUSTED (compile or first call of the training chunk); None for other errors.

    runs: runs per device (padded); task_chunk: --config.task_chunk (0 = all runs vmapped at once).
    Why a message of our own: XLA's names only the allocation ("... 164.02GiB ... jit_chunk"), not the flags
    that set it, and on one 80 GB GPU 48M full flow x 30 tasks needs --config.task_chunk=3 (README, Memory).
    """
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
        return None
    at_once = task_chunk if 0 < task_chunk < runs else runs
    fixes = []
    if at_once > 1:
        fixes.append(f"--config.task_chunk={max(1, at_once // 2)} (runs trained at once, lax.map over the rest; "
                     "same numbers, activation memory roughly proportional), or --config.task_chunk=-1 to measure "
                     "and take the largest group that fits")
    if not remat:
        fixes.append("--config.remat=True (recompute each rollout step in the backward pass; same numbers)")
    fixes.append("fewer runs per job (--config.tasks / --config.seeds)")
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return (f"out of device memory in the training step with {at_once} of {runs} runs per device at once "
            f"(--config.task_chunk={task_chunk}, --config.remat={remat}): {first}\n"
            "Try " + "; or ".join(fixes) + ".\nThe last checkpoint in the workdir is intact: rerun with the new "
            "flags to resume (README: 'Memory at 48M x 30 tasks').")


def program_bytes(compiled) -> int | None:
    """Device memory a compiled program needs (XLA's memory analysis: arguments + outputs + temporaries - aliased)."""
    try:
        m = compiled.memory_analysis()
        return None if m is None else int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                          - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - backends without a memory analysis
        return None


def device_memory_stats() -> dict | None:
    """This process's first device's memory statistics (bytes_limit, peak_bytes_in_use, ...); None where the
    backend keeps none (CPU)."""
    try:
        return jax.local_devices()[0].memory_stats() or None
    except Exception:  # noqa: BLE001 - backends without stats
        return None


def device_memory_budget(config) -> float | None:
    """Bytes the training step may use under --config.task_chunk=-1: task_chunk_memory_gb, else 90% of the
    device's limit (the rest: evaluation, checkpoint copies, allocator slack); None where the device reports none."""
    gb = float(config.get("task_chunk_memory_gb", 0.0) or 0.0)
    if gb > 0:
        return gb * 1e9
    limit = (device_memory_stats() or {}).get("bytes_limit")
    return 0.9 * limit if limit else None


def choose_task_chunk(runs: int, bytes_for: Callable[[int], int | None], budget: float | None,
                      log: Callable[[str], None]) -> int:
    """--config.task_chunk=-1: the largest group of runs whose compiled training step fits `budget` bytes.

    Candidates: all runs at once (0), then the divisors of `runs` from the largest down to 1 (1 is kept even when
    it does not fit: it is the smallest program there is, and XLA then names the shortfall). bytes_for(chunk)
    compiles the step with that chunk and returns its memory (None: unknown, take it). After two compiles a
    straight line through (group size, bytes) skips the candidates it predicts too big, so a 48M full-flow
    x 30-task step on 80 GB needs about 3 compiles, not 6. No budget (a device that reports no limit, e.g. CPU): 0.
    """
    if not budget:
        log("task_chunk=-1: the device reports no memory limit (set --config.task_chunk_memory_gb); all runs at once")
        return 0
    seen: dict[int, int] = {}  # group size -> bytes
    for chunk in [0] + [d for d in range(runs - 1, 0, -1) if runs % d == 0]:
        size = chunk or runs
        if len(seen) >= 2 and chunk != 1:
            (s1, b1), (s2, b2) = sorted(seen.items())[:2]
            if b1 + (size - s1) * (b2 - b1) / (s2 - s1) > budget:
                continue
        need = bytes_for(chunk)
        fits = need is None or need <= budget
        log(f"task_chunk=-1: {size} of {runs} runs at once need {'?' if need is None else f'{need / 1e9:.1f}'} GB "
            f"of {budget / 1e9:.1f} GB: {'fits' if fits else 'too big'}")
        if fits:
            return chunk
        seen[size] = need
    return 1


def load_pretrained_wm(config, wm_cfg):
    """(WMConfig, params) from --config.checkpoint (a .pt or a converted dir), or None when unset.

    The architecture comes from the checkpoint; facts its shapes cannot tell (integrator, substeps, bins
    range, SimNorm group) from the config. A WM kind or task count that disagrees is an error.
    """
    import dataclasses

    from fmbpo_jax.run_config import ConfigError

    path = config.checkpoint
    if not path:
        return None
    if not os.path.exists(path):
        raise ConfigError(f"--config.checkpoint={path!r} does not exist (see README 'Bring your own checkpoint')")
    from fmbpo_jax import bundle

    try:
        ck_cfg, params = bundle.load_world_model(path)
    except bundle.BundleError as e:
        raise ConfigError(f"--config.checkpoint={path!r}: {e}") from None
    if ck_cfg.kind != wm_cfg.kind:
        raise ConfigError(f"--config.world_model={wm_cfg.kind!r} but {path} holds a {ck_cfg.kind!r} world model")
    if ck_cfg.num_tasks != wm_cfg.num_tasks:
        raise ConfigError(f"{path}: the checkpoint has {ck_cfg.num_tasks} tasks, the config expects {wm_cfg.num_tasks} (MT30)")
    ck_cfg = dataclasses.replace(ck_cfg, integrator=wm_cfg.integrator, substeps=wm_cfg.substeps, vmin=wm_cfg.vmin,
                                 vmax=wm_cfg.vmax, simnorm_dim=wm_cfg.simnorm_dim)
    return ck_cfg, jax.tree_util.tree_map(jnp.asarray, params)


def open_data(config, spec: RunSpec, episode_subsampling: str, horizon: int, multiprocess: bool = False):
    """The per-task store: ('device', WindowData) or ('host', Store).

    multiprocess: several JAX processes train this config; only the host sampler splits the data by process
    (each reads only its own runs' tasks), so 'auto' picks it and 'device' is an error.
    """
    from fmbpo_jax.data.sampler import load_device_data
    from fmbpo_jax.data.store import StoreError, open_store
    from fmbpo_jax.run_config import ConfigError

    d = config.data.dataset_dir
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
    mode = config.data.sampler
    if mode == "auto":
        mode = "device" if nbytes <= config.data.device_budget_gb * 2**30 and not multiprocess else "host"
    if mode == "device" and multiprocess:
        raise ConfigError("--config.data.sampler=device: a multi-process run needs --config.data.sampler=host (or auto): "
                          "the device store is replicated on every device, the host sampler reads per process only "
                          "the tasks of that process's runs")
    if mode == "device":
        return "device", load_device_data(store, list(spec.task_ids), episode_subsampling=episode_subsampling,
                                          seed=spec.seeds[0])
    return "host", store


def _metrics_rows(spec: RunSpec, metrics: dict, first_epoch: int, log_freq: int, elapsed: float) -> list[dict]:
    """One row per logged epoch per run from the chunk's stacked metrics [N, R]."""
    host = {k: np.asarray(v) for k, v in metrics.items()}
    n = next(iter(host.values())).shape[0]
    rows = []
    for i in range(n):
        e = first_epoch + i
        if e % log_freq:
            continue
        for r in range(spec.num_runs):
            row = {"epoch": e, "task": MT30_TASKS[spec.run_task_ids[r]], "seed": spec.run_seeds[r], "total_time": round(elapsed, 3)}
            row.update({k: float(v[i, r]) for k, v in host.items()})
            rows.append(row)
    return rows


def train(config, workdir: str, *, on_metrics: Callable | None = None, on_eval: Callable | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Train every (seed, task) run of `config` in one program; resume from `workdir` if it holds a checkpoint.

    Returns {'results': per-run rows, 'epoch': epochs done}. Raises Preempted after checkpointing on SIGTERM.
    """
    import orbax.checkpoint as ocp

    from fmbpo_jax import run_config
    from fmbpo_jax.envs.evaluate import Evaluator

    run_config.validate(config)
    spec = run_config.run_spec(config)
    beh = run_config.behaviours(config)
    wm_cfg0, _, _ = run_config.model_configs(config)
    loaded = load_pretrained_wm(config, wm_cfg0)
    pcfg = run_config.pwm_config(config, loaded[0] if loaded else None)
    if config.eval.freq % config.chunk_epochs or config.checkpoint_freq % config.chunk_epochs:
        raise run_config.ConfigError(f"--config.eval.freq={config.eval.freq} and --config.checkpoint_freq={config.checkpoint_freq} "
                                     f"must be multiples of --config.chunk_epochs={config.chunk_epochs}")
    # Several processes (jax.distributed): each feeds and evaluates only the runs on its devices; metrics and
    # scores are gathered so every process sees all runs, and only process 0 writes logs and prints.
    multi = sharding.is_multiprocess()
    main_process = jax.process_index() == 0
    if not main_process:
        log = lambda s: None  # noqa: E731
    data_parallel = int(config.get("data_parallel", 1) or 1)
    if data_parallel < 1 or jax.device_count() % data_parallel:
        raise run_config.ConfigError(f"--config.data_parallel={data_parallel} must divide the device count {jax.device_count()}")
    os.makedirs(workdir, exist_ok=True)
    if main_process:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    precision = run_config.matmul_precision(config)
    late = run_config.apply_xla_flags(config)  # the main job applied it before jax started; this catches library use
    if late:
        log(f"warning: {late}")
    mode, data = open_data(config, spec, beh["episode_subsampling"], pcfg.horizon, multiprocess=multi)

    keys = run_keys(spec)
    if pcfg.finetune_wm:
        frozen_wm = None
        start_wm = loaded[1] if loaded else None
    else:
        frozen_wm = loaded[1] if loaded else wm.init(pcfg.wm, jax.random.PRNGKey(spec.seeds[0]))  # B11 quirk: random frozen WM
        start_wm = None
    state = init_runs(pcfg, keys, start_wm)
    best = {"actor": state["actor"], "return": jnp.full((spec.num_runs,), -jnp.inf, jnp.float32)}
    if pcfg.finetune_wm:
        best["wm"] = state["wm"]
    best = jax.tree_util.tree_map(jnp.array, best)  # own buffers: `state` is donated below
    # The run axis is sharded over every device of every process ('task' mesh axis), padded with dummy runs to
    # a multiple of the 'task' size; checkpoints hold only the R real runs and restore onto any device count.
    # data_parallel > 1 also splits each run's batch over that many devices ('data' axis).
    mesh = sharding.make_mesh(data=data_parallel)
    R = spec.num_runs
    R_pad = sharding.padded_size(R, mesh.shape[sharding.TASK])
    best = sharding.put_global(best, sharding.unpadded_sharding(mesh, R))
    if multi:  # built identically by every process; pad_runs' jit below needs it as a global array
        state = sharding.put_global(state, sharding.unpadded_sharding(mesh, R))
    eval_frozen = frozen_wm  # this process's own copy: evaluation runs per process, outside the mesh

    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    meta = {"epoch": 0, "last_eval_epoch": -1, "elapsed": 0.0, "evals": []}
    runlog = RunLog(workdir)
    if mngr.latest_step() is not None:
        step = mngr.latest_step()
        restored = mngr.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(sharding.restore_target({"state": state, "best": best}, mesh)),
            meta=ocp.args.JsonRestore()))
        state, best = restored["train"]["state"], restored["train"]["best"]
        meta = restored["meta"]
        if main_process:
            runlog.resume_at(meta["epoch"], meta["last_eval_epoch"])
        log(f"resumed from {workdir} at epoch {meta['epoch']}")

    state, _ = sharding.pad_runs(state, mesh)
    (run_pos_np, run_task_np), _ = sharding.pad_runs(  # numpy in, numpy out: placed below
        (np.asarray(spec.run_task_pos, np.int32), np.asarray(spec.run_task_ids, np.int32)), mesh.shape[sharding.TASK])
    if frozen_wm is not None:
        frozen_wm = sharding.put_global(frozen_wm, sharding.replicated(mesh))
    if mode == "device":
        data = sharding.put_replicated(data, mesh)
    my_rows = sharding.process_run_rows(mesh, R_pad)  # padded run rows on this process's devices

    def save(epoch: int):
        real = sharding.unpad(state, R, mesh=mesh)
        mngr.save(epoch, args=ocp.args.Composite(train=ocp.args.StandardSave({"state": real, "best": best}),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()

    T = spec.num_tasks
    run_pos = sharding.put_global(run_pos_np, sharding.run_sharding(mesh))
    run_task = sharding.put_global(run_task_np, sharding.run_sharding(mesh))
    chunk_fns: dict[int, Callable] = {}
    constrain = sharding.constrain_batch(mesh) if data_parallel > 1 else None
    if constrain is not None and config.task_chunk:
        raise run_config.ConfigError(f"--config.data_parallel={data_parallel} needs --config.task_chunk=0 "
                                     f"(got {config.task_chunk})")

    def device_chunk_fn(n: int, chunk: int) -> Callable:
        return sharding.shard_chunk_fn(make_train_chunk(pcfg, n, config.alg.batch_size, config.alg.wm_batch_size, chunk,
                                                        constrain=constrain), mesh)

    task_chunk = int(config.task_chunk)
    if task_chunk == -1:
        if mode != "device":
            raise run_config.ConfigError("--config.task_chunk=-1 (auto) measures the compiled step on device-resident "
                                         f"data; this run samples on the host (--config.data.sampler={config.data.sampler!r}, "
                                         "or a dataset too large for the device): set --config.task_chunk explicitly")
        n0 = min(config.chunk_epochs, max(1, config.epochs - int(meta["epoch"])))
        compiled: dict[int, Any] = {}

        def bytes_for(chunk: int) -> int | None:
            with jax.default_matmul_precision(precision):
                compiled[chunk] = device_chunk_fn(n0, chunk).lower(state, frozen_wm, data, run_pos, run_task).compile()
            return program_bytes(compiled[chunk])

        task_chunk = choose_task_chunk(R_pad, bytes_for, device_memory_budget(config), log)
        if task_chunk in compiled:
            chunk_fns[n0] = compiled[task_chunk]  # the compiled step of the first chunk: not compiled twice
        log(f"task_chunk=-1: using --config.task_chunk={task_chunk}")

    def chunk_fn(n: int) -> Callable:
        if n not in chunk_fns:
            if mode == "device":
                chunk_fns[n] = device_chunk_fn(n, task_chunk)
            else:
                chunk_fns[n] = sharding.shard_chunk_fn_host(
                    make_train_chunk_host(pcfg, len(spec.seeds), config.alg.batch_size, config.alg.wm_batch_size,
                                          task_chunk, pad_index=sharding.pad_index(R, mesh), run_major=multi,
                                          constrain=constrain), mesh, run_major=multi)
        return chunk_fns[n]

    diag_fn = None
    if config.diagnostics.freq:
        if mode != "device":
            raise run_config.ConfigError("--config.diagnostics.freq needs --config.data.sampler=device (in-program sampling)")
        d = config.diagnostics
        diag_fn = make_diagnostics_fn(pcfg, config.alg.batch_size, d.num_groups, d.num_probes, d.jac_samples)

    host_sampler = None
    if mode == "host":
        from fmbpo_jax.data.sampler import HostSampler

        per = config.alg.batch_size + (pcfg.wm_iterations * config.alg.wm_batch_size
                                       if pcfg.finetune_wm and pcfg.wm_updates == "iterations" else 0)
        # multi-process: gather only the tasks of this process's rows, on the host; `next_batches` builds the
        # global run-major arrays from them (one process: the sampler's task-major chunks, already on device)
        my_pos, my_seed = local_run_layout(spec, my_rows)
        gathered = sorted(set(my_pos.tolist()))
        host_sampler = HostSampler(data, list(spec.task_ids), batch_size=per * len(spec.seeds), horizon=pcfg.horizon,
                                   chunk_epochs=config.chunk_epochs, episode_subsampling=beh["episode_subsampling"],
                                   seed=spec.seeds[0], num_threads=config.data.host_threads,
                                   first_chunk=meta["epoch"] // config.chunk_epochs,  # chunk i: pure function of (seed, i)
                                   to_device=not multi, gather_tasks=gathered if multi else None)

    def next_batches(n: int) -> dict:
        """The next host chunk trimmed to n epochs; multi-process: run-major global arrays [n, R_pad, per, ...]."""
        batches = host_sampler.next_chunk()
        if n < config.chunk_epochs:
            batches = jax.tree_util.tree_map(lambda x: x[:n], batches)
        if not multi:
            return batches
        local = local_host_batches(batches, gathered, my_pos, my_seed, len(spec.seeds))
        bs = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
        return {k: jax.make_array_from_process_local_data(bs, v, (n, R_pad) + v.shape[2:]) for k, v in local.items()}

    evaluator = None
    policy = make_policy_fn(pcfg, shared_wm=not pcfg.finetune_wm, apply_masks=bool(beh["action_masks"]))
    # One process: one evaluator over all tasks, used per seed. Several: each evaluates only its own runs, with
    # one evaluator per distinct task subset among its seeds; the scores are gathered (`gather_runs`).
    groups = eval_groups(spec, my_rows) if multi else [(s, tuple(range(T))) for s in range(len(spec.seeds))]
    if config.eval.episodes > 0:
        evs = {pos: Evaluator(policy, [spec.task_ids[p] for p in pos], episodes=config.eval.episodes,
                              num_workers=config.eval.workers or None, max_steps=config.eval.max_steps)
               for pos in dict.fromkeys(pos for _, pos in groups)}
        evaluator = EvalThread(evs, groups, spec.seeds, config.eval.seed, config.eval.background)

    def my_bundles(tree: dict) -> tuple[list[dict], list]:
        """(bundles, critic rows) of `groups`; tree: padded run-axis leaves (global arrays), copied to host."""
        rows, local = sharding.local_rows(tree)
        assert np.array_equal(rows, my_rows), (rows, my_rows)
        return group_bundles(spec, groups, rows, local, eval_frozen)

    def submit_eval(epoch: int):
        # unpad() builds new arrays (a snapshot): the donated state cannot change them
        snap = sharding.unpad({"actor": state["actor"], **({"wm": state["wm"]} if pcfg.finetune_wm else {})}, R, mesh=mesh)
        if multi:
            bundles = my_bundles({"actor": state["actor"], **({"wm": state["wm"]} if pcfg.finetune_wm else {})})[0]
        else:
            bundles = seed_bundles(spec, snap, frozen_wm)
        evaluator.submit(epoch, bundles, snap)
        meta["last_eval_epoch"] = epoch

    def all_processes(flag: bool, how: Callable) -> bool:
        """`how` (any/all) of a flag over the processes: a collective, so every process takes the same branch."""
        if not multi:
            return flag
        from jax.experimental import multihost_utils

        return bool(how(multihost_utils.process_allgather(np.asarray(flag))))

    def collect_evals():
        nonlocal best
        if evaluator is None:
            return
        # the gathers below are collectives: every process must poll the same evaluations, so wait for all
        if multi and not all_processes(evaluator.idle(), np.all):
            return
        for _, epoch, results, snap in evaluator.poll():
            vals, owned = per_run_values(spec, groups, results, [lambda r, su: r.mean(), lambda r, su: r.std(),
                                                                  lambda r, su: su.mean()])
            vals = sharding.gather_runs(vals, owned)  # [3, R] mean, std, success per run, seed-major
            returns = vals[0].astype(np.float32)
            ret_dev = sharding.put_global(returns, best["return"].sharding)
            new_best = {"actor": snap["actor"], "return": ret_dev}
            if "wm" in best:
                new_best["wm"] = snap["wm"]
            best = _select_best(best, new_best, ret_dev > best["return"])
            rows = [{"epoch": epoch, "task": MT30_TASKS[spec.run_task_ids[r]], "seed": spec.run_seeds[r],
                     "episode_reward": float(vals[0, r]), "episode_reward_std": float(vals[1, r]),
                     "episode_success": float(vals[2, r])} for r in range(R)]
            if main_process:
                runlog.evals(rows)
            meta["evals"].append({"epoch": epoch, "mean_return": float(returns.mean())})
            if on_eval:
                on_eval(rows)
            log(f"[eval epoch {epoch}] mean return {returns.mean():.1f} over {spec.num_runs} runs")

    epochs = config.epochs
    epoch = int(meta["epoch"])
    t_start = time.time() - meta["elapsed"]
    preempted = False
    try:
        with SigtermFlag() as sigterm, jax.default_matmul_precision(precision):
            if evaluator is not None and epoch % config.eval.freq == 0 and meta["last_eval_epoch"] < epoch:
                submit_eval(epoch)  # the reference evaluates at i = 0 too
            while epoch < epochs:
                n = min(config.chunk_epochs, epochs - epoch)
                t0 = time.time()
                try:
                    if mode == "device":
                        state, metrics = chunk_fn(n)(state, frozen_wm, data, run_pos, run_task)
                    else:
                        state, metrics = chunk_fn(n)(state, frozen_wm, next_batches(n), run_task)
                except Exception as e:  # noqa: BLE001 - only an out-of-memory error is rewritten, anything else re-raised
                    advice = out_of_memory_advice(e, R_pad // mesh.shape[sharding.TASK], task_chunk, bool(config.remat))
                    if advice is None:
                        raise
                    raise OutOfDeviceMemory(advice) from e
                metrics = sharding.unpad(sharding.host_gather(metrics), R, axis=1)
                rows = _metrics_rows(spec, metrics, epoch, config.log_freq, time.time() - t_start)
                epoch += n
                if main_process:
                    runlog.metrics(rows)
                if diag_fn is not None and epoch % config.diagnostics.freq == 0:
                    diag = _metrics_rows(spec, {k: v[None] for k, v in diag_fn(state, frozen_wm, data, run_pos, run_task).items()},
                                         epoch, 1, time.time() - t_start)
                    if main_process:
                        runlog.diagnostics(diag)
                if on_metrics and rows:
                    on_metrics(rows)
                streak = np.asarray(sharding.host_gather(state["nan_streak"]))[:R]
                if streak.max() >= config.max_nan_skips:
                    r = int(streak.argmax())
                    what = "world-model loss/gradients" if float(np.asarray(metrics.get("wm_nan_skips", jnp.zeros(1)))[-1].max()) > 0 \
                        else "actor loss/gradients"
                    raise TrainingStopped(f"run {spec.run_name(r)}: {int(streak[r])} consecutive updates skipped for "
                                          f"non-finite {what} (--config.max_nan_skips={config.max_nan_skips})")
                dt = time.time() - t0
                eps = n / max(dt, 1e-9)
                log(f"[epoch {epoch}/{epochs}] {eps:.2f} epochs/s, {eps * spec.num_runs:.1f} task-epochs/s, "
                    f"ETA {eta_string((epochs - epoch) / eps)}, actor_loss {float(np.mean(np.asarray(metrics['actor_loss'])[-1])):.4g}")
                collect_evals()
                if evaluator is not None and epoch % config.eval.freq == 0 and epoch < epochs:
                    submit_eval(epoch)
                meta["epoch"], meta["elapsed"] = epoch, time.time() - t_start
                stop = all_processes(sigterm.flag, np.any)  # one process's SIGTERM checkpoints and stops them all
                if epoch % config.checkpoint_freq == 0 or epoch == epochs or stop:
                    if evaluator is not None:
                        evaluator.wait()
                        collect_evals()
                    save(epoch)
                if stop:
                    preempted = True
                    break
    finally:
        if host_sampler is not None:
            host_sampler.close()
    if preempted:
        if evaluator is not None:
            evaluator.close()
        raise Preempted(f"SIGTERM: checkpointed at epoch {epoch} in {workdir}; rerun the same command to resume")

    if multi:
        bundles, critics = my_bundles({"actor": state["actor"], "critic": state["critic"],
                                       **({"wm": state["wm"]} if pcfg.finetune_wm else {})})
        best_bundles = None  # the best params are kept per run but re-evaluated only in single-process runs
    else:
        real = sharding.unpad(state, R, mesh=mesh)
        bundles = seed_bundles(spec, {"actor": real["actor"], **({"wm": real["wm"]} if pcfg.finetune_wm else {})}, frozen_wm)
        critics = [jax.tree_util.tree_map(lambda x: x[s * T:(s + 1) * T], real["critic"]) for s in range(len(spec.seeds))]
        best_bundles = seed_bundles(spec, {"actor": best["actor"], **({"wm": best["wm"]} if pcfg.finetune_wm else {})},
                                    frozen_wm)
    results = final_evaluation(config, pcfg, spec, beh, groups, bundles, critics, sharding.host_gather(best["return"]),
                               eval_frozen if multi else frozen_wm, evaluator, workdir, log, write=main_process,
                               best_bundles=best_bundles)
    if evaluator is not None:
        evaluator.close()
    mngr.close()
    return {"results": results, "epoch": epoch}


def final_evaluation(config, pcfg, spec, beh, groups, bundles, critics, best_return, frozen_wm, evaluator, workdir, log,
                     write: bool = True, best_bundles: list | None = None) -> list[dict]:
    """Final plain and planning evaluations of this process's `groups`; per-run results CSV and a summary table.

    groups/bundles/critics: per (seed index, task positions) group, its policy bundle and critic rows (one process:
    one group per seed over every task). best_return [R] host. The per-run scores are gathered over processes;
    `write`: this process writes results.csv and summary.md (process 0). best_bundles: the per-run best params
    (kept by periodic evaluation return), re-evaluated on fresh episodes (another seed than the selection saw)
    as `best_params_return`: the selection's own score is biased upwards, this one is not.
    """
    rows = [{"task": MT30_TASKS[spec.run_task_ids[r]], "seed": spec.run_seeds[r], "best_eval_return": float(best_return[r])}
            for r in range(spec.num_runs)]
    if evaluator is not None and config.eval.final:
        evs = evaluator.evs
        final = [evs[pos].run(b, seed=config.eval.seed + 1) for (_, pos), b in zip(groups, bundles)]
        if beh["planning_eval"] == "mppi":
            from fmbpo_jax.envs.planner import planning_evaluation

            # one call per task subset: its seeds' bundles and critic rows (seed-major, as planning_evaluation reads
            # them); the idle evaluator workers are reused. The MPPI noise is split per env slot, so a process's
            # subset of tasks plans with other noise than a single process would (plain evaluation is unaffected).
            planning = [None] * len(groups)
            for pos in dict.fromkeys(pos for _, pos in groups):
                idx = [i for i, g in enumerate(groups) if g[1] == pos]
                sub = RunSpec(task_ids=tuple(spec.task_ids[p] for p in pos), seeds=tuple(spec.seeds[groups[i][0]] for i in idx))
                crit = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *[critics[i] for i in idx])
                res = planning_evaluation(config, pcfg, sub, [bundles[i] for i in idx], {"critic": crit}, frozen_wm,
                                          pool=evs[pos].pool)
                for i, r in zip(idx, res):
                    planning[i] = r
        else:  # B8: the reference's "planning" number is a second plain evaluation
            planning = [evs[pos].run(b, seed=config.eval.seed + 2) for (_, pos), b in zip(groups, bundles)]
        mean = lambda r, su: r.mean()  # noqa: E731
        succ = lambda r, su: su.mean()  # noqa: E731
        std = lambda r, su: r.std()  # noqa: E731 - per-episode spread: what a margin over another policy is judged by
        v_final, owned = per_run_values(spec, groups, final, [mean, succ, std])
        v_plan, _ = per_run_values(spec, groups, planning, [mean, succ])
        vals = sharding.gather_runs(np.concatenate([v_final, v_plan]), owned)  # [5, R]
        for r in range(spec.num_runs):
            rows[r].update(final_return=float(vals[0, r]), final_return_std=float(vals[2, r]), final_success=float(vals[1, r]),
                           planning_return=float(vals[3, r]), planning_success=float(vals[4, r]))
        if best_bundles is not None:
            best_res = [evs[pos].run(b, seed=config.eval.seed + 3) for (_, pos), b in zip(groups, best_bundles)]
            v_best, _ = per_run_values(spec, groups, best_res, [mean])
            for r in range(spec.num_runs):
                rows[r]["best_params_return"] = float(v_best[0, r])
    cols = list(rows[0]) if rows else []
    table = format_table(rows, cols)
    if write:
        write_csv(os.path.join(workdir, "results.csv"), rows)
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(table + "\n")
    log(table)
    return rows
