"""Training-speed benchmark: ``python -m fmbpo_jax.bench`` (issue 9).

Every speed claim in this project is a row printed by this module (DESIGN.md section 4), never a timed test.

What one row measures
---------------------
One *variant* (what is trained, below) at one size, task count, seed count and matmul precision. The
program is the trainer's own jitted chunk (``train.make_train_chunk``: ``lax.scan`` over
``--epochs-per-call`` epochs of the vmapped ``pwm.update`` with in-program window sampling, state
donated), fed by an in-memory random ``WindowData`` store (no disk). ``wm-pretrain*`` rows time
``pretrain.make_pretrain_chunk`` instead (one "epoch" = one pretraining iteration).

* ``compile_s``: ``jit(...).lower(...).compile()`` wall time.
* one untimed warm-up call, then ``--timed-calls`` calls, each synchronised with
  ``jax.block_until_ready``; ``median_s_epoch`` / ``min_s_epoch`` = call time / epochs per call.
  Compile time is never inside these numbers.
* ``task_epochs_s`` = runs (seeds x tasks) / median seconds per epoch.
* ``gflop_epoch``: analytic matmul FLOPs per epoch of all runs that the algorithm NEEDS
  (:func:`epoch_flops`); ``gflop_naive``: what a naive autodiff implementation such as the PyTorch
  reference computes for the same epoch. Achieved FLOP/s = needed FLOPs / median epoch time.
* ``peak_gflops``: the best rate of one large matmul (``--peak-shape``; default 512x1792x1792 on CPU,
  the 48M layer shape, and 8192^3 on GPU) under the same ``jax.default_matmul_precision`` in the same
  process; ``mfu`` = achieved / peak.
* ``peak_mem_gb``: ``device.memory_stats()['peak_bytes_in_use']`` (process-wide high-water mark so
  far; 'n/a' where the backend has no memory stats, e.g. CPU); ``program_mem_gb``: XLA's
  ``memory_analysis()`` of the compiled program (arguments + outputs + temporaries - aliased).

Per-epoch work (``--preset``, default ``reference``): the reference's, i.e. one WM step on the policy batch
(B=512 x H=16) when fine-tuning, one actor step over B x H imagined steps, critic_iterations x
critic_batches = 32 critic steps of 2048 rows; this is what the reference's anchors measure. ``--preset
fixed`` runs the repaired behaviours (WM: wm_iterations x wm_batch_size = 8 x 256 sequences).

Usage::

    python -m fmbpo_jax.bench --variant main --size 5M --tasks 1 --json cpu.json          # the 4 reference variants
    python -m fmbpo_jax.bench --variant baseline-frozen --size 48M --tasks 1,30 --precision fp32-highest,bf16
    python -m fmbpo_jax.bench --variant baseline-frozen --size small --tasks 8 --vmap-check
    python -m fmbpo_jax.bench --variant baseline-frozen --size 48M --breakdown             # time per part of an epoch

Other switches: ``--breakdown`` (WM step / actor step / critic steps of one run, each jitted alone),
``--min-call-seconds`` (repeat short chunks back-to-back inside one timed sample), ``--compile-workers N``
(trace every row, compile them concurrently, then time them one by one; with ``--pipeline`` each row is timed
as soon as its program is ready, while later rows compile: the GPU script), ``--rows V:T:P[:SIZE[:CHUNK]],...``
(explicit rows in priority order, so a time limit cuts the least important ones; CHUNK is that row's
``--task-chunk``), ``--task-chunk`` /
``--finetune-task-chunk`` (lax.map the run axis for memory), ``--max-seconds`` (skip rows not started in time),
``--batch-size/--horizon/--critic-iterations`` (shrink for tests), ``--profile DIR`` (trace one more call of
each row with ``jax.profiler`` into ``DIR/<row>/`` (Perfetto/TensorBoard) and store the ops that took the most
time, with their source op names, in the row and ``DIR/<row>/top_ops.txt``; on CPU it turns on XLA's per-op
trace events, ``--xla_cpu_enable_xprof_traceme``, when jax has not started yet). ``--remat on`` recomputes
the rollout steps in the backward pass (``--config.remat``). Rows are timed on in-memory random data with the
initial params replicated over runs: speed does not depend on the values.

FLOP formula (:func:`epoch_flops`): a dense layer on ``rows`` rows costs ``2 * rows * in * out`` forward;
its backward is an input gradient (same cost) plus a weight gradient (same cost), i.e. backward = 2x
forward when both are needed. Only matmuls are counted (LayerNorm, Mish, SimNorm, Adam, sampling are not).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------- catalog

VARIANTS: dict[str, dict] = {
    # name: config fields (world_model, actor, finetune_wm, substeps) ; mode 'pretrain' = phase-8 WM pretraining
    "baseline-frozen": dict(world_model="mlp", actor="gaussian", finetune_wm=False),
    "flowpolicy-frozen": dict(world_model="mlp", actor="flow", finetune_wm=False, actor_substeps=2),
    "baseline-finetune": dict(world_model="mlp", actor="gaussian", finetune_wm=True),
    "fullflow-finetune-k4k2": dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=4, actor_substeps=2),
    "fullflow-finetune-k8k4": dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=8, actor_substeps=4),
    "wm-pretrain": dict(mode="pretrain", world_model="mlp"),
    "wm-pretrain-flow": dict(mode="pretrain", world_model="flow", wm_substeps=4),
}
MAIN_VARIANTS = ("baseline-frozen", "flowpolicy-frozen", "baseline-finetune", "fullflow-finetune-k4k2")

PRECISIONS = {"fp32-highest": "highest", "tf32": "tensorfloat32", "bf16": "bfloat16"}

# Reference seconds per epoch for ONE task (issue 9 / spec section 8), batch 512, H 16, reference per-epoch work.
REF_CPU_S_EPOCH = {  # 2-core CPU of this kind, torch 2.13 MKL, 2 threads, median s/epoch
    ("5M", "baseline-frozen"): 3.4, ("5M", "flowpolicy-frozen"): 3.8, ("5M", "baseline-finetune"): 4.0,
    ("5M", "fullflow-finetune-k4k2"): 8.6,
    ("48M", "baseline-frozen"): 6.5, ("48M", "flowpolicy-frozen"): 7.0, ("48M", "baseline-finetune"): 10.9,
    ("48M", "fullflow-finetune-k4k2"): 38.0,
}
REF_GPU_S_TASK_EPOCH = {  # H100/H200, 48M, recorded wall-clock incl. data + evaluation (spec section 8)
    "baseline-frozen": 0.09, "flowpolicy-frozen": 0.09, "baseline-finetune": 0.18,
    "fullflow-finetune-k4k2": 0.47, "fullflow-finetune-k8k4": 0.75,
}

TABLE_COLS = [
    ("variant", "variant"), ("size", "size"), ("tasks", "T"), ("seeds", "S"), ("precision", "precision"),
    ("remat", "remat"), ("compile_s", "compile s"), ("median_s_epoch", "median s/ep"), ("min_s_epoch", "min s/ep"),
    ("task_epochs_s", "task-ep/s"), ("gflop_epoch", "GFLOP/ep"), ("gflop_naive_epoch", "naive GFLOP/ep"),
    ("achieved_gflops", "GFLOP/s"), ("peak_gflops", "peak GFLOP/s"), ("mfu", "MFU"), ("peak_mem_gb", "peak mem GB"),
    ("program_mem_gb", "prog mem GB"), ("ref_s_epoch", "ref s/ep"), ("speedup_vs_ref", "x ref"),
]


# ------------------------------------------------------------------------------------------------- FLOPs


def mlp_dims(in_dim: int, hidden: Sequence[int], out: int) -> list[tuple[int, int]]:
    """(in, out) of every dense layer of an MLP in -> hidden... -> out."""
    widths = [int(in_dim), *[int(h) for h in hidden], int(out)]
    return list(zip(widths[:-1], widths[1:]))


def dense_flops(rows: float, dims: Sequence[tuple[int, int]], *, fwd: bool = True, dw: bool = False,
                dx: bool = False, dx_first_cols: int | None = None) -> float:
    """Matmul FLOPs of an MLP on `rows` rows: forward, weight gradient, input gradient (each 2*rows*in*out per layer).

    dx: input gradients of every layer; dx_first_cols: how many of the FIRST layer's input columns need a
    gradient (None = all, 0 = none, e.g. a detached input); XLA/torch compute whole matmuls, so 'naive'
    counts pass None.
    """
    per = [2.0 * rows * i * o for i, o in dims]
    total = sum(per) if fwd else 0.0
    if dw:
        total += sum(per)
    if dx:
        total += sum(per[1:])
        i0, o0 = dims[0]
        cols = i0 if dx_first_cols is None else min(dx_first_cols, i0)
        total += 2.0 * rows * cols * o0
    return total


def _model_dims(pcfg) -> dict:
    w, a, c = pcfg.wm, pcfg.actor, pcfg.critic
    O, A, L, E = w.obs_dim, w.action_dim, w.latent_dim, w.task_dim
    flow_wm = w.kind == "flow"
    dims = {
        "enc": mlp_dims(O + E, w.encoder_units, L),
        "dyn": mlp_dims(L + A + E + (1 if flow_wm else 0), w.units, L),
        "rew": mlp_dims(L + A + E, w.units, w.num_bins),
        "actor": mlp_dims(L + (A + 1 if a.kind == "flow" else 0), a.units, A),
        "critic": mlp_dims(L, c.units, 1),
        "n_dyn": (w.substeps * (2 if w.integrator == "heun" else 1)) if flow_wm else 1,
        "n_act": (a.substeps * (2 if a.integrator == "heun" else 1)) if a.kind == "flow" else 1,
        "C": c.num_critics, "L": L, "A": A, "E": E,
    }
    return dims


def wm_step_flops(pcfg, sequences: int) -> tuple[float, float]:
    """(needed, naive) FLOPs of one WM gradient step on `sequences` windows of H+1 steps (spec 2.2).

    Encoder: H stop-gradient target rows (forward only) + 1 source row (forward, weight grads, input grads
    of all but the first layer: obs needs no gradient). MLP WM: H dynamics calls; flow WM: per step one
    flow-matching velocity call + n_dyn integration calls (2K Heun / K Euler); H reward calls; all with
    weight and input gradients (input columns z (+emb when trained); naive: the whole input).
    """
    d = _model_dims(pcfg)
    H, N = pcfg.horizon, sequences
    flow = pcfg.wm.kind == "flow"
    cols = d["L"] + (d["E"] if pcfg.train_task_emb else 0)
    dyn_calls = H * N * ((1 + d["n_dyn"]) if flow else 1)
    enc = dense_flops(H * N, d["enc"]) + dense_flops(N, d["enc"], dw=True, dx=True, dx_first_cols=0)
    need = (enc + dense_flops(dyn_calls, d["dyn"], dw=True, dx=True, dx_first_cols=cols)
            + dense_flops(H * N, d["rew"], dw=True, dx=True, dx_first_cols=cols))
    naive = (enc + dense_flops(dyn_calls, d["dyn"], dw=True, dx=True)
             + dense_flops(H * N, d["rew"], dw=True, dx=True))
    return need, naive


def epoch_flops(pcfg, batch_size: int, wm_batch_size: int = 256, mode: str = "policy") -> dict:
    """Analytic matmul FLOPs of ONE epoch of ONE run (task, seed): {'needed', 'naive', 'parts': {...}}.

    mode 'policy': WM step(s) when pcfg.finetune_wm (policy batch B, or wm_iterations x wm_batch_size when
    wm_updates='iterations') + actor step + critic steps. mode 'pretrain': one WM step on `batch_size`
    multitask windows. Per layer: forward 2*rows*in*out; weight gradient and input gradient the same each.

    Actor step, NEEDED (what a functional implementation must compute), B = batch, H = horizon:
      encoder on obs0 (B rows, forward only: z0 is detached);
      actor: H x n_act calls on B rows, forward + weight grads + input grads (first layer: none for the
        Gaussian actor, whose input z is detached; the A action columns for the flow actor);
      WM transition: H x n_dyn calls, forward + input grads wrt (z, a) only (no weight grads: the actor
        loss does not step the WM); reward head: H calls, same;
      critic ensemble (C members): H forward evaluations (H-1 for the critic targets, the terminal one
        for the loss), plus input grads of the terminal one only.
    NAIVE (the reference's autograd): the same forwards, plus weight grads of the WM (including the
    encoder behind z0) and full input grads, and backward (weight + input grads) through all H critic
    evaluations.
    Critic steps: critic_iterations x B x H rows in total, C members, forward + weight grads + input grads
    of all but the first layer (same in both).
    """
    d = _model_dims(pcfg)
    H, B, C = pcfg.horizon, batch_size, d["C"]
    parts: dict[str, tuple[float, float]] = {}
    if mode == "pretrain":
        parts["wm"] = wm_step_flops(pcfg, batch_size)
    else:
        if pcfg.finetune_wm:
            if pcfg.wm_updates == "iterations":
                n, nv = wm_step_flops(pcfg, wm_batch_size)
                parts["wm"] = (pcfg.wm_iterations * n, pcfg.wm_iterations * nv)
            else:
                parts["wm"] = wm_step_flops(pcfg, B)
        flow_actor = pcfg.actor.kind == "flow"
        act_rows = H * B * d["n_act"]
        za = d["L"] + d["A"]
        enc_fwd = dense_flops(B, d["enc"])
        actor_need = dense_flops(act_rows, d["actor"], dw=True, dx=True, dx_first_cols=d["A"] if flow_actor else 0)
        actor_naive = dense_flops(act_rows, d["actor"], dw=True, dx=True, dx_first_cols=None if flow_actor else 0)
        dyn_rows, rew_rows = H * B * d["n_dyn"], H * B
        wm_need = (dense_flops(dyn_rows, d["dyn"], dx=True, dx_first_cols=za)
                   + dense_flops(rew_rows, d["rew"], dx=True, dx_first_cols=za))
        wm_naive = (dense_flops(dyn_rows, d["dyn"], dw=True, dx=True) + dense_flops(rew_rows, d["rew"], dw=True, dx=True)
                    + dense_flops(B, d["enc"], fwd=False, dw=True, dx=True, dx_first_cols=0))
        crit_need = dense_flops(H * B * C, d["critic"]) + dense_flops(B * C, d["critic"], fwd=False, dx=True)
        crit_naive = dense_flops(H * B * C, d["critic"], dw=True, dx=True)
        parts["actor_step"] = (enc_fwd + actor_need + wm_need + crit_need, enc_fwd + actor_naive + wm_naive + crit_naive)
        crit_rows = pcfg.critic_iterations * (B * H // pcfg.critic_batches) * pcfg.critic_batches
        c = dense_flops(crit_rows * C, d["critic"], dw=True, dx=True, dx_first_cols=0)
        parts["critic_steps"] = (c, c)
    return {"needed": sum(p[0] for p in parts.values()), "naive": sum(p[1] for p in parts.values()),
            "parts": {k: {"needed": v[0], "naive": v[1]} for k, v in parts.items()}}


# ------------------------------------------------------------------------------------------------ config


def build_config(size: str, variant: str, preset: str = "reference", wm_updates: str | None = None,
                 batch_size: int | None = None, horizon: int | None = None, critic_iterations: int | None = None):
    """The ml_collections config of a row: base config (or a config file) + size + variant fields."""
    from configs.base import SIZES, get_config

    if variant not in VARIANTS:
        raise SystemExit(f"--variant {variant!r}: known {', '.join(VARIANTS)}")
    if size in SIZES:
        c = get_config()
        c.model.size = size
    elif os.path.isfile(size):
        spec = importlib.util.spec_from_file_location("bench_config", size)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.get_config()
    else:
        raise SystemExit(f"--size {size!r}: one of {', '.join(SIZES)} or a config file with get_config()")
    v = VARIANTS[variant]
    c.world_model = v["world_model"]
    if "actor" in v:
        c.actor = v["actor"]
    c.finetune_wm = bool(v.get("finetune_wm", False))
    if "wm_substeps" in v:
        c.model.wm_substeps = v["wm_substeps"]
    if "actor_substeps" in v:
        c.model.actor_substeps = v["actor_substeps"]
    c.preset = preset
    if wm_updates:
        c.behaviour.wm_updates = wm_updates
    if batch_size:
        c.alg.batch_size = batch_size
        c.pretrain.batch_size = batch_size * 2
    if horizon:
        c.alg.horizon = horizon
    if critic_iterations:
        c.alg.critic_iterations = critic_iterations
    c.checkpoint_required = False
    return c


def random_window_data(num_tasks: int, horizon: int, episodes: int = 8, episode_length: int | None = None, seed: int = 0):
    """An in-memory WindowData of random transitions (obs U(-1,1), actions U(-1,1), rewards U(0,1))."""
    import jax.numpy as jnp

    from fmbpo_jax.data.sampler import WindowData
    from fmbpo_jax.envs.tasks import MAX_ACTION_DIM, MAX_OBS_DIM

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


def _take_task(data, i: int):
    return dataclasses.replace(data, obs=data.obs[i:i + 1], action=data.action[i:i + 1], reward=data.reward[i:i + 1],
                               episode_map=data.episode_map[i:i + 1], num_entries=data.num_entries[i:i + 1],
                               task_ids=data.task_ids[i:i + 1])


# -------------------------------------------------------------------------------------------- device info


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    info = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "host": platform.node(), "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def default_peak_shape() -> tuple[int, int, int]:
    import jax

    return (512, 1792, 1792) if jax.default_backend() == "cpu" else (8192, 8192, 8192)


def measure_peak(precision: str, shape: tuple[int, int, int], reps: int = 10, dtype: str = "float32") -> dict:
    """Best and median FLOP/s of an (M,K) @ (K,N) matmul under jax.default_matmul_precision(precision)."""
    import jax
    import jax.numpy as jnp

    m, k, n = shape
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (k, n), jnp.float32).astype(dtype)
    # bf16 operands accumulate in f32, as the models' nets.bf16_matmul does (bf16 x bf16 -> bf16 is a slower path on CPU)
    with jax.default_matmul_precision(PRECISIONS[precision]):
        f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32)).lower(a, b).compile()
    jax.block_until_ready(f(a, b))
    times = []
    t_end = time.perf_counter() + 30.0
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    flop = 2.0 * m * k * n
    return {"shape": list(shape), "dtype": dtype, "best_flops": flop / min(times), "median_flops": flop / statistics.median(times)}


# --------------------------------------------------------------------------------------------- one row


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


def _error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def _label(row: dict) -> str:
    return f"{row['variant']} size={row['size']} tasks={row['tasks']} seeds={row['seeds']} precision={row['precision']}"


def _row_base(args, variant, size, tasks, precision) -> dict:
    return {"variant": variant, "size": size if not os.path.isfile(size) else os.path.basename(size), "tasks": tasks,
            "seeds": 1 if VARIANTS[variant].get("mode") == "pretrain" else args.seeds, "precision": precision,
            "remat": args.remat, "preset": args.preset}


def plan_row(args, variant: str, size: str, tasks: int, precision: str, data=None, single_task: bool = False) -> Row:
    """Config, FLOPs and the jitted chunk of one row (nothing compiled or allocated yet)."""
    import jax
    import jax.numpy as jnp

    from fmbpo_jax import pretrain, pwm, run_config, train
    from fmbpo_jax import world_model as wm
    from fmbpo_jax.run_config import RunSpec

    config = build_config(size, variant, args.preset, args.wm_updates, args.batch_size, args.horizon, args.critic_iterations)
    config.precision = {"fp32-highest": "float32", "tf32": "tf32", "bf16": "bf16"}[precision]  # bf16: bf16 matmul operands
    config.remat = args.remat == "on"
    beh = run_config.behaviours(config)
    pcfg = run_config.pwm_config(config)
    mode = "pretrain" if VARIANTS[variant].get("mode") == "pretrain" else "policy"
    B = config.pretrain.batch_size if mode == "pretrain" else config.alg.batch_size
    n_tasks = 1 if single_task else tasks
    seeds = 1 if mode == "pretrain" else args.seeds
    runs = 1 if mode == "pretrain" else n_tasks * seeds
    chunk = args.finetune_task_chunk if (pcfg.finetune_wm and args.finetune_task_chunk) else args.task_chunk
    chunk = getattr(args, "row_chunks", {}).get((variant, size, tasks, precision), chunk)  # --rows ...:CHUNK wins
    chunk = chunk if 0 < chunk < runs else 0
    row = _row_base(args, variant, size, tasks, precision)
    row.update(mode=mode, unit="iteration" if mode == "pretrain" else "epoch", runs=runs,
               wm_updates=beh["wm_updates"] if (pcfg.finetune_wm or mode == "pretrain") else "-",
               batch_size=B, horizon=pcfg.horizon, latent=pcfg.wm.latent_dim,
               wm_substeps=pcfg.wm.substeps if pcfg.wm.kind == "flow" else 0,
               actor_substeps=pcfg.actor.substeps if pcfg.actor.kind == "flow" else 0,
               epochs_per_call=args.epochs_per_call, timed_calls=args.timed_calls, task_chunk=chunk)
    flops = epoch_flops(pcfg, B, config.alg.wm_batch_size, mode)
    if data is None:
        data = random_window_data(n_tasks, pcfg.horizon)

    if mode == "pretrain":
        fn = pretrain.make_pretrain_chunk(pcfg, args.epochs_per_call, B)
        init_wm = jax.jit(lambda k: wm.init(pcfg.wm, k))

        def make_args(abstract: bool):
            k = jax.random.PRNGKey(0)
            if abstract:
                state = jax.eval_shape(lambda kk: pwm.wm_pretrain_init(pcfg, kk), k)
            else:
                state = pwm.wm_pretrain_init(pcfg, k, init_wm(k))
            return (state, data, jax.random.PRNGKey(1))
    else:
        spec = RunSpec(tuple(range(n_tasks)), tuple(range(seeds)))
        fn = train.make_train_chunk(pcfg, args.epochs_per_call, config.alg.batch_size, config.alg.wm_batch_size, chunk)
        # One run's state, replicated over the run axis (identical starting params do not change the speed).
        # The WM init is jitted; the rest of pwm.init_state runs eagerly: on the XLA CPU backend of jax 0.10.2 a
        # jitted init of actor + critic (with or without vmap over runs, or with the WM) was seen to hang forever
        # in execution (0% CPU) on this 2-core machine; train.init_runs is eager too.
        init = functools.partial(_init_state, pcfg)
        init_wm = jax.jit(lambda k: wm.init(pcfg.wm, k))
        run_pos = jnp.asarray(spec.run_task_pos, jnp.int32)
        run_task = jnp.asarray(spec.run_task_ids, jnp.int32)

        def make_args(abstract: bool):
            keys = train.run_keys(spec)
            k = jax.random.PRNGKey(0)
            if abstract:
                one = jax.eval_shape(lambda kk: pwm.init_state(pcfg, kk), k)
                state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((runs,) + x.shape, x.dtype), one)
                state["key"] = jax.ShapeDtypeStruct(keys.shape, keys.dtype)
                state["nan_streak"] = jax.ShapeDtypeStruct((runs,), jnp.int32)
            else:
                one = init(k)
                state = jax.tree_util.tree_map(lambda x: jnp.repeat(x[None], runs, axis=0), one)
                state["key"] = keys
                state["nan_streak"] = jnp.zeros((runs,), jnp.int32)
            frozen = None
            if not pcfg.finetune_wm:
                frozen = jax.eval_shape(init_wm, k) if abstract else init_wm(k)
            return (state, frozen, data, run_pos, run_task)

    return Row(row, precision, mode, pcfg, fn, make_args, runs, flops)


_INIT_WM: dict = {}


def _init_state(pcfg, key):
    """pwm.init_state with the (large) WM init jitted and the rest eager (see plan_row)."""
    import jax

    from fmbpo_jax import pwm
    from fmbpo_jax import world_model as wm

    w = None
    if pcfg.finetune_wm:
        if pcfg.wm not in _INIT_WM:
            _INIT_WM[pcfg.wm] = jax.jit(functools.partial(wm.init, pcfg.wm))
        w = _INIT_WM[pcfg.wm](jax.random.split(key, 3)[2])
    return pwm.init_state(pcfg, key, w)


def lower_row(r: Row) -> None:
    import jax

    t0 = time.perf_counter()
    with jax.default_matmul_precision(PRECISIONS[r.precision]):
        r.lowered = r.fn.lower(*r.make_args(True))
    r.row["lower_s"] = time.perf_counter() - t0


def compile_row(r: Row) -> None:
    t0 = time.perf_counter()
    r.compiled = r.lowered.compile()
    r.row["compile_s"] = r.row.get("lower_s", 0.0) + time.perf_counter() - t0
    r.lowered = None
    from fmbpo_jax.train import program_bytes

    pb = program_bytes(r.compiled)
    r.row["program_mem_gb"] = pb / 2**30 if pb else "n/a"


def execute_row(r: Row, args, peaks: dict) -> None:
    """Warm-up call, then timed samples (each `calls_per_sample` back-to-back calls, synchronised at the end)."""
    import jax

    row = r.row
    peak = peaks[r.precision]
    if hasattr(os, "getloadavg"):
        row["loadavg_1m_before"] = round(os.getloadavg()[0], 2)
    args_real = r.make_args(False)
    state, rest = args_real[0], args_real[1:]
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state, out = r.compiled(state, *rest)
    jax.block_until_ready((state, out))
    warm = time.perf_counter() - t0
    k = max(1, math.ceil(args.min_call_seconds / max(warm, 1e-6))) if args.min_call_seconds else 1
    times = []
    for _ in range(args.timed_calls):
        t0 = time.perf_counter()
        for _ in range(k):
            state, out = r.compiled(state, *rest)
        jax.block_until_ready((state, out))
        times.append((time.perf_counter() - t0) / k)
    if args.profile:
        tag = f"{row['variant']}_{row['size']}_T{row['tasks']}_{row['precision']}".replace("/", "_")
        row["profile_dir"] = os.path.join(args.profile, tag)
        row["profile_top_ops"] = profile_call(r, state, rest, row["profile_dir"])
    del state, out, rest, args_real
    per_epoch = [t / args.epochs_per_call for t in times]
    med, mn = statistics.median(per_epoch), min(per_epoch)
    needed, naive = r.flops["needed"] * r.runs, r.flops["naive"] * r.runs
    row.update(warmup_s=warm, calls_per_sample=k, call_s=times, median_s_epoch=med, min_s_epoch=mn,
               s_per_task_epoch=med / r.runs, task_epochs_s=r.runs / med, gflop_epoch=needed / 1e9,
               gflop_naive_epoch=naive / 1e9,
               gflop_parts_per_run={p: {kk: vv / 1e9 for kk, vv in v.items()} for p, v in r.flops["parts"].items()},
               achieved_gflops=needed / med / 1e9, naive_equiv_gflops=naive / med / 1e9,
               peak_gflops=peak["best_flops"] / 1e9, mfu=needed / med / peak["best_flops"])
    from fmbpo_jax.train import device_memory_stats

    ms = device_memory_stats()
    row["peak_mem_gb"] = ms["peak_bytes_in_use"] / 2**30 if ms and "peak_bytes_in_use" in ms else "n/a"
    if hasattr(os, "getloadavg"):
        row["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    standard = (row["batch_size"] == 512 and row["horizon"] == 16 and args.preset == "reference"
                and r.pcfg.critic_iterations == 8 and r.mode == "policy" and not args.wm_updates)
    if standard:
        if jax.default_backend() == "cpu" and (row["size"], row["variant"]) in REF_CPU_S_EPOCH and r.runs == 1:
            row["ref_s_epoch"] = REF_CPU_S_EPOCH[(row["size"], row["variant"])]
            row["ref_kind"] = "reference on this CPU class (torch MKL, 2 threads): s/epoch, 1 task"
            row["speedup_vs_ref"] = row["ref_s_epoch"] / med
        elif jax.default_backend() == "gpu" and row["size"] == "48M" and row["variant"] in REF_GPU_S_TASK_EPOCH:
            row["ref_s_epoch"] = REF_GPU_S_TASK_EPOCH[row["variant"]]
            row["ref_kind"] = "reference H100/H200 recorded s per task-epoch (wall clock incl. data + eval)"
            row["speedup_vs_ref"] = row["ref_s_epoch"] / row["s_per_task_epoch"]


# Trace events of the runtime itself (executor, dispatch, compile), not of the program's ops.
_RUNTIME_EVENT = ("Thunk", "Execute", "Pjit", "pjit", "ispatch", "Await", "Compile", "compile", "$")


def summarize_trace(events: Sequence[dict], hlo_text: str, top: int = 20) -> list[dict]:
    """The program's ops that took the most time in a profiler trace, with the source op they came from.

    events: Chrome/Perfetto trace events ('ph' == 'X' complete events with 'name' and 'dur' in microseconds);
    hlo_text: the compiled program (`compiled.as_text()`), whose `metadata={op_name=...}` names the JAX op.
    Returns [{'op', 'ms', 'calls', 'shape', 'source'}] by total time. Ops that run asynchronously on other
    threads (e.g. Eigen dots on CPU) show only their dispatch, so read it together with the wall time.
    """
    import collections
    import re

    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or any(t in name for t in _RUNTIME_EVENT):
            continue
        total[name] += float(e.get("dur", 0.0))
        calls[name] += 1
    out = []
    for name, us in total.most_common(top):
        m = re.search(r"%" + re.escape(name) + r" = (\S+) [^\n]*?op_name=\"([^\"]*)\"", hlo_text)
        out.append({"op": name, "ms": us / 1e3, "calls": calls[name], "shape": m.group(1) if m else "",
                    "source": m.group(2) if m else ""})
    return out


def profile_call(r: Row, state, rest, out_dir: str, top: int = 20) -> list[dict]:
    """Trace one call of the row's compiled program into out_dir; returns and writes its top ops."""
    import glob
    import gzip

    import jax

    os.makedirs(out_dir, exist_ok=True)
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # Python frames would fill the trace's event budget
    jax.profiler.start_trace(out_dir, create_perfetto_trace=True, profiler_options=opts)
    try:
        jax.block_until_ready(r.compiled(state, *rest))
    finally:
        jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not traces:
        return []
    with gzip.open(traces[-1]) as f:
        ev = json.load(f)
    hlo = r.compiled.as_text()
    with open(os.path.join(out_dir, "program.hlo.txt"), "w") as f:  # to map a GPU trace's kernels to ops offline
        f.write(hlo)
    ops = summarize_trace(ev["traceEvents"] if isinstance(ev, dict) else ev, hlo, top)
    with open(os.path.join(out_dir, "top_ops.txt"), "w") as f:
        f.write("ms\tcalls\top\tshape\tsource\n")
        f.writelines(f"{o['ms']:.2f}\t{o['calls']}\t{o['op']}\t{o['shape']}\t{o['source']}\n" for o in ops)
    return ops


