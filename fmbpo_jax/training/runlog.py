"""The run's logs and tables: metrics.jsonl / eval.jsonl / diagnostics.jsonl rows, results.csv and summary.md tables.

A metrics row: {'epoch', 'task', 'seed', 'total_time', <every metric of pwm.update>} per logged epoch per run; an
eval row: {'epoch', 'task', 'seed', 'episode_reward', 'episode_reward_std', 'episode_success'}.
"""
from __future__ import annotations

import math
import os

import numpy as np

from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.run_config import RunSpec
from fmbpo_jax.textio import append_jsonl, truncate_jsonl


class RunLog:
    """Append-only JSONL logs in the workdir; on resume rows at or past the restored epoch are dropped.

    write=False (every process but process 0 of a multi-process run): nothing is written.
    """

    def __init__(self, workdir: str, write: bool = True):
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.eval_path = os.path.join(workdir, "eval.jsonl")
        self.diag_path = os.path.join(workdir, "diagnostics.jsonl")
        self.write = write

    def resume_at(self, epoch: int, last_eval_epoch: int) -> None:
        if not self.write:
            return
        truncate_jsonl(self.metrics_path, lambda r: r["epoch"] < epoch)
        truncate_jsonl(self.eval_path, lambda r: r["epoch"] <= last_eval_epoch)
        truncate_jsonl(self.diag_path, lambda r: r["epoch"] <= epoch)

    def _append(self, path: str, rows: list[dict]) -> None:
        if rows and self.write:
            append_jsonl(path, rows)

    def diagnostics(self, rows):
        self._append(self.diag_path, rows)

    def metrics(self, rows):
        self._append(self.metrics_path, rows)

    def evals(self, rows):
        self._append(self.eval_path, rows)


def metrics_rows(spec: RunSpec, metrics: dict, first_epoch: int, log_freq: int, elapsed: float) -> list[dict]:
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


def eta_string(seconds: float) -> str:
    """H:MM:SS ('?' when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
