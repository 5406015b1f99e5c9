"""One bench row before it runs: its config, FLOPs, jitted program and arguments; lowering and compiling it.

A policy row's program is the trainer's own chunk (``training.program.make_train_chunk``: ``lax.scan`` over
``--epochs-per-call`` epochs of the vmapped ``pwm.update``, in-program window sampling, state donated) fed by an
in-memory random ``WindowData`` store; a ``wm-pretrain*`` row's is ``pretrain.make_pretrain_chunk`` (one "epoch" =
one pretraining iteration). Rows start from one run's params replicated over the runs: speed does not depend on
the values.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import pretrain, pwm, run_config
from fmbpo_jax import world_model as wm
from fmbpo_jax.data.sampler import WindowData
from fmbpo_jax.envs.tasks import MAX_ACTION_DIM, MAX_OBS_DIM
from fmbpo_jax.run_config import RunSpec
from fmbpo_jax.tools import flops as flop_model
from fmbpo_jax.training import memory, program
from fmbpo_jax.tools.bench.catalog import CONFIG_PRECISION, PRECISIONS, build_config, is_pretrain


@dataclasses.dataclass
class Row:
    """One planned row: its output fields, its jitted chunk and a builder of its (abstract or real) arguments."""

    row: dict
    precision: str
    mode: str
    pcfg: Any
    fn: Any
    make_args: Callable[[bool], tuple]  # abstract -> (state, *rest)
    runs: int
    flops: dict
    lowered: Any = None
    compiled: Any = None


def error_text(e: BaseException) -> str:
    """'Type: first line of the message' (at most 300 characters), as a row's 'error' field."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def row_label(row: dict) -> str:
    return f"{row['variant']} size={row['size']} tasks={row['tasks']} seeds={row['seeds']} precision={row['precision']}"


# --remat: the old on / off (kept for the rows' schema and old command lines) and the policy names themselves
REMAT_POLICY_OF = {"off": "all", "on": "step", "all": "all", "step": "step", "matmul_inputs": "matmul_inputs"}


def row_base(args, variant, size, tasks, precision) -> dict:
    """The fields that name a row (also written for rows that fail before they are planned)."""
    return {"variant": variant, "size": size if not os.path.isfile(size) else os.path.basename(size), "tasks": tasks,
            "seeds": 1 if is_pretrain(variant) else args.seeds, "precision": precision,
            "remat": args.remat, "preset": args.preset}


def row_config(args, variant: str, size: str, precision: str):
    """The row's ml_collections config: the variant at this size, precision and --remat, with the CLI's overrides."""
    config = build_config(size, variant, args.preset, args.wm_updates, args.batch_size, args.horizon, args.critic_iterations)
    config.precision = CONFIG_PRECISION[precision]  # bf16: bf16 matmul operands
    config.remat_policy = REMAT_POLICY_OF[args.remat]
    config.remat = config.remat_policy == "step"  # the old boolean, for the rows' configs as before
    return config


def random_window_data(num_tasks: int, horizon: int, episodes: int = 8, episode_length: int | None = None, seed: int = 0):
    """An in-memory WindowData of random transitions (obs U(-1,1), actions U(-1,1), rewards U(0,1))."""
    L = episode_length or max(101, 2 * (horizon + 1))
    rng = np.random.default_rng(seed)
    rows = episodes * L
    return WindowData(
        obs=jnp.asarray(rng.uniform(-1, 1, (num_tasks, rows, MAX_OBS_DIM)).astype(np.float32)),
        action=jnp.asarray(rng.uniform(-1, 1, (num_tasks, rows, MAX_ACTION_DIM)).astype(np.float32)),
        reward=jnp.asarray(rng.uniform(0, 1, (num_tasks, rows)).astype(np.float32)),
        episode_map=jnp.tile(jnp.arange(episodes, dtype=jnp.int32)[None], (num_tasks, 1)),
        num_entries=jnp.full((num_tasks,), episodes, jnp.int32),
        task_ids=jnp.arange(num_tasks, dtype=jnp.int32),
        episode_length=L,
    )


def take_task(data, i: int):
    """Task i of a WindowData, as a one-task WindowData."""
    return dataclasses.replace(data, obs=data.obs[i:i + 1], action=data.action[i:i + 1], reward=data.reward[i:i + 1],
                               episode_map=data.episode_map[i:i + 1], num_entries=data.num_entries[i:i + 1],
                               task_ids=data.task_ids[i:i + 1])


@functools.lru_cache(maxsize=None)
def _jitted_wm_init(wm_cfg):
    """jit(world_model.init) for one WM config, compiled once per config."""
    return jax.jit(functools.partial(wm.init, wm_cfg))


def init_state(pcfg, key):
    """pwm.init_state with the (large) WM init jitted and the rest eager.

    On the XLA CPU backend of jax 0.10.2 a jitted init of actor + critic (with or without vmap over runs, or with
    the WM) was seen to hang forever in execution (0% CPU) on a 2-core machine; program.init_runs is eager too.
    """
    w = _jitted_wm_init(pcfg.wm)(jax.random.split(key, 3)[2]) if pcfg.finetune_wm else None
    return pwm.init_state(pcfg, key, w)


