"""Results people can look at: tables, learning curves and compute-normalised views of trained runs.

    python -m fmbpo_jax.report RUN_DIR [RUN_DIR ...] --out DIR [--format md|html] [--gpus-per-run N]

Reads every run directory's `config.json`, `metrics.jsonl`, `eval.jsonl`, `results.csv` (and
`pretrain.jsonl` for phase-8 WM pretraining, `diagnostics.jsonl` when the trainer wrote diagnostics),
groups the runs by variant and writes DIR/report.md
(plus DIR/report.html with the figures embedded when --format html) and PNG figures:

- per-task tables: mean +- std over seeds of the final, best and planning evaluation returns and the
  success rates, next to the reference's recorded numbers (spec/ALGORITHM.md section 8) when the phase
  matches (config.phase);
- an aggregate over tasks: mean, median and IQM (interquartile mean) of the final return;
- training time, task-epochs/s, and returns per GPU-hour and per 10^12 FLOPs (`epoch_flops`);
- figures: evaluation return vs epoch per task (seeds as a band, variants in one panel), training loss
  curves, a bar chart of the final return per task per variant, and (when present) the actor-gradient
  ESNR and WM Jacobian proxies vs epoch.

A variant is (phase, model size, WM type and its integrator/K, actor type and its integrator/K,
preset, epochs, frozen or fine-tuned WM); run directories of the same variant are merged (their
(task, seed) runs pooled). Nothing here needs JAX; matplotlib is imported only to draw.

Conventions: std over seeds uses ddof=1 (0 for one seed). IQM = scipy.stats.trim_mean(x, 0.25) over all
(task, seed) final returns (the rliable convention); mean over all runs; median over the per-task means.
A run without results.csv (still training) reports its last evaluation as "final" and is marked.
Training time = the largest `total_time` in metrics.jsonl (wall-clock from the start of training,
compile and evaluation waits included, the final evaluation not); one workdir trains all its (task, seed)
runs in one program on `--gpus-per-run` accelerators (default 1), so a run's GPU-hours are
total_time x gpus / 3600 / number of runs.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import os
import sys
from collections import defaultdict
from typing import Any

import numpy as np

OBS_DIM = 24  # MT30 padded observation width (fmbpo_jax.envs.tasks.MAX_OBS_DIM)
ACT_DIM = 6  # MT30 padded action width (MAX_ACTION_DIM)

# ================================================================================ reference numbers
# spec/ALGORITHM.md section 8: mean over seeds 42/123/456 of the final episode_reward (10 deterministic
# episodes). A str value is shown as recorded ("≈0.23" counts as 0.23 in averages; ranges are not
# averaged). runtime_min: per (task, seed) job; s_per_epoch includes data loading and evaluations.
# match: the config fields that select the row (K's only where the model is a flow).
REFERENCE_RESULTS: list[dict[str, Any]] = [
    dict(phase=3, label="3 baseline (frozen PWM WM)", config=("phase3", "baseline"), epochs=10_000,
         match=dict(world_model="mlp", actor="gaussian", finetune_wm=False),
         returns={"reacher-easy": 982.3, "walker-stand": 957.7, "cheetah-run": 112.5},
         runtime_min=15.0, runtime="\"15 min\" recorded (H100) [A]", s_per_epoch=0.09, gpu="H100"),
    dict(phase=3, label="3 flow policy K=2 (frozen)", config=("phase3", "flowpolicy"), epochs=10_000,
         match=dict(world_model="mlp", actor="flow", finetune_wm=False, actor_substeps=2),
         returns={"reacher-easy": 980.7, "walker-stand": 839.8, "cheetah-run": 98.7},
         runtime_min=15.0, runtime="\"15 min\" (H100) [A]", s_per_epoch=0.09, gpu="H100"),
    dict(phase=4, label="4 fullflow scratch (WM K4, pol K2)", config=("phase4", None), epochs=10_000,
         match=dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=4, actor_substeps=2, integrator="heun"),
         returns={"reacher-easy": 85.3, "walker-stand": 136.6, "cheetah-run": 0.59},
         runtime_min=82.0, runtime="78-86 min H100", s_per_epoch=0.47, gpu="H100"),
    dict(phase=5, label="5 high_precision_wm (K8/K2)", config=("phase5", "high_precision_wm"), epochs=15_000,
         match=dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=8, actor_substeps=2, integrator="heun"),
         returns={"reacher-easy": None, "walker-stand": 138.7, "cheetah-run": "≈0.23"},
         runtime_min=176.0, runtime="~176 min H100", s_per_epoch=0.70, gpu="H100"),
    dict(phase=5, label="5 high_precision_policy (K4/K4)", config=("phase5", "high_precision_policy"), epochs=15_000,
         match=dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=4, actor_substeps=4, integrator="heun"),
         returns={"reacher-easy": None, "walker-stand": 148.2, "cheetah-run": "≈0.19"},
         runtime_min=127.0, runtime="~127 min H100", s_per_epoch=0.51, gpu="H100"),
    dict(phase=5, label="5 euler_fast (Euler K4/K2)", config=("phase5", "euler_fast"), epochs=15_000,
         match=dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=4, actor_substeps=2, integrator="euler"),
         returns={"reacher-easy": None, "walker-stand": 151.5, "cheetah-run": "0.16-4.08"},
         runtime_min=79.5, runtime="~79.5 min H100", s_per_epoch=0.32, gpu="H100"),
    dict(phase=6, label="6 baseline scratch 15k", config=("phase6", "baseline"), epochs=15_000,
         match=dict(world_model="mlp", actor="gaussian", finetune_wm=True),
         returns={"reacher-easy": 70.2, "walker-stand": 149.0, "cheetah-run": "≈0.19"},
         runtime_min=49.0, runtime="~49 min H100", s_per_epoch=0.20, gpu="H100"),
    dict(phase=6, label="6 fullflow scratch (K8/K4) 15k", config=("phase6", "fullflow"), epochs=15_000,
         match=dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=8, actor_substeps=4, integrator="heun"),
         returns={"reacher-easy": 78.1, "walker-stand": 150.5, "cheetah-run": "0.05-0.66"},
         note="reacher-easy 78.1 from the csv; the log gives 147.2 for s42",
         runtime_min=188.0, runtime="~188 min H100", s_per_epoch=0.75, gpu="H100"),
    dict(phase=6, label="6 baseline scratch 50k", config=("phase6", "baseline"), epochs=50_000,
         match=dict(world_model="mlp", actor="gaussian", finetune_wm=True),
         returns={"reacher-easy": 106.6, "walker-stand": 125.9, "cheetah-run": 15.2},
         runtime_min=155.0, runtime="~155 min H100", s_per_epoch=0.19, gpu="H100"),
    dict(phase=6, label="6 baseline scratch 100k", config=("phase6", "baseline"), epochs=100_000,
         match=dict(world_model="mlp", actor="gaussian", finetune_wm=True),
         returns={"reacher-easy": 211.1, "walker-stand": 174.4, "cheetah-run": 1.59},
         runtime_min=310.0, runtime="~310 min H200", s_per_epoch=0.19, gpu="H200"),
    dict(phase=6, label="6 baseline scratch 150k", config=("phase6", "baseline"), epochs=150_000,
         match=dict(world_model="mlp", actor="gaussian", finetune_wm=True),
         returns={"reacher-easy": None, "walker-stand": 111.4, "cheetah-run": None},
         note="walker-stand: seed 42 only; the other runs ran out of memory",
         runtime_min=419.0, runtime="419 min H200", s_per_epoch=0.17, gpu="H200"),
    dict(phase=7, label="7 baseline finetune pretrained", config=("phase7", "baseline"), epochs=15_000,
         match=dict(world_model="mlp", actor="gaussian", finetune_wm=True),
         returns={"reacher-easy": 19.0, "walker-stand": 176.3, "cheetah-run": 30.1},
         runtime_min=44.0, runtime="~44 min H100", s_per_epoch=0.18, gpu="H100"),
    dict(phase=7, label="7 flow_std (pol K2) finetune", config=("phase7", "flow_std"), epochs=15_000,
         match=dict(world_model="mlp", actor="flow", finetune_wm=True, actor_substeps=2),
         returns={"reacher-easy": 2.1, "walker-stand": 89.0, "cheetah-run": 7.6},
         runtime_min=51.5, runtime="~51.5 min H100", s_per_epoch=0.21, gpu="H100"),
    dict(phase=7, label="7 flow_high (pol K4) finetune", config=("phase7", "flow_high"), epochs=15_000,
         match=dict(world_model="mlp", actor="flow", finetune_wm=True, actor_substeps=4),
         returns={"reacher-easy": 1.6, "walker-stand": 89.0, "cheetah-run": 22.2},
         runtime_min=62.5, runtime="~62.5 min H100", s_per_epoch=0.25, gpu="H100"),
]
# Phase 8: best single-batch WM loss and the iteration it was reached at.
REFERENCE_PRETRAIN = {"flow": (1.3040, 133_000), "mlp": (0.0009, 197_000)}


def ref_number(v) -> float | None:
    """A reference cell as a number: floats as they are, '≈x' as x, ranges and blanks as None."""
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.startswith("≈"):
        try:
            return float(v[1:])
        except ValueError:
            return None
    return None


def _ref_cell(v) -> str:
    return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) and abs(v) >= 10 else str(v))


def _cfg_get(config: dict, path: str, default=None):
    node = config
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def config_selectors(config: dict) -> dict:
    """The fields a reference row matches on (K's and integrator only where the model is a flow)."""
    wm, actor = config.get("world_model", "mlp"), config.get("actor", "gaussian")
    out = dict(world_model=wm, actor=actor, finetune_wm=bool(config.get("finetune_wm", False)))
    if actor == "flow":
        out["actor_substeps"] = int(_cfg_get(config, "model.actor_substeps", 2))
    if wm == "flow":
        out["wm_substeps"] = int(_cfg_get(config, "model.wm_substeps", 4))
        out["integrator"] = _cfg_get(config, "model.wm_integrator", "heun")
    return out


def reference_row(config: dict) -> dict | None:
    """The section-8 row for this config's phase and variant: same epochs if recorded, else the nearest."""
    phase = int(config.get("phase", 0) or 0)
    sel = config_selectors(config)
    rows = [r for r in REFERENCE_RESULTS if r["phase"] == phase and all(sel.get(k) == v for k, v in r["match"].items())]
    if not rows:
        return None
    epochs = int(config.get("epochs", 0))
    return min(rows, key=lambda r: (abs(r["epochs"] - epochs), r["epochs"]))


# ==================================================================================== FLOP formula


def _mlp_macs(widths) -> int:
    """Multiply-accumulates of one row through Linear layers of the given widths [in, h1, ..., out]."""
    widths = [int(w) for w in widths]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def _as_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return config


def _evals_per_step(kind_is_flow: bool, integrator: str, substeps: int) -> int:
    if not kind_is_flow:
        return 1
    return 2 * int(substeps) if integrator == "heun" else int(substeps)


def epoch_flops_breakdown(config) -> dict[str, float]:
    """Analytic FLOPs of ONE training epoch of ONE run (one task, one seed), by part. See `epoch_flops`."""
    from configs.base import SIZES
    from fmbpo_jax.presets import preset_values

    c = _as_dict(config)
    m = dict(c["model"])
    if m.get("size", "custom") in SIZES:
        m.update(SIZES[m["size"]])
    alg = c["alg"]
    beh = preset_values(c.get("preset", "fixed"))
    beh.update({k: v for k, v in (c.get("behaviour") or {}).items() if v is not None})
    L, E, O, A = int(m["latent_dim"]), int(m["task_dim"]), OBS_DIM, ACT_DIM
    flow_wm, flow_actor = c.get("world_model") == "flow", c.get("actor") == "flow"
    wunits = m["flow_units"] if flow_wm else m["units"]
    enc = _mlp_macs([O + E, *m["encoder_units"], L])
    dyn = _mlp_macs([(L + A + 1 + E) if flow_wm else (L + E + A), *wunits, L])
    rew = _mlp_macs([L + A + E, *wunits, m["num_bins"]])
    act = _mlp_macs([L + (A + 1 if flow_actor else 0), *m["actor_units"], A])
    crit = int(m["num_critics"]) * _mlp_macs([L, *m["critic_units"], 1])
    n_w = _evals_per_step(flow_wm, m.get("wm_integrator", "heun"), m.get("wm_substeps", 4))
    n_a = _evals_per_step(flow_actor, m.get("actor_integrator", "heun"), m.get("actor_substeps", 2))
    H, B = int(alg["horizon"]), int(alg["batch_size"])
    fwd, train = 2.0, 6.0  # FLOPs per MAC: forward 2mnk; forward + backward (= 2 x forward) 6mnk

    wm_part = 0.0
    if c.get("finetune_wm"):
        steps, rows = (int(alg["wm_iterations"]), int(alg["wm_batch_size"])) if beh["wm_updates"] == "iterations" else (1, B)
        teacher = bool(alg.get("teacher_forcing", False))
        dyn_per_step = (1 if teacher else 1 + n_w) if flow_wm else 1
        per = (H * rows * enc * fwd  # stop-gradient encoder targets
               + rows * enc * train  # z0 with gradient
               + H * rows * dyn_per_step * dyn * train  # flow matching (+ rollout) or MLP dynamics
               + H * rows * rew * train)  # reward head
        wm_part = steps * per
    actor_part = (B * enc * fwd  # z0, stop-gradient
                  + H * B * (n_a * act + n_w * dyn + rew) * train  # differentiated rollout
                  + H * B * crit * fwd  # V(z_{t+1}) for the critic targets, stop-gradient
                  + B * crit * train)  # terminal value, differentiated
    steps = int(alg["critic_iterations"]) * int(alg["critic_batches"])
    critic_part = steps * (B * H // int(alg["critic_batches"])) * crit * train
    total = wm_part + actor_part + critic_part
    return {"wm": wm_part, "actor": actor_part, "critic": critic_part, "total": total}


def epoch_flops(config) -> float:
    """Analytic FLOPs of one training epoch of one run (one task x one seed) from the config's sizes.

    Convention: a Linear layer of n inputs and k outputs on m rows costs 2mnk FLOPs forward; a layer that
    is differentiated costs 3x that (backward = 2x forward); biases, LayerNorm, Mish, SimNorm, softmax
    and the optimizer are ignored. Per epoch (H horizon, B batch, K substeps, Heun = 2K evaluations,
    Euler = K per macro step; an MLP WM or Gaussian actor is one evaluation):
      WM (if finetune_wm): wm_iterations steps on wm_batch_size rows (wm_updates='iterations') or one on B
        rows: encoder targets H rows x fwd + encoder z0 x train + H x (1 flow-matching + n_w rollout
        velocity evaluations, flow; 1 dynamics, MLP; 1 with teacher forcing) x train + H reward heads x train.
      Actor: encoder z0 fwd + H x (n_a actor + n_w WM + reward) x train + H critic ensembles fwd (targets)
        + one terminal critic ensemble x train.
      Critic: critic_iterations x critic_batches steps on B*H/critic_batches rows x train.
    Evaluation and planning are not counted. `config`: config.json as a dict, or an ml_collections ConfigDict.
    """
    return epoch_flops_breakdown(config)["total"]


def reference_config(row: dict) -> dict | None:
    """The reference preset's config dict for a REFERENCE_RESULTS row (from configs/phaseN.py)."""
    import importlib

    module, variant = row["config"]
    try:
        mod = importlib.import_module(f"configs.{module}")
        c = mod.get_config(variant) if variant is not None else mod.get_config()
    except Exception:  # noqa: BLE001 - a config file that moved must not break the report
        return None
    d = c.to_dict()
    d["preset"] = "reference"
    d["behaviour"] = {}
    d["epochs"] = row["epochs"]
    return d


# ===================================================================================== reading runs


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            r = {}
            for k, v in row.items():
                try:
                    r[k] = int(v) if k == "seed" else float(v) if k != "task" else v
                except (TypeError, ValueError):
                    r[k] = v
            out.append(r)
    return out


def load_run(workdir: str) -> dict:
    """One run directory: its config, logs, results and timing."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: no config.json (not a fmbpo_jax run directory)")
    with open(path) as f:
        config = json.load(f)
    run = {
        "workdir": workdir, "config": config,
        "metrics": _read_jsonl(os.path.join(workdir, "metrics.jsonl")),
        "evals": _read_jsonl(os.path.join(workdir, "eval.jsonl")),
        "results": _read_csv(os.path.join(workdir, "results.csv")),
        "pretrain": _read_jsonl(os.path.join(workdir, "pretrain.jsonl")),
        "diagnostics": _read_jsonl(os.path.join(workdir, "diagnostics.jsonl")),
    }
    run["complete"] = bool(run["results"]) if config.get("mode", "policy") == "policy" else bool(run["pretrain"])
    run["runs"] = sorted({(r["task"], int(r["seed"])) for r in run["metrics"]} | {(r["task"], int(r["seed"])) for r in run["results"]})
    chunk = int(config.get("chunk_epochs", 1) or 1)
    epochs = int(config.get("epochs", 0))
    if run["metrics"]:
        last = max(r["epoch"] for r in run["metrics"])
        # rows are written after the chunk that holds them, with the time at the end of that chunk
        run["epochs_done"] = min(epochs, (last // chunk + 1) * chunk) if epochs else last + 1
        run["total_time"] = max(float(r.get("total_time", 0.0)) for r in run["metrics"])
    elif run["pretrain"]:
        run["epochs_done"] = int(max(r["iter"] for r in run["pretrain"]))
        run["total_time"] = max(float(r.get("elapsed_sec", 0.0)) for r in run["pretrain"])
    else:
        run["epochs_done"], run["total_time"] = 0, 0.0
    return run


def variant_key(config: dict) -> tuple:
    sel = config_selectors(config)
    return (int(config.get("phase", 0) or 0), config.get("mode", "policy"), _cfg_get(config, "model.size", "?"),
            sel["world_model"], sel.get("integrator"), sel.get("wm_substeps"), sel["actor"],
            _cfg_get(config, "model.actor_integrator", "heun") if sel["actor"] == "flow" else None, sel.get("actor_substeps"),
            config.get("preset", "fixed"), int(config.get("epochs", 0)), sel["finetune_wm"])


def variant_label(config: dict) -> str:
    phase, mode, size, wm, wint, wk, actor, aint, ak, preset, epochs, ft = variant_key(config)
    wm_s = f"flow WM ({wint} K{wk})" if wm == "flow" else "MLP WM"
    if mode == "pretrain_wm":
        return f"p{phase} {wm_s} pretraining | {size}"
    act_s = f"flow actor ({aint} K{ak})" if actor == "flow" else "Gaussian actor"
    ep = f"{epochs // 1000}k" if epochs >= 1000 and epochs % 1000 == 0 else str(epochs)
    return f"p{phase} {wm_s} + {act_s} | {'fine-tuned' if ft else 'frozen'} WM | {preset} | {ep} ep | {size}"


def _mean_std(xs) -> tuple[float, float]:
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


def _run_records(run: dict) -> dict[tuple[str, int], dict]:
    """(task, seed) -> {final, best, planning, final_success, planning_success, incomplete, last_epoch}."""
    evals = defaultdict(list)
    for r in run["evals"]:
        evals[(r["task"], int(r["seed"]))].append(r)
    out = {}
    res = {(r["task"], int(r["seed"])): r for r in run["results"]}
    for key in run["runs"]:
        ev = sorted(evals.get(key, []), key=lambda r: r["epoch"])
        best_ev = max((r["episode_reward"] for r in ev), default=float("nan"))
        if key in res:
            r = res[key]
            out[key] = dict(final=r.get("final_return", float("nan")), best=r.get("best_eval_return", best_ev),
                            planning=r.get("planning_return", float("nan")), final_success=r.get("final_success", float("nan")),
                            planning_success=r.get("planning_success", float("nan")), incomplete=False,
                            last_epoch=ev[-1]["epoch"] if ev else None)
        else:
            last = ev[-1] if ev else {}
            out[key] = dict(final=last.get("episode_reward", float("nan")), best=best_ev, planning=float("nan"),
                            final_success=last.get("episode_success", float("nan")), planning_success=float("nan"),
                            incomplete=True, last_epoch=last.get("epoch"))
    return out


# ===================================================================================== aggregation


def collect(run_dirs: list[str], gpus_per_run: float = 1.0) -> dict:
    """Load and aggregate run directories. Returns the report's data structure (see `build_report`)."""
    runs = [load_run(d) for d in run_dirs]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[variant_key(r["config"])].append(r)
    variants = {}
    warnings = []
    for key in sorted(groups, key=str):
        members = groups[key]
        cfg = members[0]["config"]
        label = variant_label(cfg)
        v = {"key": key, "label": label, "config": cfg, "workdirs": [m["workdir"] for m in members],
             "mode": cfg.get("mode", "policy"), "reference": None}
        if v["mode"] == "pretrain_wm":
            rows = [row for m in members for row in m["pretrain"]]
            best = min(rows, key=lambda r: r["wm_loss"]) if rows else None
            v["pretrain"] = {"best_wm_loss": best["wm_loss"] if best else float("nan"), "best_iter": best["iter"] if best else None,
                             "iters": max((m["epochs_done"] for m in members), default=0),
                             "time_s": sum(m["total_time"] for m in members), "curve": sorted((r["iter"], r["wm_loss"]) for r in rows)}
            ref = REFERENCE_PRETRAIN.get(cfg.get("world_model")) if int(cfg.get("phase", 0) or 0) == 8 else None
            v["pretrain"]["reference"] = ref
            variants[label] = v
            continue
        records: dict[tuple[str, int], dict] = {}
        for m in members:
            for k, rec in _run_records(m).items():
                if k in records:
                    warnings.append(f"{label}: {k[0]} seed {k[1]} appears in several run directories; kept the first")
                    continue
                records[k] = rec
        tasks = sorted({t for t, _ in records}, key=_task_order)
        ref = reference_row(cfg)
        v["reference"] = ref
        per_task = {}
        for t in tasks:
            recs = [records[(tt, s)] for (tt, s) in sorted(records) if tt == t]
            row = {"n": len(recs), "seeds": sorted(s for (tt, s) in records if tt == t),
                   "incomplete": sum(r["incomplete"] for r in recs)}
            for f in ("final", "best", "planning", "final_success", "planning_success"):
                row[f + "_mean"], row[f + "_std"] = _mean_std([r[f] for r in recs])
            row["ref"] = ref["returns"].get(t) if ref else None
            per_task[t] = row
        v["tasks"] = per_task
        finals = [r["final"] for r in records.values() if not math.isnan(r["final"])]
        bests = [r["best"] for r in records.values() if not math.isnan(r["best"])]
        task_means = [per_task[t]["final_mean"] for t in tasks if not math.isnan(per_task[t]["final_mean"])]
        v["aggregate"] = {"tasks": len(tasks), "runs": len(records),
                          "final_mean": float(np.mean(finals)) if finals else float("nan"),
                          "final_median": float(np.median(task_means)) if task_means else float("nan"),
                          "final_iqm": iqm(finals), "best_mean": float(np.mean(bests)) if bests else float("nan"),
                          "best_iqm": iqm(bests)}
        # timing: each workdir is one program that trains all its runs together
        wall = sum(m["total_time"] for m in members)
        task_epochs = sum(len(m["runs"]) * m["epochs_done"] for m in members)
        n_runs = max(1, sum(len(m["runs"]) for m in members))
        epochs_done = min((m["epochs_done"] for m in members), default=0)
        gpu_h = wall * gpus_per_run / 3600.0
        gpu_h_run = gpu_h / n_runs
        flops_epoch = epoch_flops(cfg)
        flops_run = flops_epoch * (task_epochs / n_runs)
        mean_final = v["aggregate"]["final_mean"]
        v["timing"] = {"wall_s": wall, "epochs_done": epochs_done, "task_epochs": task_epochs,
                       "task_epochs_per_s": task_epochs / wall if wall > 0 else float("nan"),
                       "s_per_epoch": float(np.mean([m["total_time"] / max(1, m["epochs_done"]) for m in members])),
                       "complete": all(m["complete"] for m in members)}
        v["compute"] = {"gpu_hours": gpu_h, "gpu_hours_per_run": gpu_h_run,
                        "return_per_gpu_hour": mean_final / gpu_h_run if gpu_h_run > 0 else float("nan"),
                        "flops_per_epoch": flops_epoch, "flops_per_run": flops_run,
                        "return_per_tflop": mean_final / (flops_run / 1e12) if flops_run > 0 else float("nan"),
                        "flops_breakdown": epoch_flops_breakdown(cfg)}
        v["curves"] = _curves(members)
        variants[label] = v
    return {"variants": variants, "runs": runs, "warnings": warnings, "gpus_per_run": gpus_per_run}


def _task_order(name: str) -> tuple:
    try:
        from fmbpo_jax.envs.tasks import MT30_TASKS

        return (MT30_TASKS.index(name), name)
    except (ImportError, ValueError):
        return (10**6, name)


DIAG_KEYS = ("actor_esnr_db", "wm_jac_z", "wm_jac_a")  # diagnostics.jsonl (fmbpo_jax.diagnostics.epoch_diagnostics)
LOSS_KEYS = ("actor_loss", "value_loss", "wm_loss", "dynamics_loss", "reward_loss", "imagined_return",
             "actor_grad_norm", "wm_grad_norm")


def _curves(members: list[dict]) -> dict:
    """eval[task][epoch] -> [returns over seeds]; loss[key][epoch] -> [values over runs]."""
    ev: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for m in members:
        for r in m["evals"]:
            k = (r["task"], int(r["seed"]), r["epoch"])
            if k in seen:
                continue
            seen.add(k)
            ev[r["task"]][int(r["epoch"])].append(float(r["episode_reward"]))
    loss: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in members:
        for r in m["metrics"]:
            for k in LOSS_KEYS:
                if k in r and r[k] is not None and math.isfinite(r[k]):
                    loss[k][int(r["epoch"])].append(float(r[k]))
    diag: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in members:
        for r in m.get("diagnostics", []):
            for k, x in r.items():
                if k not in ("epoch", "task", "seed", "total_time") and isinstance(x, (int, float)) and math.isfinite(x):
                    diag[k][int(r["epoch"])].append(float(x))
    return {"eval": {t: dict(d) for t, d in ev.items()}, "loss": {k: dict(d) for k, d in loss.items()},
            "diagnostics": {k: dict(d) for k, d in diag.items()}}


# ========================================================================================= figures


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib ships with the dev extra
        raise SystemExit("fmbpo_jax.report needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def make_figures(data: dict, out: str) -> dict[str, str]:
    """Write the PNGs; returns {name: path}."""
    plt = _plt()
    policy = {k: v for k, v in data["variants"].items() if v["mode"] == "policy"}
    figs: dict[str, str] = {}
    colors = dict(zip(data["variants"], _colors(len(data["variants"]))))
    tasks = sorted({t for v in policy.values() for t in v["tasks"]}, key=_task_order)

    if tasks:
        ncol = min(5, len(tasks))
        nrow = math.ceil(len(tasks) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow), squeeze=False)
        for ax, t in zip(axes.flat, tasks):
            for label, v in policy.items():
                d = v["curves"]["eval"].get(t)
                if not d:
                    continue
                ep = np.array(sorted(d))
                mean = np.array([np.mean(d[e]) for e in ep])
                sd = np.array([_mean_std(d[e])[1] for e in ep])
                lo, hi = mean - sd, mean + sd
                ax.plot(ep, mean, color=colors[label], label=label, lw=1.5, marker="." if len(ep) < 20 else None)
                ax.fill_between(ep, lo, hi, color=colors[label], alpha=0.2, lw=0)
                ref = ref_number(v["tasks"].get(t, {}).get("ref"))
                if ref is not None:
                    ax.axhline(ref, color=colors[label], ls="--", lw=0.8)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylabel("eval return", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        _legend(fig, axes)
        fig.suptitle("Evaluation return (mean ± std over seeds; dashed: reference final)", fontsize=10)
        figs["eval_curves"] = _save(fig, out, "eval_curves.png")

        fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * len(tasks) * max(1, len(policy)) ** 0.5 + 2),
                                        4.5 + 0.2 * math.ceil(len(policy) / 2)))
        width = 0.8 / max(1, len(policy))
        x = np.arange(len(tasks))
        for i, (label, v) in enumerate(policy.items()):
            means = [v["tasks"].get(t, {}).get("final_mean", np.nan) for t in tasks]
            stds = [v["tasks"].get(t, {}).get("final_std", 0.0) for t in tasks]
            pos = x - 0.4 + width * (i + 0.5)
            ax.bar(pos, means, width, yerr=stds, color=colors[label], label=label, capsize=2)
            refs = [ref_number(v["tasks"].get(t, {}).get("ref")) for t in tasks]
            rx = [p for p, r in zip(pos, refs) if r is not None]
            if rx:
                ax.scatter(rx, [r for r in refs if r is not None], marker="x", color="k", zorder=3, s=25)
        ax.set_xticks(x)
        ax.set_xticklabels(tasks, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("final return (mean ± std over seeds)")
        ax.set_title("Final return per task (x: reference)", fontsize=10)
        _legend(fig, np.array([[ax]]))
        figs["final_return_bars"] = _save(fig, out, "final_return_bars.png")

    keys = [k for k in LOSS_KEYS if any(k in v["curves"]["loss"] for v in policy.values())]
    if keys:
        figs["loss_curves"] = _curve_grid(plt, policy, colors, "loss", keys,
                                          "Training curves (median over runs, band: interquartile range)", "loss_curves.png", out)

    keys = [k for k in DIAG_KEYS if any(k in v["curves"]["diagnostics"] for v in policy.values())]
    if keys:
        figs["diagnostics"] = _curve_grid(plt, policy, colors, "diagnostics", keys,
                                          "Diagnostics (median over runs, band: interquartile range)", "diagnostics.png", out)

    pre = {k: v for k, v in data["variants"].items() if v["mode"] == "pretrain_wm" and v["pretrain"]["curve"]}
    if pre:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, v in pre.items():
            it, loss = zip(*v["pretrain"]["curve"])
            ax.plot(it, loss, color=colors[label], label=label)
            if v["pretrain"]["reference"]:
                ax.axhline(v["pretrain"]["reference"][0], color=colors[label], ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("WM loss")
        ax.legend(fontsize=7)
        ax.set_title("WM pretraining (dashed: reference best)", fontsize=10)
        figs["pretrain_loss"] = _save(fig, out, "pretrain_loss.png")
    return figs


def _curve_grid(plt, policy: dict, colors: dict, kind: str, keys: list[str], title: str, name: str, out: str) -> str:
    """One panel per key: median over runs vs epoch per variant, interquartile band."""
    ncol = min(4, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 2.8 * nrow), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        for label, v in policy.items():
            d = v["curves"][kind].get(k)
            if not d:
                continue
            ep = np.array(sorted(d))
            med = np.array([np.median(d[e]) for e in ep])
            q1 = np.array([np.percentile(d[e], 25) for e in ep])
            q3 = np.array([np.percentile(d[e], 75) for e in ep])
            ax.plot(ep, med, color=colors[label], label=label, lw=1.2, marker="." if len(ep) < 20 else None)
            ax.fill_between(ep, q1, q3, color=colors[label], alpha=0.2, lw=0)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    _legend(fig, axes)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out, name)


def _legend(fig, axes) -> None:
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        width, height = fig.get_size_inches()
        ncol = max(1, min(len(labels), int(width // 7.5)))
        nrows = math.ceil(len(labels) / ncol)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, min(0.5, (0.1 + 0.17 * nrows) / height), 1, 0.95))
    else:
        fig.tight_layout(rect=(0, 0, 1, 0.95))


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


# ======================================================================================== rendering


def _f(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _pm(mean, std, digits: int = 1) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _sci(x) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "–"
    return f"{x:.3g}"


def build_blocks(data: dict, figs: dict[str, str]) -> list[tuple]:
    """The report as blocks: ('h', level, text) | ('p', text) | ('table', header, rows) | ('img', name, path)."""
    B: list[tuple] = [("h", 1, "fmbpo_jax results")]
    V = data["variants"]
    B.append(("p", f"{len(data['runs'])} run director{'y' if len(data['runs']) == 1 else 'ies'}, {len(V)} variant(s)."))
    rows = []
    for r in data["runs"]:
        c = r["config"]
        rows.append([r["workdir"], variant_label(c), str(c.get("phase", 0)), str(len(r["runs"])),
                     f"{r['epochs_done']}/{c.get('epochs', '?') if c.get('mode', 'policy') == 'policy' else _cfg_get(c, 'pretrain.iters', '?')}",
                     "complete" if r["complete"] else "incomplete"])
    B.append(("table", ["run directory", "variant", "phase", "runs", "epochs done", "status"], rows))
    for w in data["warnings"]:
        B.append(("p", "Warning: " + w))
    policy = {k: v for k, v in V.items() if v["mode"] == "policy"}

    if policy:
        B.append(("h", 2, "Aggregate over tasks (final evaluation return)"))
        rows = [[label, str(v["aggregate"]["tasks"]), str(v["aggregate"]["runs"]), _f(v["aggregate"]["final_mean"]),
                 _f(v["aggregate"]["final_median"]), _f(v["aggregate"]["final_iqm"]), _f(v["aggregate"]["best_mean"]),
                 _f(v["aggregate"]["best_iqm"])] for label, v in policy.items()]
        B.append(("table", ["variant", "tasks", "runs", "mean", "median (task means)", "IQM", "best: mean", "best: IQM"], rows))

        B.append(("h", 2, "Per-task results"))
        B.append(("p", "Mean ± std over seeds (ddof=1). 'final' is the final evaluation (results.csv), 'best' the best "
                       "periodic evaluation, 'planning' the planning evaluation (MPPI in the fixed preset, a second plain "
                       "evaluation in the reference preset, B8). 'reference' is the recorded final return of spec section 8 "
                       "for the same phase and variant; * marks runs still training (final = last evaluation)."))
        for label, v in policy.items():
            ref = v["reference"]
            B.append(("h", 3, label))
            if ref:
                note = f" Reference row: {ref['label']} ({ref['epochs']} epochs"
                epochs = int(v["config"].get("epochs", 0))
                note += ")" if epochs == ref["epochs"] else f"; this variant: {epochs} epochs)"
                note += f"; {ref['note']}." if ref.get("note") else "."
                B.append(("p", note.strip()))
            header = ["task", "seeds", "final", "best", "planning", "final success", "planning success"] + (["reference"] if ref else [])
            rows = []
            for t, r in v["tasks"].items():
                row = [t + (" *" if r["incomplete"] else ""), str(r["n"]), _pm(r["final_mean"], r["final_std"]),
                       _pm(r["best_mean"], r["best_std"]), _pm(r["planning_mean"], r["planning_std"]),
                       _f(r["final_success_mean"], 2), _f(r["planning_success_mean"], 2)]
                if ref:
                    row.append(_ref_cell(r["ref"]))
                rows.append(row)
            B.append(("table", header, rows))

        B.append(("h", 2, "Training time"))
        B.append(("p", "Wall time = largest total_time logged (compile and evaluation waits included, final evaluation not), "
                       "summed over the variant's run directories; each directory trains all its (task, seed) runs in one "
                       "program. The reference ran one job per (task, seed); its s/epoch includes data loading and evaluations."))
        rows = []
        for label, v in policy.items():
            tm, ref = v["timing"], v["reference"]
            rows.append([label, f"{tm['wall_s'] / 3600:.3f}", str(tm["epochs_done"]), str(tm["task_epochs"]),
                         _f(tm["task_epochs_per_s"], 2), f"{tm['s_per_epoch']:.4f}",
                         f"{ref['s_per_epoch']:.2f} ({ref['gpu']})" if ref else "–"])
        B.append(("table", ["variant", "wall h", "epochs done", "task-epochs", "task-epochs/s", "s/epoch (program)",
                            "reference s/epoch (one task)"], rows))

        B.append(("h", 2, "Compute-normalised"))
        B.append(("p", f"GPU-hours per run = wall time x {data['gpus_per_run']:g} GPU(s) / 3600 / runs in the program. "
                       "FLOPs from `fmbpo_jax.report.epoch_flops` (2mnk per matmul, backward = 2x forward, WM + actor + critic "
                       "matmuls of one epoch of one run) x epochs done. Returns are the mean final return over all runs. "
                       "Reference rows: the mean of the recorded per-task returns that are numbers, the recorded runtime per job "
                       "and the FLOPs of the reference preset's phase config."))
        rows = []
        for label, v in policy.items():
            cm = v["compute"]
            rows.append([label, _f(v["aggregate"]["final_mean"]), f"{cm['gpu_hours_per_run']:.4g}", _f(cm["return_per_gpu_hour"]),
                         _sci(cm["flops_per_epoch"]), _sci(cm["flops_per_run"]), _sci(cm["return_per_tflop"])])
            ref = v["reference"]
            if ref:
                rr = reference_compute(ref)
                rows.append([f"reference: {ref['label']}", _f(rr["mean_return"]), _f(rr["gpu_hours_per_run"], 3),
                             _f(rr["return_per_gpu_hour"]), _sci(rr["flops_per_epoch"]), _sci(rr["flops_per_run"]),
                             _sci(rr["return_per_tflop"])])
        B.append(("table", ["variant", "mean final return", "GPU-h per run", "return / GPU-h", "FLOPs / epoch",
                            "FLOPs / run", "return / 10^12 FLOPs"], rows))

    diag = {k: v for k, v in policy.items() if v["curves"]["diagnostics"]}
    if diag:
        B.append(("h", 2, "Diagnostics"))
        B.append(("p", "From diagnostics.jsonl (fmbpo_jax.diagnostics.epoch_diagnostics): actor-gradient ESNR in dB over "
                       "groups of start states, and RMS Frobenius norms of the WM macro-step Jacobians dF/dz and dF/da "
                       "(random-probe VJP estimates). Median over runs at the first and the last diagnosed epoch."))
        rows = []
        for label, v in diag.items():
            d = v["curves"]["diagnostics"]
            cells = [label]
            for k in DIAG_KEYS:
                if k in d and d[k]:
                    e0, e1 = min(d[k]), max(d[k])
                    cells.append(f"{np.median(d[k][e0]):.3g} → {np.median(d[k][e1]):.3g} (epochs {e0} → {e1})")
                else:
                    cells.append("–")
            rows.append(cells)
        B.append(("table", ["variant", *DIAG_KEYS], rows))

    pre = {k: v for k, v in V.items() if v["mode"] == "pretrain_wm"}
    if pre:
        B.append(("h", 2, "World-model pretraining"))
        rows = []
        for label, v in pre.items():
            p = v["pretrain"]
            ref = p["reference"]
            rows.append([label, str(p["iters"]), f"{p['best_wm_loss']:.4f}", str(p["best_iter"]), f"{p['time_s'] / 3600:.3f}",
                         f"{ref[0]:.4f} (at {ref[1] // 1000}k)" if ref else "–"])
        B.append(("table", ["variant", "iterations", "best loss", "at iteration", "wall h", "reference best"], rows))

    if figs:
        B.append(("h", 2, "Figures"))
        titles = {"eval_curves": "Evaluation return vs epoch", "loss_curves": "Training curves",
                  "final_return_bars": "Final return per task", "pretrain_loss": "WM pretraining loss",
                  "diagnostics": "Gradient ESNR and WM Jacobian proxies"}
        for name, path in figs.items():
            B.append(("img", titles.get(name, name), path))
    return B


def reference_compute(ref: dict) -> dict:
    """Mean recorded return, GPU-hours per job, return per GPU-hour and per 10^12 FLOPs of a reference row."""
    vals = [ref_number(v) for v in ref["returns"].values()]
    vals = [v for v in vals if v is not None]
    mean = float(np.mean(vals)) if vals else float("nan")
    hours = ref["runtime_min"] / 60.0 if ref.get("runtime_min") else float("nan")
    cfg = reference_config(ref)
    fe = epoch_flops(cfg) if cfg else float("nan")
    fr = fe * ref["epochs"]
    return {"mean_return": mean, "gpu_hours_per_run": hours, "return_per_gpu_hour": mean / hours if hours > 0 else float("nan"),
            "flops_per_epoch": fe, "flops_per_run": fr, "return_per_tflop": mean / (fr / 1e12) if fr > 0 else float("nan")}


def render_md(blocks: list[tuple], out: str) -> str:
    lines = []
    for b in blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "table":
            header, rows = b[1], b[2]
            esc = lambda s: str(s).replace("|", "\\|")
            lines.append("| " + " | ".join(esc(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif b[0] == "img":
            lines += [f"![{b[1]}]({os.path.relpath(b[2], out)})", ""]
    return "\n".join(lines)


def render_html(blocks: list[tuple]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fmbpo_jax results</title><style>",
             "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 8px;"
             "font-size:13px;text-align:right}td:first-child,th:first-child{text-align:left}th{background:#eee}"
             "img{max-width:100%}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1]) + "</tr>")
            for row in b[2]:
                parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
            parts.append("</table>")
        elif b[0] == "img":
            with open(b[2], "rb") as f:
                enc = base64.b64encode(f.read()).decode("ascii")
            parts.append(f"<h3>{html.escape(b[1])}</h3><img alt='{html.escape(b[1])}' src='data:image/png;base64,{enc}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(run_dirs: list[str], out: str, fmt: str = "md", gpus_per_run: float = 1.0) -> dict:
    """Read the runs, write DIR/report.md (+ report.html for fmt='html') and the PNGs.

    Returns the data structure: {'variants': {label: {'tasks': {task: {'n', 'seeds', 'final_mean', 'final_std',
    'best_mean', ..., 'ref'}}, 'aggregate', 'timing', 'compute', 'reference', 'curves', 'workdirs', ...}},
    'runs', 'warnings', 'figures': {name: path}, 'report_md': path, 'report_html': path | None}.
    """
    if fmt not in ("md", "html"):
        raise ValueError(f"--format {fmt!r}: md | html")
    if not run_dirs:
        raise ValueError("no run directories given")
    os.makedirs(out, exist_ok=True)
    data = collect(run_dirs, gpus_per_run)
    figs = make_figures(data, out)
    blocks = build_blocks(data, figs)
    md_path = os.path.join(out, "report.md")
    with open(md_path, "w") as f:
        f.write(render_md(blocks, out))
    html_path = None
    if fmt == "html":
        html_path = os.path.join(out, "report.html")
        with open(html_path, "w") as f:
            f.write(render_html(blocks))
    data.update(figures=figs, report_md=md_path, report_html=html_path)
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="run directories (workdirs of fmbpo_jax.main)")
    p.add_argument("--out", required=True, help="output directory for report.md / report.html and the PNGs")
    p.add_argument("--format", default="md", choices=("md", "html"))
    p.add_argument("--gpus-per-run", type=float, default=1.0,
                   help="accelerators each run directory trained on (for GPU-hours; default 1)")
    a = p.parse_args(argv)
    try:
        data = build_report(a.run_dirs, a.out, a.format, a.gpus_per_run)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {data['report_html'] or data['report_md']} ({len(data['variants'])} variant(s), {len(data['figures'])} figure(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