def breakdown(r: Row, args) -> dict:
    """Seconds per part of one epoch of ONE run, each part jitted alone on random inputs (no vmap, no scan over epochs).

    Parts: 'wm' (the WM step(s), fine-tuning only), 'actor_step' (actor loss value+grad through the H-step
    rollout, and the Adam step), 'critic_steps' (the critic_iterations x critic_batches steps). Shows where an
    epoch's time goes; the sum can differ from the row's epoch time (no cross-part fusion, no sampling).
    """
    import jax
    import jax.numpy as jnp

    from fmbpo_jax import pwm

    if r.mode != "policy":
        return {}
    cfg, B, H = r.pcfg, r.row["batch_size"], r.pcfg.horizon
    O, A, L = cfg.wm.obs_dim, cfg.wm.action_dim, cfg.wm.latent_dim
    k = jax.random.split(jax.random.PRNGKey(3), 6)
    state = _init_state(dataclasses.replace(cfg, finetune_wm=True), k[0])
    obs = jax.random.uniform(k[1], (H + 1, B, O), minval=-1, maxval=1)
    act = jax.random.uniform(k[2], (H, B, A), minval=-1, maxval=1)
    rew = jax.random.uniform(k[3], (H, B))
    task = jnp.asarray(0, jnp.int32)
    lr = jnp.asarray(1e-4, jnp.float32)
    z = jax.random.uniform(k[4], (H, B, L))
    y = jax.random.uniform(k[5], (H, B))
    fns = {}  # name -> (fn, args); every array is an argument (closed-over constants would be constant-folded)
    if cfg.finetune_wm:
        if cfg.wm_updates == "iterations":
            Bw = min(B, 256)
            fns["wm"] = (jax.jit(lambda p, o, ob, ac, rw, kk: jax.lax.scan(
                lambda c, _: (pwm.wm_update(cfg, c[0], c[1], ob[:, :Bw], ac[:, :Bw], rw[:, :Bw], task, kk, lr)[:2], None),
                (p, o), None, length=cfg.wm_iterations)[0]), (state["wm"], state["wm_opt"], obs, act, rew, k[1]))
        else:
            fns["wm"] = (jax.jit(lambda p, o, ob, ac, rw, kk: pwm.wm_update(cfg, p, o, ob, ac, rw, task, kk, lr)[:2]),
                         (state["wm"], state["wm_opt"], obs, act, rew, k[1]))

    def actor_step(ap, ao, wp, cp, rms, ob0, kk):
        (loss, aux), g = jax.value_and_grad(lambda p: pwm.actor_loss(cfg, p, wp, cp, rms, ob0, task, kk), has_aux=True)(ap)
        ap, ao, _ = pwm.adam_step(ap, ao, g, lr, pwm.ACTOR_ADAM, cfg.actor_grad_clip)
        return ap, ao, aux["states"], aux["rewards"], aux["next_values"]

    fns["actor_step"] = (jax.jit(actor_step), (state["actor"], state["actor_opt"], state["wm"], state["critic"],
                                               state["ret_rms"], obs[0], k[2]))
    fns["critic_steps"] = (jax.jit(lambda cp, co, zz, yy, kk: pwm.critic_update(cfg, cp, co, zz, yy, lr, kk)[:2]),
                           (state["critic"], state["critic_opt"], z, y, k[3]))
    flops = r.flops["parts"]
    out = {}
    with jax.default_matmul_precision(PRECISIONS[r.precision]):
        for name, (fn, a) in fns.items():
            jax.block_until_ready(fn(*a))  # compile + warm-up
            ts = []
            for _ in range(max(2, args.timed_calls)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*a))
                ts.append(time.perf_counter() - t0)
            s = statistics.median(ts)
            gf = flops.get(name, {}).get("needed", 0.0) / 1e9
            out[name] = {"s": s, "gflop": gf, "gflops": gf / s if s else 0.0}
    return out


