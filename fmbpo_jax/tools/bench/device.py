"""The machine a bench runs on, and its matmul peak: one large matmul timed under the rows' precision."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from fmbpo_jax.tools.bench.catalog import PRECISIONS


def device_info() -> dict:
    dev = jax.devices()[0]
    info = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "host": platform.node(), "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def default_peak_shape() -> tuple[int, int, int]:
    """512x1792x1792 (the 48M layer shape) on CPU, 8192^3 on an accelerator."""
    return (512, 1792, 1792) if jax.default_backend() == "cpu" else (8192, 8192, 8192)


def measure_peak(precision: str, shape: tuple[int, int, int], reps: int = 10, dtype: str = "float32") -> dict:
    """Best and median FLOP/s of an (M,K) @ (K,N) matmul under jax.default_matmul_precision(precision)."""
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


def measure_peaks(precisions, shape: tuple[int, int, int], log: Callable[[str], None]) -> dict:
    """{precision: measure_peak(...)}; bf16 rows run bf16 matmul operands (nets.bf16_matmul), so their peak does."""
    peaks = {}
    for prec in precisions:
        dtype = "bfloat16" if prec == "bf16" else "float32"
        peaks[prec] = measure_peak(prec, shape, dtype=dtype)
        log(f"peak matmul {shape[0]}x{shape[1]}x{shape[2]} {dtype} operands, precision {prec}: "
            f"{peaks[prec]['best_flops'] / 1e9:.0f} GFLOP/s best, {peaks[prec]['median_flops'] / 1e9:.0f} median")
    return peaks
