"""Window-sampling benchmark: ``python -m fmbpo_jax.data.bench [--tasks 30 --episodes 40 ...]``.

Writes a synthetic store (tasks x episodes of 501 steps) to a temp dir and reports windows/s and
epochs/s (one epoch = tasks x batch windows of H+1 steps) for the device-resident sampler and for the
host memory-mapped sampler (raw gather, and the full prefetch pipeline incl. ``device_put``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from fmbpo_jax.data.sampler import DeviceSampler, HostSampler
from fmbpo_jax.data.synthetic import write_synthetic_store


def _timeit(fn, min_time: float, warmup: int = 1) -> tuple[float, int, float]:
    """(wall seconds, calls, process CPU seconds) over at least ``min_time`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    n = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt, n, time.process_time() - c0


def run(tasks=30, episodes=40, batch_size=512, horizon=16, chunk_epochs=10, episode_length=501,
        min_time=3.0, num_threads=(1, 2), modes=("device", "host"), log=print) -> dict:
    tmp = tempfile.mkdtemp(prefix="fmbpo_bench_")
    res = {"tasks": tasks, "episodes_per_task": episodes, "batch_size": batch_size, "horizon": horizon,
           "chunk_epochs": chunk_epochs, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
           "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    win_per_epoch = tasks * batch_size
    try:
        t0 = time.perf_counter()
        store = write_synthetic_store(os.path.join(tmp, "store"), [episodes] * tasks, episode_length=episode_length)
        res["store_write_s"] = time.perf_counter() - t0
        if "device" in modes:
            ds = DeviceSampler(store, batch_size=batch_size, horizon=horizon, chunk_epochs=chunk_epochs)
            dt, n, cpu = _timeit(lambda: jax.block_until_ready(ds.next_chunk()), min_time)
            eps = n * chunk_epochs / dt
            res["device_epochs_per_s"] = eps
            res["device_cpu_ms_per_epoch"] = 1e3 * cpu / (n * chunk_epochs)
            log(f"device-resident ({jax.default_backend()}): {eps:8.1f} epochs/s  {eps * win_per_epoch / 1e6:6.2f} M windows/s"
                f"  ({res['device_cpu_ms_per_epoch']:.2f} CPU-ms/epoch)")
        if "host" in modes:
            hs = HostSampler(store, batch_size=batch_size, horizon=horizon, chunk_epochs=chunk_epochs, start=False)
            rng = np.random.default_rng(0)
            buf = hs._alloc(chunk_epochs)
            dt, n, cpu = _timeit(lambda: hs.sample_host(rng, out=buf), min_time)
            eps = n * chunk_epochs / dt
            res["host_gather_epochs_per_s"] = eps
            res["host_gather_cpu_ms_per_epoch"] = 1e3 * cpu / (n * chunk_epochs)
            log(f"host gather (1 thread, numpy):  {eps:8.1f} epochs/s  {eps * win_per_epoch / 1e6:6.2f} M windows/s"
                f"  ({res['host_gather_cpu_ms_per_epoch']:.2f} CPU-ms/epoch = {1e3 / res['host_gather_cpu_ms_per_epoch']:.0f}"
                " epochs per CPU-second)")
            for nt in num_threads:
                with HostSampler(store, batch_size=batch_size, horizon=horizon, chunk_epochs=chunk_epochs,
                                 num_threads=nt, prefetch=2) as hs:
                    dt, n, cpu = _timeit(lambda: jax.block_until_ready(hs.next_chunk()), min_time, warmup=4 * nt + 2)
                eps = n * chunk_epochs / dt
                res[f"host_pipeline_{nt}thr_epochs_per_s"] = eps
                res[f"host_pipeline_{nt}thr_cpu_ms_per_epoch"] = 1e3 * cpu / (n * chunk_epochs)
                log(f"host pipeline ({nt} thread(s), incl. device_put): {eps:8.1f} epochs/s  "
                    f"{eps * win_per_epoch / 1e6:6.2f} M windows/s  ({1e3 * cpu / (n * chunk_epochs):.2f} CPU-ms/epoch)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(os, "getloadavg"):
        res["loadavg_1m_end"] = os.getloadavg()[0]
        log(f"load average (1 min) {res['loadavg_1m']:.2f} -> {res['loadavg_1m_end']:.2f} on {os.cpu_count()} CPUs "
            "(other processes share the cores: wall-clock rates are lower bounds)")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.data.bench", description=__doc__)
    p.add_argument("--tasks", type=int, default=30)
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--chunk-epochs", type=int, default=10)
    p.add_argument("--min-time", type=float, default=3.0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=["device", "host"], choices=["device", "host"])
    p.add_argument("--json", action="store_true", help="print the result dict as JSON at the end")
    a = p.parse_args(argv)
    res = run(a.tasks, a.episodes, a.batch_size, a.horizon, a.chunk_epochs, min_time=a.min_time,
              num_threads=a.threads, modes=a.modes)
    if a.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