def run_rows(rows: list[Row], args, peaks: dict, t_start: float, log: Callable, on_row: Callable) -> None:
    """Lower and compile (in parallel threads when --compile-workers > 1), then execute one row at a time, in
    the given order; with --pipeline a row is executed as soon as its own program is ready."""
    def over_budget():
        return args.max_seconds and time.perf_counter() - t_start > args.max_seconds

    def elapsed() -> str:
        return f"[{time.perf_counter() - t_start:6.0f} s]"

    def prepare(r: Row) -> None:
        try:
            lower_row(r)
            compile_row(r)
            # printed before the timing, so a run killed in a long compile still shows which programs finished
            log(f"    {elapsed()} compiled in {r.row['compile_s']:.1f} s")
        except Exception as e:  # noqa: BLE001 - one failing row (e.g. OOM) must not lose the others
            r.row["error"] = _error(e)
            r.lowered = r.compiled = None

    pending: dict = {}  # --pipeline: id(row) -> the future of its compile
    if args.compile_workers > 1:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        log(f"compiling {len(rows)} programs in {args.compile_workers} threads"
            + (" (timing each as soon as it is ready)" if args.pipeline else ""))
        ex = ThreadPoolExecutor(args.compile_workers)
        futures = {}
        if args.pipeline:
            # the workers lower too (one at a time: tracing holds the GIL), so the first row is timed as soon as
            # its own program is ready instead of after every row has been traced
            trace_lock = threading.Lock()

            def lower_and_compile(r: Row) -> None:
                with trace_lock:
                    lower_row(r)
                compile_row(r)

            futures = {ex.submit(lower_and_compile, r): r for r in rows}
        else:
            for r in rows:  # lower in this thread; XLA compiles concurrently, each as soon as it is lowered
                try:
                    lower_row(r)
                    futures[ex.submit(compile_row, r)] = r
                except Exception as e:  # noqa: BLE001
                    r.row["error"] = _error(e)

        def collect(f) -> None:
            r = futures[f]
            try:
                f.result()
                log(f"    {elapsed()} compiled {_label(r.row)} in {r.row['compile_s']:.1f} s")
            except Exception as e:  # noqa: BLE001
                r.row["error"] = _error(e)
                r.lowered = None

        if args.pipeline:  # row -> its compile, waited for just before the row is timed
            pending = {id(r): f for f, r in futures.items()}
        else:  # all compiled before any timing: nothing else runs while a row is timed
            for f in as_completed(futures):  # logged as they finish: a long compile shows up while it runs
                collect(f)
        for r in rows:
            r.row["compiled_concurrently"] = args.compile_workers
            if id(r) in pending:
                r.row["timed_while_compiling"] = True
    for r in rows:
        if id(r) in pending:
            if over_budget():  # do not wait for a program that will not be timed
                pending[id(r)].cancel()
            else:
                collect(pending[id(r)])
        row = r.row
        if "error" not in row and over_budget():
            row["error"] = f"skipped: --max-seconds {args.max_seconds:g} reached"
        if "error" not in row:
            log(f"... {elapsed()} {_label(row)}")
            try:
                if r.compiled is None:
                    prepare(r)
                if "error" not in row:
                    execute_row(r, args, peaks)

            except Exception as e:  # noqa: BLE001
                row["error"] = _error(e)
            r.compiled = None
        if "error" in row:
            log(f"    {row['variant']} T={row['tasks']} {row['precision']}: ERROR {row['error']}")
        else:
            log(f"    compile {row['compile_s']:.1f} s, median {row['median_s_epoch']:.4g} s/{row['unit']}, "
                f"min {row['min_s_epoch']:.4g}, {row['achieved_gflops']:.0f} GFLOP/s (MFU {row['mfu']:.2f})")
            for o in row.get("profile_top_ops", [])[:8]:
                log(f"      {o['ms']:9.1f} ms {o['calls']:5d}x {o['op'][:28]:28s} {o['shape'][:28]:28s} {o['source'][-70:]}")
            if args.breakdown and r.mode == "policy":
                try:
                    row["breakdown"] = breakdown(r, args)
                    log("    breakdown (1 run, parts jitted alone): " + ", ".join(
                        f"{k} {v['s']:.3g} s ({v['gflops']:.0f} GFLOP/s)" for k, v in row["breakdown"].items()))
                except Exception as e:  # noqa: BLE001
                    row["breakdown"] = {"error": _error(e)}
        on_row(row)
    if args.compile_workers > 1:
        ex.shutdown(wait=False, cancel_futures=True)  # compiles of skipped rows that have not started


