"""Device memory planning: what a compiled program needs, what the device has, and --config.task_chunk=-1's choice
of how many runs to train at once (the largest group whose compiled step fits the budget)."""
from __future__ import annotations

from typing import Callable

import jax


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


def device_memory_budget(memory_gb: float) -> float | None:
    """Bytes the training step may use under --config.task_chunk=-1: `memory_gb` (--config.task_chunk_memory_gb)
    when > 0, else 90% of the device's limit (the rest: evaluation, checkpoint copies, allocator slack); None where
    the device reports none."""
    if memory_gb > 0:
        return memory_gb * 1e9
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
