"""One run directory as the report reads it: config, logs, results, timing; and the variant it belongs to.

A variant is (phase, model size, WM type and its integrator/K, actor type and its integrator/K, preset, epochs,
frozen or fine-tuned WM); run directories of the same variant are merged by `aggregate.collect`.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

from fmbpo_jax.tools.report.references import cfg_get, config_selectors
from fmbpo_jax.textio import read_jsonl, read_results_csv


def load_run(workdir: str) -> dict:
    """One run directory: its config, logs, results and timing."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: no config.json (not a fmbpo_jax run directory)")
    with open(path) as f:
        config = json.load(f)
    run = {
        "workdir": workdir, "config": config,
        "metrics": read_jsonl(os.path.join(workdir, "metrics.jsonl")),
        "evals": read_jsonl(os.path.join(workdir, "eval.jsonl")),
        "results": read_results_csv(os.path.join(workdir, "results.csv")),
        "pretrain": read_jsonl(os.path.join(workdir, "pretrain.jsonl")),
        "diagnostics": read_jsonl(os.path.join(workdir, "diagnostics.jsonl")),
    }
    run["complete"] = bool(run["pretrain"]) if config.get("mode", "policy") == "pretrain_wm" else bool(run["results"])
    run["runs"] = sorted({(r["task"], int(r["seed"])) for r in run["metrics"]} | {(r["task"], int(r["seed"])) for r in run["results"]})
    chunk = int(config.get("chunk_epochs", 1) or 1)
    epochs = int(config.get("epochs", 0))
    if run["metrics"] and config.get("mode") == "online":  # online: one row per episode; epoch = updates done
        run["env_steps_done"] = max(int(r["env_steps"]) for r in run["metrics"])
        run["epochs_done"] = max(int(r["epoch"]) for r in run["metrics"])
        run["total_time"] = max(float(r.get("total_time", 0.0)) for r in run["metrics"])
    elif run["metrics"]:
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
    """What makes runs comparable: (phase, mode, size, WM, its integrator and K, actor, its integrator and K,
    preset, epochs, fine-tuned)."""
    sel = config_selectors(config)
    return (int(config.get("phase", 0) or 0), config.get("mode", "policy"), cfg_get(config, "model.size", "?"),
            sel["world_model"], sel.get("integrator"), sel.get("wm_substeps"), sel["actor"],
            cfg_get(config, "model.actor_integrator", "heun") if sel["actor"] == "flow" else None, sel.get("actor_substeps"),
            config.get("preset", "fixed"), int(config.get("epochs", 0)), sel["finetune_wm"])


def variant_label(config: dict) -> str:
    phase, mode, size, wm, wint, wk, actor, aint, ak, preset, epochs, ft = variant_key(config)
    wm_s = f"flow WM ({wint} K{wk})" if wm == "flow" else "MLP WM"
    if mode == "pretrain_wm":
        return f"p{phase} {wm_s} pretraining | {size}"
    act_s = f"flow actor ({aint} K{ak})" if actor == "flow" else "Gaussian actor"
    ep = f"{epochs // 1000}k" if epochs >= 1000 and epochs % 1000 == 0 else str(epochs)
    if mode == "online":
        return f"online {wm_s} + {act_s} | {preset} | {size}"
    return f"p{phase} {wm_s} + {act_s} | {'fine-tuned' if ft else 'frozen'} WM | {preset} | {ep} ep | {size}"


def run_records(run: dict) -> dict[tuple[str, int], dict]:
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