def vmap_check(args, variant: str, size: str, tasks: int, precision: str, multi_row: dict | None, peaks: dict,
               t_start: float, log: Callable) -> dict:
    """N tasks in one program vs N single-task programs run one after another (one call each, after a warm-up)."""
    import jax
    import jax.numpy as jnp

    from fmbpo_jax import run_config

    row = _row_base(args, variant, size, tasks, precision)
    row["kind"] = "vmap-check"
    if multi_row is None:
        r = plan_row(args, variant, size, tasks, precision)
        run_rows([r], args, peaks, t_start, log, lambda _: None)
        multi_row = r.row
    if "error" in multi_row:
        row["error"] = "multi-task row failed: " + multi_row["error"]
        return row
    try:
        horizon = run_config.pwm_config(build_config(size, variant, args.preset, args.wm_updates, args.batch_size,
                                                     args.horizon, args.critic_iterations)).horizon
        data = random_window_data(tasks, horizon)
        per_task = [(_take_task(data, i), jnp.full((args.seeds,), i, jnp.int32)) for i in range(tasks)]
        jax.block_until_ready(per_task)
        r = plan_row(args, variant, size, tasks, precision, data=per_task[0][0], single_task=True)
        lower_row(r)
        compile_row(r)
        state, frozen, _, run_pos, _ = r.make_args(False)
        state, out = r.compiled(state, frozen, per_task[0][0], run_pos, per_task[0][1])  # warm-up
        jax.block_until_ready((state, out))
        seq = 0.0
        for d_i, task_i in per_task:  # N single-task programs, one after another (the same executable)
            t0 = time.perf_counter()
            state, out = r.compiled(state, frozen, d_i, run_pos, task_i)
            jax.block_until_ready((state, out))
            seq += time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        row["error"] = _error(e)
        return row
    seq_epoch = seq / args.epochs_per_call
    row.update(multi_s_epoch=multi_row["median_s_epoch"], sequential_s_epoch=seq_epoch, single_compile_s=r.row["compile_s"],
               ratio=multi_row["median_s_epoch"] / seq_epoch, target="<= 0.5")
    return row


