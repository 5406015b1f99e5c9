"""Run directories -> the report's numbers per variant: per-task and aggregate returns, timing, compute, curves.

Conventions: std over seeds uses ddof=1 (0 for one seed). IQM = scipy.stats.trim_mean(x, 0.25) over all
(task, seed) final returns (the rliable convention); mean over all runs; median over the per-task means.
Training time = the largest `total_time` in metrics.jsonl; one workdir trains all its (task, seed) runs in one
program on `gpus_per_run` accelerators, so a run's GPU-hours are total_time x gpus / 3600 / number of runs.
FLOPs per epoch: what the algorithm needs (tools.flops, 'needed').
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.tools import flops
from fmbpo_jax.tools.report.references import REFERENCE_PRETRAIN, reference_row
from fmbpo_jax.tools.report.runs import load_run, run_records, variant_key, variant_label

DIAG_KEYS = ("actor_esnr_db", "wm_jac_z", "wm_jac_a")  # diagnostics.jsonl (fmbpo_jax.diagnostics.epoch_diagnostics)
LOSS_KEYS = ("actor_loss", "value_loss", "wm_loss", "dynamics_loss", "reward_loss", "imagined_return",
             "actor_grad_norm", "wm_grad_norm")


def mean_std(xs) -> tuple[float, float]:
    """(mean, std with ddof=1, 0 for one value) of the values that are not None or NaN; (nan, nan) for none."""
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)


def iqm(xs) -> float:
    """Interquartile mean: scipy.stats.trim_mean(xs, 0.25) (cut int(0.25 n) values from each end)."""
    x = np.sort(np.asarray([v for v in xs if not math.isnan(v)], np.float64))
    if x.size == 0:
        return float("nan")
    cut = int(0.25 * x.size)
    return float(np.mean(x[cut: x.size - cut]))


def task_order(name: str) -> tuple:
    """Sort key: MT30 order, unknown names last."""
    return (MT30_TASKS.index(name), name) if name in MT30_TASKS else (10**6, name)


def _pretrain_summary(members: list[dict], cfg: dict) -> dict:
    """Best WM loss, its iteration, iterations done, wall seconds, the loss curve and the phase-8 reference."""
    rows = [row for m in members for row in m["pretrain"]]
    best = min(rows, key=lambda r: r["wm_loss"]) if rows else None
    return {"best_wm_loss": best["wm_loss"] if best else float("nan"), "best_iter": best["iter"] if best else None,
            "iters": max((m["epochs_done"] for m in members), default=0),
            "time_s": sum(m["total_time"] for m in members), "curve": sorted((r["iter"], r["wm_loss"]) for r in rows),
            "reference": REFERENCE_PRETRAIN.get(cfg.get("world_model")) if int(cfg.get("phase", 0) or 0) == 8 else None}


def _merge_records(members: list[dict], label: str, warnings: list[str]) -> dict[tuple[str, int], dict]:
    """(task, seed) -> record over the variant's run directories; a pair seen twice keeps the first (warned)."""
    records: dict[tuple[str, int], dict] = {}
    for m in members:
        for k, rec in run_records(m).items():
            if k in records:
                warnings.append(f"{label}: {k[0]} seed {k[1]} appears in several run directories; kept the first")
                continue
            records[k] = rec
    return records


def _per_task(records: dict, tasks: list[str], ref: dict | None) -> dict:
    per_task = {}
    for t in tasks:
        recs = [records[(tt, s)] for (tt, s) in sorted(records) if tt == t]
        row = {"n": len(recs), "seeds": sorted(s for (tt, s) in records if tt == t),
               "incomplete": sum(r["incomplete"] for r in recs)}
        for f in ("final", "best", "planning", "final_success", "planning_success"):
            row[f + "_mean"], row[f + "_std"] = mean_std([r[f] for r in recs])
        row["ref"] = ref["returns"].get(t) if ref else None
        per_task[t] = row
    return per_task


def _aggregate(records: dict, per_task: dict, tasks: list[str]) -> dict:
    finals = [r["final"] for r in records.values() if not math.isnan(r["final"])]
    bests = [r["best"] for r in records.values() if not math.isnan(r["best"])]
    task_means = [per_task[t]["final_mean"] for t in tasks if not math.isnan(per_task[t]["final_mean"])]
    return {"tasks": len(tasks), "runs": len(records),
            "final_mean": float(np.mean(finals)) if finals else float("nan"),
            "final_median": float(np.median(task_means)) if task_means else float("nan"),
            "final_iqm": iqm(finals), "best_mean": float(np.mean(bests)) if bests else float("nan"),
            "best_iqm": iqm(bests)}


