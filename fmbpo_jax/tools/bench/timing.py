"""Timing one compiled row: a warm-up call, then timed samples, and the fields derived from them.

``median_s_epoch`` / ``min_s_epoch`` = call time / epochs per call, every call synchronised with
``jax.block_until_ready``; compile time is never inside them. ``--min-call-seconds`` repeats short calls
back-to-back inside one sample. Achieved FLOP/s = needed FLOPs (tools.flops) / median epoch time; ``mfu`` =
achieved / the peak matmul rate measured in the same process and precision.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import jax

from fmbpo_jax.training import memory
from fmbpo_jax.tools.bench.catalog import reference_speed
from fmbpo_jax.tools.bench.plan import Row
from fmbpo_jax.tools.bench.profile import profile_call


def _loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def time_calls(r: Row, state, rest, timed_calls: int, min_call_seconds: float) -> tuple[object, list[float], float, int]:
    """(state, seconds per call of each sample, warm-up seconds, calls per sample) after one untimed warm-up."""
    t0 = time.perf_counter()
    state, out = r.compiled(state, *rest)
    jax.block_until_ready((state, out))
    warm = time.perf_counter() - t0
    k = max(1, math.ceil(min_call_seconds / max(warm, 1e-6))) if min_call_seconds else 1
    times = []
    for _ in range(timed_calls):
        t0 = time.perf_counter()
        for _ in range(k):
            state, out = r.compiled(state, *rest)
        jax.block_until_ready((state, out))
        times.append((time.perf_counter() - t0) / k)
    return state, times, warm, k


def speed_fields(r: Row, times: list[float], epochs_per_call: int, peak: dict) -> dict:
    """Epoch times, task-epochs/s, FLOPs (all runs) and FLOP rates of a row from its per-call times."""
    per_epoch = [t / epochs_per_call for t in times]
    med, mn = statistics.median(per_epoch), min(per_epoch)
    needed, naive = r.flops["needed"] * r.runs, r.flops["naive"] * r.runs
    return dict(call_s=times, median_s_epoch=med, min_s_epoch=mn, s_per_task_epoch=med / r.runs,
                task_epochs_s=r.runs / med, gflop_epoch=needed / 1e9, gflop_naive_epoch=naive / 1e9,
                gflop_parts_per_run={p: {kk: vv / 1e9 for kk, vv in v.items()} for p, v in r.flops["parts"].items()},
                achieved_gflops=needed / med / 1e9, naive_equiv_gflops=naive / med / 1e9,
                peak_gflops=peak["best_flops"] / 1e9, mfu=needed / med / peak["best_flops"])


def execute_row(r: Row, args, peaks: dict) -> None:
    """Warm-up call, timed samples, --profile trace, then the row's speed, memory and reference fields."""
    row = r.row
    if hasattr(os, "getloadavg"):
        row["loadavg_1m_before"] = _loadavg()
    args_real = r.make_args(False)
    state, rest = args_real[0], args_real[1:]
    jax.block_until_ready(state)
    state, times, warm, k = time_calls(r, state, rest, args.timed_calls, args.min_call_seconds)
    if args.profile:
        tag = f"{row['variant']}_{row['size']}_T{row['tasks']}_{row['precision']}".replace("/", "_")
        row["profile_dir"] = os.path.join(args.profile, tag)
        row["profile_top_ops"] = profile_call(r.compiled, state, rest, row["profile_dir"])
    del state, rest, args_real
    row.update(warmup_s=warm, calls_per_sample=k)
    row.update(speed_fields(r, times, args.epochs_per_call, peaks[r.precision]))
    ms = memory.device_memory_stats()
    row["peak_mem_gb"] = ms["peak_bytes_in_use"] / 2**30 if ms and "peak_bytes_in_use" in ms else "n/a"
    if hasattr(os, "getloadavg"):
        row["loadavg_1m_after"] = _loadavg()
    standard = (row["batch_size"] == 512 and row["horizon"] == 16 and args.preset == "reference"
                and r.pcfg.critic_iterations == 8 and r.mode == "policy" and not args.wm_updates)
    row.update(reference_speed(row, jax.default_backend(), standard, r.runs))