# ------------------------------------------------------------------------------------------------ output


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def format_rows(rows: list[dict]) -> str:
    bench = [r for r in rows if r.get("kind") != "vmap-check"]
    out = []
    if bench:
        cols = [(k, h) for k, h in TABLE_COLS if any(k in r for r in bench)]
        vals = [[("ERROR: " + r["error"]) if k == "compile_s" and "error" in r else _fmt(r.get(k, "")) for k, _ in cols]
                for r in bench]
        widths = [max(len(h), *(len(v[i]) for v in vals)) for i, (_, h) in enumerate(cols)]
        out.append("| " + " | ".join(h.ljust(w) for (_, h), w in zip(cols, widths)) + " |")
        out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for v in vals:
            out.append("| " + " | ".join(x.ljust(w) for x, w in zip(v, widths)) + " |")
    for r in rows:
        if r.get("kind") == "vmap-check":
            if "error" in r:
                out.append(f"vmap-check {r['variant']} {r['size']} T={r['tasks']} {r['precision']}: ERROR {r['error']}")
            else:
                out.append(f"vmap-check {r['variant']} {r['size']} {r['precision']}: {r['tasks']} tasks in one program "
                           f"{r['multi_s_epoch']:.3f} s/epoch vs {r['tasks']} single-task programs one after another "
                           f"{r['sequential_s_epoch']:.3f} s/epoch: ratio {r['ratio']:.3f} (target <= 0.5)")
    return "\n".join(out)


