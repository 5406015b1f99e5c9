"""Evaluation throughput: tasks x episodes x steps with a random linear policy, for several worker counts.

    python -m fmbpo_jax.envs bench                       # 30 tasks x 10 episodes x 500 steps, workers 1 and 2
    python -m fmbpo_jax.envs bench --workers 0 1 2 --episodes 2 --steps 100
    python -m fmbpo_jax.envs bench --raw                 # single-env agent steps/s per task, one process

An "env step" is one agent step = 2 dm_control control steps (action repeat 2). steps/cpu-s divides by the
CPU seconds the env workers actually got (robust to other load on the machine); steps/s by wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from fmbpo_jax.envs.env import make_env
from fmbpo_jax.envs.evaluate import Evaluator
from fmbpo_jax.envs.tasks import MAX_ACTION_DIM, MAX_OBS_DIM, MT30_TASKS


def linear_policy(params, obs, task_ids):
    """a = tanh(obs @ W[task] + b[task]): a per-task random linear policy, gathered by task id."""
    W = params["W"][task_ids]  # [N, 24, 6]
    b = params["b"][task_ids]  # [N, 6]
    return jnp.tanh(jnp.einsum("ni,nio->no", obs, W) + b)


def linear_params(seed: int = 0, scale: float = 0.3):
    rng = np.random.default_rng(seed)
    return {"W": (scale * rng.standard_normal((len(MT30_TASKS), MAX_OBS_DIM, MAX_ACTION_DIM))).astype(np.float32),
            "b": (scale * rng.standard_normal((len(MT30_TASKS), MAX_ACTION_DIM))).astype(np.float32)}


def bench_evaluator(tasks, episodes: int, steps: int, workers: int, seed: int = 0, repeats: int = 1) -> dict:
    params = linear_params(seed)
    t0 = time.perf_counter()
    ev = Evaluator(linear_policy, tasks, episodes=episodes, num_workers=workers, max_steps=steps)
    startup = time.perf_counter() - t0
    try:
        ev.warmup(params)  # jit compile outside the timed run
        runs = [ev.run(params, seed=seed) for _ in range(repeats)]
    finally:
        ev.close()
    wall = min(r.wall_time_s for r in runs)
    best = min(runs, key=lambda r: r.wall_time_s)
    env_steps = best.env_steps
    cores = max(workers, 1)
    return {"workers": workers, "tasks": len(best.task_names), "episodes": episodes, "steps": steps,
            "envs": len(best.task_names) * episodes, "env_steps": env_steps, "startup_s": round(startup, 2),
            "wall_s": round(wall, 2), "policy_s": round(best.policy_time_s, 2),
            "env_steps_per_s": round(env_steps / wall), "env_steps_per_s_per_worker": round(env_steps / wall / cores),
            "env_cpu_s": round(best.env_cpu_s, 2), "env_steps_per_cpu_s": round(env_steps / best.env_cpu_s),
            "mean_return": round(best.mean_return, 3)}


def bench_raw(tasks, steps: int = 500, seed: int = 0) -> list[dict]:
    """Agent steps/s of one env per task in this process (no policy, no IPC)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in tasks:
        t0 = time.perf_counter()
        env = make_env(t, seed)
        build = time.perf_counter() - t0
        actions = rng.uniform(-1, 1, (steps, MAX_ACTION_DIM)).astype(np.float32)
        t0 = time.perf_counter()
        env.reset()
        for a in actions:
            env.step(a)
        dt = time.perf_counter() - t0
        out.append({"task": env.task_name, "build_ms": round(build * 1e3, 1), "us_per_step": round(dt / steps * 1e6, 1),
                    "steps_per_s": round(steps / dt)})
    return out


def _print_raw(rows: list[dict], as_json: bool) -> None:
    for r in rows:
        print(json.dumps(r) if as_json else
              f"{r['task']:28s} {r['us_per_step']:8.1f} us/step {r['steps_per_s']:8d} steps/s  "
              f"build {r['build_ms']:.1f} ms")
    if not as_json:
        tot = sum(1e6 / r["steps_per_s"] for r in rows)
        print(f"mean over tasks: {tot / len(rows):.1f} us/agent step ({len(rows) * 1e6 / tot:.0f} steps/s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.envs bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="*", default=None, help="task names or ids (default: all 30)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (0 = in-process)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per worker count (best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="single-env steps/s per task instead")
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    args = p.parse_args(argv)
    tasks = args.tasks or MT30_TASKS
    if args.raw:
        _print_raw(bench_raw(tasks, args.steps, args.seed), args.json)
        return 0
    if not args.json:
        print(f"{len(tasks)} tasks x {args.episodes} episodes x {args.steps} agent steps, random linear policy")
        print(f"{'workers':>7s} {'startup_s':>9s} {'wall_s':>7s} {'policy_s':>8s} {'steps/s':>9s} {'per worker':>10s} "
              f"{'env_cpu_s':>9s} {'steps/cpu-s':>11s}")
    for w in args.workers:
        r = bench_evaluator(tasks, args.episodes, args.steps, w, args.seed, args.repeats)
        print(json.dumps(r) if args.json else
              f"{w:7d} {r['startup_s']:9.2f} {r['wall_s']:7.2f} {r['policy_s']:8.2f} {r['env_steps_per_s']:9d} "
              f"{r['env_steps_per_s_per_worker']:10d} {r['env_cpu_s']:9.2f} {r['env_steps_per_cpu_s']:11d}", flush=True)
    return 0
