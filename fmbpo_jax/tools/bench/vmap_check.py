"""``--vmap-check``: N tasks in one program vs N single-task programs run one after another (target ratio <= 0.5)."""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp

from fmbpo_jax import run_config
from fmbpo_jax.tools.bench.catalog import is_pretrain
from fmbpo_jax.tools.bench.plan import compile_row, error_text, lower_row, plan_row, random_window_data, row_base, row_config, take_task
from fmbpo_jax.tools.bench.schedule import run_rows


def _sequential_seconds(args, variant: str, size: str, tasks: int, precision: str) -> tuple[float, float]:
    """(seconds of N single-task calls one after another, compile seconds of the single-task program)."""
    horizon = run_config.pwm_config(row_config(args, variant, size, precision)).horizon
    data = random_window_data(tasks, horizon)
    per_task = [(take_task(data, i), jnp.full((args.seeds,), i, jnp.int32)) for i in range(tasks)]
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
    return seq, r.row["compile_s"]


def vmap_check(args, variant: str, size: str, tasks: int, precision: str, multi_row: dict | None, peaks: dict,
               t_start: float, log: Callable) -> dict:
    """One vmap-check row; the N-task row is timed first when `multi_row` (its bench row) is None."""
    row = row_base(args, variant, size, tasks, precision)
    row["kind"] = "vmap-check"
    if multi_row is None:
        r = plan_row(args, variant, size, tasks, precision)
        run_rows([r], args, peaks, t_start, log, lambda _: None)
        multi_row = r.row
    if "error" in multi_row:
        row["error"] = "multi-task row failed: " + multi_row["error"]
        return row
    try:
        seq, single_compile_s = _sequential_seconds(args, variant, size, tasks, precision)
    except Exception as e:  # noqa: BLE001
        row["error"] = error_text(e)
        return row
    seq_epoch = seq / args.epochs_per_call
    row.update(multi_s_epoch=multi_row["median_s_epoch"], sequential_s_epoch=seq_epoch, single_compile_s=single_compile_s,
               ratio=multi_row["median_s_epoch"] / seq_epoch, target="<= 0.5")
    return row


def vmap_checks(args, rows: list[dict], peaks: dict, t_start: float, log: Callable, on_row: Callable) -> None:
    """A vmap-check row per precision and size for the first policy variant at the largest --tasks, appended to rows."""
    n = max(args.task_counts)
    v = next((v for v in args.variants if not is_pretrain(v)), None)
    for p in args.precisions if v else []:
        for s in args.sizes:
            label = row_base(args, v, s, n, p)["size"]
            multi = next((r for r in rows if r["variant"] == v and r["tasks"] == n and r["precision"] == p
                          and r["size"] == label and r.get("status") == "done" and r.get("kind") != "vmap-check"), None)
            log(f"... vmap-check {v} size={s} tasks={n} precision={p}")
            vrow = vmap_check(args, v, s, n, p, multi, peaks, t_start, log)
            vrow["status"] = "error" if "error" in vrow else "done"
            rows.append(vrow)
            on_row(vrow)