def _pretrain_program(pcfg, epochs_per_call: int, batch_size: int, data):
    """(jitted chunk, make_args) of a WM pretraining row."""
    fn = pretrain.make_pretrain_chunk(pcfg, epochs_per_call, batch_size)
    init_wm = _jitted_wm_init(pcfg.wm)

    def make_args(abstract: bool):
        k = jax.random.PRNGKey(0)
        if abstract:
            state = jax.eval_shape(lambda kk: pwm.wm_pretrain_init(pcfg, kk), k)
        else:
            state = pwm.wm_pretrain_init(pcfg, k, init_wm(k))
        return (state, data, jax.random.PRNGKey(1))

    return fn, make_args


def _policy_program(pcfg, config, epochs_per_call: int, spec: RunSpec, chunk: int, data):
    """(jitted chunk, make_args) of a policy row: one run's state replicated over the run axis."""
    runs = spec.num_runs
    fn = program.make_train_chunk(pcfg, epochs_per_call, config.alg.batch_size, config.alg.wm_batch_size, chunk)
    init_wm = _jitted_wm_init(pcfg.wm)
    run_pos = jnp.asarray(spec.run_task_pos, jnp.int32)
    run_task = jnp.asarray(spec.run_task_ids, jnp.int32)

    def make_args(abstract: bool):
        keys = program.run_keys(spec)
        k = jax.random.PRNGKey(0)
        if abstract:
            one = jax.eval_shape(lambda kk: pwm.init_state(pcfg, kk), k)
            train = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((runs,) + x.shape, x.dtype), one)
            state = program.RunState(train=train, key=jax.ShapeDtypeStruct(keys.shape, keys.dtype),
                                     nan_streak=jax.ShapeDtypeStruct((runs,), jnp.int32))
        else:
            one = init_state(pcfg, k)
            train = jax.tree_util.tree_map(lambda x: jnp.repeat(x[None], runs, axis=0), one)
            state = program.RunState(train=train, key=keys, nan_streak=jnp.zeros((runs,), jnp.int32))
        frozen = None
        if not pcfg.finetune_wm:
            frozen = jax.eval_shape(init_wm, k) if abstract else init_wm(k)
        return (state, frozen, data, run_pos, run_task)

    return fn, make_args


def _task_chunk(args, pcfg, key: tuple, runs: int) -> int:
    """Runs per lax.map step: --task-chunk, --finetune-task-chunk for fine-tuning rows, a --rows CHUNK above both."""
    chunk = args.finetune_task_chunk if (pcfg.finetune_wm and args.finetune_task_chunk) else args.task_chunk
    chunk = getattr(args, "row_chunks", {}).get(key, chunk)
    return chunk if 0 < chunk < runs else 0


def plan_row(args, variant: str, size: str, tasks: int, precision: str, data=None, single_task: bool = False) -> Row:
    """Config, FLOPs and the jitted chunk of one row (nothing compiled or allocated yet)."""
    config = row_config(args, variant, size, precision)
    beh = run_config.behaviours(config)
    pcfg = run_config.pwm_config(config)
    mode = "pretrain" if is_pretrain(variant) else "policy"
    B = config.pretrain.batch_size if mode == "pretrain" else config.alg.batch_size
    n_tasks = 1 if single_task else tasks
    seeds = 1 if mode == "pretrain" else args.seeds
    runs = 1 if mode == "pretrain" else n_tasks * seeds
    chunk = _task_chunk(args, pcfg, (variant, size, tasks, precision), runs)
    row = row_base(args, variant, size, tasks, precision)
    row.update(mode=mode, unit="iteration" if mode == "pretrain" else "epoch", runs=runs,
               wm_updates=beh["wm_updates"] if (pcfg.finetune_wm or mode == "pretrain") else "-",
               batch_size=B, horizon=pcfg.horizon, latent=pcfg.wm.latent_dim,
               wm_substeps=pcfg.wm.substeps if pcfg.wm.kind == "flow" else 0,
               actor_substeps=pcfg.actor.substeps if pcfg.actor.kind == "flow" else 0,
               epochs_per_call=args.epochs_per_call, timed_calls=args.timed_calls, task_chunk=chunk)
    flops = flop_model.from_pwm_config(pcfg, B, config.alg.wm_batch_size, mode)
    if data is None:
        data = random_window_data(n_tasks, pcfg.horizon)
    if mode == "pretrain":
        fn, make_args = _pretrain_program(pcfg, args.epochs_per_call, B, data)
    else:
        spec = RunSpec(tuple(range(n_tasks)), tuple(range(seeds)))
        fn, make_args = _policy_program(pcfg, config, args.epochs_per_call, spec, chunk, data)
    return Row(row, precision, mode, pcfg, fn, make_args, runs, flops)


def lower_row(r: Row) -> None:
    t0 = time.perf_counter()
    with jax.default_matmul_precision(PRECISIONS[r.precision]):
        r.lowered = r.fn.lower(*r.make_args(True))
    r.row["lower_s"] = time.perf_counter() - t0


def compile_row(r: Row) -> None:
    """Compile the lowered program; compile_s includes the lowering; program_mem_gb from XLA's memory analysis."""
    t0 = time.perf_counter()
    r.compiled = r.lowered.compile()
    r.row["compile_s"] = r.row.get("lower_s", 0.0) + time.perf_counter() - t0
    r.lowered = None
    pb = memory.program_bytes(r.compiled)
    r.row["program_mem_gb"] = pb / 2**30 if pb else "n/a"