def derived_vmap_ratios(rows: list[dict]) -> list[dict]:
    """From rows of the same variant/precision at T=1 and T=N: N-task time / (N x 1-task time)."""
    out = []
    ok = [r for r in rows if r.get("kind") != "vmap-check" and "error" not in r and "median_s_epoch" in r]
    for r in ok:
        if r["tasks"] <= 1 or r["mode"] != "policy":
            continue
        for s in ok:
            if (s["tasks"] == 1 and s["variant"] == r["variant"] and s["precision"] == r["precision"]
                    and s["size"] == r["size"] and s["seeds"] == r["seeds"]):
                out.append({"variant": r["variant"], "size": r["size"], "precision": r["precision"], "tasks": r["tasks"],
                            "ratio": r["median_s_epoch"] / (r["tasks"] * s["median_s_epoch"])})
    return out


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows, "derived_vmap_ratios": derived_vmap_ratios(rows)}, f, indent=1, default=str)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="variants: " + ", ".join(VARIANTS) + "; precisions: " + ", ".join(PRECISIONS))
    p.add_argument("--variant", default="baseline-frozen",
                   help="comma-separated: " + ", ".join(VARIANTS) + " ('main' = the four reference variants, 'all')")
    p.add_argument("--size", default="5M", help="5M | 48M | small | tiny | a config .py file with get_config(); comma-separated")
    p.add_argument("--tasks", default="1", help="tasks in one program (1..30); comma-separated for several rows, e.g. 1,30")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--precision", default="fp32-highest", help="comma-separated: " + ", ".join(PRECISIONS))
    p.add_argument("--remat", choices=("on", "off"), default="off",
                   help="rematerialisation of the rollout scans (--config.remat): activation memory of one step")
    p.add_argument("--epochs-per-call", type=int, default=2)
    p.add_argument("--timed-calls", type=int, default=3)
    p.add_argument("--json", default="", help="write all rows and the run's metadata to this file (after every row)")
    p.add_argument("--vmap-check", action="store_true",
                   help="also time N single-task programs one after another vs the N-task program (N = largest --tasks)")
    p.add_argument("--preset", choices=("reference", "fixed"), default="reference",
                   help="per-epoch work: reference (1 WM step on the policy batch) or fixed (wm_iterations x wm_batch_size)")
    p.add_argument("--wm-updates", choices=("policy_batch", "iterations"), default=None, help="override the preset's WM steps per epoch")
    p.add_argument("--batch-size", type=int, default=0, help="override alg.batch_size (pretraining uses 2x, as 1024 vs 512)")
    p.add_argument("--horizon", type=int, default=0, help="override alg.horizon")
    p.add_argument("--critic-iterations", type=int, default=0, help="override alg.critic_iterations")
    p.add_argument("--task-chunk", type=int, default=0, help="lax.map the run axis in groups of this size (memory); 0 = vmap all")
    p.add_argument("--finetune-task-chunk", type=int, default=0, help="--task-chunk for the WM fine-tuning variants only")
    p.add_argument("--min-call-seconds", type=float, default=0.0,
                   help="repeat the chunk back-to-back within one timed sample until about this long (short GPU calls)")
    p.add_argument("--compile-workers", type=int, default=1,
                   help=">1: compile the rows concurrently in this many threads, then time them one by one")
    p.add_argument("--pipeline", action="store_true",
                   help="with --compile-workers > 1: time each row as soon as its program is ready while later rows "
                        "still compile (for GPUs where compiling does not use the device, e.g. with "
                        "--xla_gpu_autotune_level=0; never on CPU, where compiling takes the cores being timed)")
    p.add_argument("--peak-shape", default="", help="M,K,N of the peak matmul (default 512,1792,1792 on CPU, 8192^3 on GPU)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="skip rows not started within this many seconds (0 = no limit)")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="trace one extra call per row with jax.profiler into DIR/<row>/ and list its slowest ops")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the epoch's parts (WM step, actor step, critic steps) of one run, each jitted alone")
    p.add_argument("--rows", default="",
                   help="explicit rows in this order, VARIANT:TASKS:PRECISION[:SIZE[:CHUNK]], comma-separated (replaces the "
                        "--variant x --size x --tasks x --precision product; SIZE defaults to the first --size, empty "
                        "allowed; CHUNK is this row's --task-chunk, e.g. 3 for 48M full flow x 30 tasks on an 80 GB GPU); "
                        "puts the rows that matter first when a time limit may cut the run short")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.variant == "main":
        args.variant = ",".join(MAIN_VARIANTS)
    elif args.variant == "all":
        args.variant = ",".join(VARIANTS)
    args.variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variant {v!r}: known {', '.join(VARIANTS)}")
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    for x in args.precisions:
        if x not in PRECISIONS:
            p.error(f"--precision {x!r}: use {', '.join(PRECISIONS)}")
    args.sizes = [s.strip() for s in args.size.split(",") if s.strip()]
    try:
        args.task_counts = [int(t) for t in args.tasks.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tasks {args.tasks!r}: integers 1..30, comma-separated")
    for t in args.task_counts:
        if not 1 <= t <= 30:
            p.error(f"--tasks {t}: must be 1..30 (MT30)")
    args.row_specs = []
    args.row_chunks = {}
    for item in (x.strip() for x in args.rows.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (3, 4, 5):
            p.error(f"--rows item {item!r}: VARIANT:TASKS:PRECISION[:SIZE[:CHUNK]]")
        v, t, x = parts[:3]
        size = parts[3] if len(parts) >= 4 and parts[3] else args.sizes[0]
        if v not in VARIANTS:
            p.error(f"--rows item {item!r}: variant {v!r} unknown (known {', '.join(VARIANTS)})")
        if x not in PRECISIONS:
            p.error(f"--rows item {item!r}: precision {x!r} unknown (use {', '.join(PRECISIONS)})")
        if not t.isdigit() or not 1 <= int(t) <= 30:
            p.error(f"--rows item {item!r}: tasks {t!r} must be 1..30 (MT30)")
        args.row_specs.append((v, size, int(t), x))
        if len(parts) == 5:
            if not parts[4].isdigit():
                p.error(f"--rows item {item!r}: CHUNK {parts[4]!r} must be an integer >= 0 (runs per lax.map step; 0 = vmap all)")
            args.row_chunks[(v, size, int(t), x)] = int(parts[4])
    if args.row_specs:  # the peaks and the vmap check follow the rows actually asked for
        args.precisions = list(dict.fromkeys(x for _, _, _, x in args.row_specs))
        args.variants = list(dict.fromkeys(v for v, _, _, _ in args.row_specs))
        args.sizes = list(dict.fromkeys(sz for _, sz, _, _ in args.row_specs))
        args.task_counts = sorted({t for _, _, t, _ in args.row_specs})
    if args.seeds < 1 or args.epochs_per_call < 1 or args.timed_calls < 1:
        p.error("--seeds, --epochs-per-call and --timed-calls must be >= 1")
    if args.peak_shape:
        try:
            args.peak_shape = tuple(int(x) for x in args.peak_shape.split(","))
            assert len(args.peak_shape) == 3
        except (ValueError, AssertionError):
            p.error("--peak-shape: M,K,N")
    return args


def row_plan(args) -> list[tuple[str, str, int, str]]:
    """(variant, size, tasks, precision) of every row, in the order they run: --rows as given, else
    precision-major over the --precision x --size x --tasks x --variant product."""
    if args.row_specs:
        return list(args.row_specs)
    return [(v, s, t, p) for p in args.precisions for s in args.sizes for t in args.task_counts for v in args.variants]


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns {'meta', 'rows'} (also written to --json)."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    if args.profile and "jax" not in sys.modules and "xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        # XLA:CPU emits per-op trace events only with this flag, read when the backend starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    if args.quiet:
        log = lambda *a, **k: None  # noqa: E731
    t_start = time.perf_counter()
    meta = device_info()
    meta.update(argv=list(sys.argv[1:] if argv is None else argv), preset=args.preset,
                per_epoch_work=("reference: one WM step on the policy batch when fine-tuning, actor step, "
                                "critic_iterations x critic_batches critic steps" if args.preset == "reference" and not args.wm_updates
                                else f"preset {args.preset}, wm_updates={args.wm_updates or 'preset'}"),
                flops_formula="matmuls only: forward 2*rows*in*out per layer; input grad and weight grad the same each "
                              "(backward = 2x forward when both are needed); 'needed' vs 'naive' (reference autograd), see bench.epoch_flops",
                remat=args.remat,
                note="timings on a shared machine are noisy; see loadavg fields" if meta["backend"] == "cpu" else "")
    shape = args.peak_shape or default_peak_shape()
    peaks = {}
    for prec in args.precisions:
        # bf16 rows run bf16 matmul operands (nets.bf16_matmul): their peak is a bf16-operand matmul
        dtype = "bfloat16" if prec == "bf16" else "float32"
        peaks[prec] = measure_peak(prec, shape, dtype=dtype)
        log(f"peak matmul {shape[0]}x{shape[1]}x{shape[2]} {dtype} operands, precision {prec}: "
            f"{peaks[prec]['best_flops'] / 1e9:.0f} GFLOP/s best, {peaks[prec]['median_flops'] / 1e9:.0f} median")
    meta["peak"] = peaks
    rows: list[dict] = []  # every planned row from the start ('status': pending -> done | error), in plan order
    planned = []
    for v, s, t, p in row_plan(args):
        try:
            r = plan_row(args, v, s, t, p)
            planned.append(r)
            rows.append(r.row)
        except Exception as e:  # noqa: BLE001
            row = _row_base(args, v, s, t, p)
            row["error"] = _error(e)
            rows.append(row)
    for row in rows:
        row["status"] = "error" if "error" in row else "pending"
    write_json(args.json, meta, rows)

    def on_row(row):
        row["status"] = "error" if "error" in row else "done"
        write_json(args.json, meta, rows)

    run_rows(planned, args, peaks, t_start, log, on_row)
    planned.clear()
    if args.vmap_check:
        n = max(args.task_counts)
        v = next((v for v in args.variants if VARIANTS[v].get("mode") != "pretrain"), None)
        for p in args.precisions if v else []:
            for s in args.sizes:
                label = _row_base(args, v, s, n, p)["size"]
                multi = next((r for r in rows if r["variant"] == v and r["tasks"] == n and r["precision"] == p
                              and r["size"] == label and r.get("status") == "done" and r.get("kind") != "vmap-check"), None)
                log(f"... vmap-check {v} size={s} tasks={n} precision={p}")
                vrow = vmap_check(args, v, s, n, p, multi, peaks, t_start, log)
                vrow["status"] = "error" if "error" in vrow else "done"
                rows.append(vrow)
                write_json(args.json, meta, rows)
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = list(os.getloadavg())
    meta["total_s"] = time.perf_counter() - t_start
    write_json(args.json, meta, rows)
    log("")
    log(f"{meta['device']} ({meta['backend']}), jax {meta['jax']}, preset {args.preset}; {meta['per_epoch_work']}")
    log(format_rows(rows))
    for d in derived_vmap_ratios(rows):
        log(f"vmap ratio {d['variant']} {d['size']} {d['precision']}: T={d['tasks']} program / ({d['tasks']} x T=1) = {d['ratio']:.3f}")
    return {"meta": meta, "rows": rows}


def _leftover_compiles(threads=None) -> bool:
    """True while a compile worker still runs (a row skipped by --max-seconds whose compile had started):
    a live non-daemon thread other than the main one (`threads`: default all of this process's)."""
    threads = threading.enumerate() if threads is None else threads
    return any(t.is_alive() and not t.daemon for t in threads if t is not threading.main_thread())


if __name__ == "__main__":
    main()
    if _leftover_compiles():  # everything is written and printed: do not hold a (GPU) machine for unused programs
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
