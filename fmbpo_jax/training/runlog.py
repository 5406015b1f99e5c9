"""The run's logs and tables: metrics.jsonl / eval.jsonl / diagnostics.jsonl rows, results.csv and summary.md tables.

A metrics row: {'epoch', 'task', 'seed', 'total_time', <every metric of pwm.update>} per logged epoch per run; an
eval row: {'epoch', 'task', 'seed', 'episode_reward', 'episode_reward_std', 'episode_success'}.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Callable

import numpy as np

from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.run_config import RunSpec


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


def append_jsonl(path: str, rows: list[dict]) -> None:
    """Append rows to a JSONL log, flushed to disk (a kill -9 right after keeps them)."""
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
    """Every row of a JSONL log ([] when there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


def format_table(rows: list[dict], cols: list[str]) -> str:
    """A plain-text table (also valid Markdown)."""
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([fmt(r.get(c, "")) for c in cols]) for r in rows]
    return "\n".join(out)


def write_csv(path: str, rows: list[dict]) -> None:
    """rows (the first row's keys as the header) to a CSV file, atomically."""
    if not rows:
        return
    cols = list(rows[0])
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def eta_string(seconds: float) -> str:
    """H:MM:SS ('?' when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