def _timing_and_compute(members: list[dict], cfg: dict, mean_final: float, gpus_per_run: float) -> tuple[dict, dict]:
    """Wall time and task-epochs (each workdir is one program that trains all its runs together), GPU-hours and FLOPs."""
    wall = sum(m["total_time"] for m in members)
    task_epochs = sum(len(m["runs"]) * m["epochs_done"] for m in members)
    n_runs = max(1, sum(len(m["runs"]) for m in members))
    gpu_h = wall * gpus_per_run / 3600.0
    gpu_h_run = gpu_h / n_runs
    epoch = flops.from_config_dict(cfg)
    flops_run = epoch["needed"] * (task_epochs / n_runs)
    timing = {"wall_s": wall, "epochs_done": min((m["epochs_done"] for m in members), default=0), "task_epochs": task_epochs,
              "task_epochs_per_s": task_epochs / wall if wall > 0 else float("nan"),
              "s_per_epoch": float(np.mean([m["total_time"] / max(1, m["epochs_done"]) for m in members])),
              "complete": all(m["complete"] for m in members)}
    compute = {"gpu_hours": gpu_h, "gpu_hours_per_run": gpu_h_run,
               "return_per_gpu_hour": mean_final / gpu_h_run if gpu_h_run > 0 else float("nan"),
               "flops_per_epoch": epoch["needed"], "flops_per_run": flops_run,
               "return_per_tflop": mean_final / (flops_run / 1e12) if flops_run > 0 else float("nan"),
               "flops_breakdown": epoch}
    return timing, compute


def _policy_variant(v: dict, members: list[dict], warnings: list[str], gpus_per_run: float) -> None:
    """Fill a policy variant's tasks, aggregate, timing, compute and curves."""
    cfg = v["config"]
    records = _merge_records(members, v["label"], warnings)
    tasks = sorted({t for t, _ in records}, key=task_order)
    v["reference"] = reference_row(cfg)
    v["tasks"] = _per_task(records, tasks, v["reference"])
    v["aggregate"] = _aggregate(records, v["tasks"], tasks)
    v["timing"], v["compute"] = _timing_and_compute(members, cfg, v["aggregate"]["final_mean"], gpus_per_run)
    v["curves"] = curves(members)


def collect(run_dirs: list[str], gpus_per_run: float = 1.0) -> dict:
    """Load and aggregate run directories. Returns the report's data structure (see `cli.build_report`)."""
    runs = [load_run(d) for d in run_dirs]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[variant_key(r["config"])].append(r)
    variants = {}
    warnings: list[str] = []
    for key in sorted(groups, key=str):
        members = groups[key]
        cfg = members[0]["config"]
        label = variant_label(cfg)
        v = {"key": key, "label": label, "config": cfg, "workdirs": [m["workdir"] for m in members],
             "mode": cfg.get("mode", "policy"), "reference": None}
        if v["mode"] == "pretrain_wm":
            v["pretrain"] = _pretrain_summary(members, cfg)
        else:
            _policy_variant(v, members, warnings, gpus_per_run)
        variants[label] = v
    return {"variants": variants, "runs": runs, "warnings": warnings, "gpus_per_run": gpus_per_run}


def x_value(row: dict) -> int:
    """A log row's x: its env steps (online runs, mode 'online') or its epoch."""
    return int(row["env_steps"] if "env_steps" in row else row["epoch"])


def _epoch_lists(rows, keys) -> dict[str, dict[int, list[float]]]:
    """key -> x (`x_value`: env steps or epoch) -> finite values of that key over the rows."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for k in keys(r):
            x = r[k]
            if isinstance(x, (int, float)) and x is not None and math.isfinite(x):
                out[k][x_value(r)].append(float(x))
    return {k: dict(d) for k, d in out.items()}


def curves(members: list[dict]) -> dict:
    """eval[task][x] -> [returns over seeds]; loss[key][x] -> [values over runs]; diagnostics likewise; 'x': the x axis,
    'env steps' when the rows have an env_steps column (online runs), else 'epoch'."""
    ev: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for m in members:
        for r in m["evals"]:
            k = (r["task"], int(r["seed"]), x_value(r))
            if k in seen:
                continue
            seen.add(k)
            ev[r["task"]][x_value(r)].append(float(r["episode_reward"]))
    metrics = [r for m in members for r in m["metrics"]]
    diagnostics = [r for m in members for r in m.get("diagnostics", [])]
    skip = ("epoch", "env_steps", "episode", "task", "seed", "total_time")
    online = any("env_steps" in r for m in members for r in m["evals"] + m["metrics"])
    return {"x": "env steps" if online else "epoch", "eval": {t: dict(d) for t, d in ev.items()},
            "loss": _epoch_lists(metrics, lambda r: [k for k in LOSS_KEYS if k in r and r[k] is not None]),
            "diagnostics": _epoch_lists(diagnostics, lambda r: [k for k in r if k not in skip])}
