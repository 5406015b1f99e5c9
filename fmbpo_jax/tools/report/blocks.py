"""The report as a list of blocks, independent of the output format (render.py writes Markdown or HTML).

Blocks: ('h', level, text) | ('p', text) | ('table', header, rows) | ('img', title, path).
"""
from __future__ import annotations

import math

import numpy as np

from fmbpo_jax.tools.report.aggregate import DIAG_KEYS
from fmbpo_jax.tools.report.references import cfg_get, ref_cell, reference_compute
from fmbpo_jax.tools.report.runs import variant_label

FIGURE_TITLES = {"eval_curves": "Evaluation return vs epoch", "loss_curves": "Training curves",
                 "final_return_bars": "Final return per task", "pretrain_loss": "WM pretraining loss",
                 "diagnostics": "Gradient ESNR and WM Jacobian proxies"}


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


def _runs_section(data: dict) -> list[tuple]:
    V = data["variants"]
    B: list[tuple] = [("h", 1, "fmbpo_jax results"),
                      ("p", f"{len(data['runs'])} run director{'y' if len(data['runs']) == 1 else 'ies'}, {len(V)} variant(s).")]
    rows = []
    for r in data["runs"]:
        c = r["config"]
        mode = c.get('mode', 'policy')
        total = {'pretrain_wm': cfg_get(c, 'pretrain.iters', '?'), 'online': cfg_get(c, 'online.env_steps', '?')}.get(
            mode, c.get('epochs', '?'))
        rows.append([r["workdir"], variant_label(c), str(c.get("phase", 0)), str(len(r["runs"])),
                     f"{r.get('env_steps_done', r['epochs_done'])}/{total}", "complete" if r["complete"] else "incomplete"])
    B.append(("table", ["run directory", "variant", "phase", "runs", "epochs (online: env steps) done", "status"], rows))
    return B + [("p", "Warning: " + w) for w in data["warnings"]]


def _aggregate_section(policy: dict) -> list[tuple]:
    rows = [[label, str(v["aggregate"]["tasks"]), str(v["aggregate"]["runs"]), _f(v["aggregate"]["final_mean"]),
             _f(v["aggregate"]["final_median"]), _f(v["aggregate"]["final_iqm"]), _f(v["aggregate"]["best_mean"]),
             _f(v["aggregate"]["best_iqm"])] for label, v in policy.items()]
    return [("h", 2, "Aggregate over tasks (final evaluation return)"),
            ("table", ["variant", "tasks", "runs", "mean", "median (task means)", "IQM", "best: mean", "best: IQM"], rows)]


def _variant_tasks(label: str, v: dict) -> list[tuple]:
    """One variant's per-task table (with the reference column when a reference row matches)."""
    ref = v["reference"]
    B: list[tuple] = [("h", 3, label)]
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
            row.append(ref_cell(r["ref"]))
        rows.append(row)
    return B + [("table", header, rows)]


def _per_task_section(policy: dict) -> list[tuple]:
    B: list[tuple] = [("h", 2, "Per-task results"),
                      ("p", "Mean ± std over seeds (ddof=1). 'final' is the final evaluation (results.csv), 'best' the best "
                            "periodic evaluation, 'planning' the planning evaluation (MPPI in the fixed preset, a second plain "
                            "evaluation in the reference preset, B8). 'reference' is the recorded final return of spec section 8 "
                            "for the same phase and variant; * marks runs still training (final = last evaluation).")]
    for label, v in policy.items():
        B += _variant_tasks(label, v)
    return B


def _timing_section(policy: dict) -> list[tuple]:
    rows = []
    for label, v in policy.items():
        tm, ref = v["timing"], v["reference"]
        rows.append([label, f"{tm['wall_s'] / 3600:.3f}", str(tm["epochs_done"]), str(tm["task_epochs"]),
                     _f(tm["task_epochs_per_s"], 2), f"{tm['s_per_epoch']:.4f}",
                     f"{ref['s_per_epoch']:.2f} ({ref['gpu']})" if ref else "–"])
    return [("h", 2, "Training time"),
            ("p", "Wall time = largest total_time logged (compile and evaluation waits included, final evaluation not), "
                  "summed over the variant's run directories; each directory trains all its (task, seed) runs in one "
                  "program. The reference ran one job per (task, seed); its s/epoch includes data loading and evaluations."),
            ("table", ["variant", "wall h", "epochs done", "task-epochs", "task-epochs/s", "s/epoch (program)",
                       "reference s/epoch (one task)"], rows)]


def _compute_section(policy: dict, gpus_per_run: float) -> list[tuple]:
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
    return [("h", 2, "Compute-normalised"),
            ("p", f"GPU-hours per run = wall time x {gpus_per_run:g} GPU(s) / 3600 / runs in the program. "
                  "FLOPs: the matmul FLOPs the algorithm needs per epoch of one run (`fmbpo_jax.tools.flops`: 2mnk per "
                  "matmul, a weight or input gradient the same; WM + actor + critic) x epochs done. Returns are the mean "
                  "final return over all runs. Reference rows: the mean of the recorded per-task returns that are numbers, "
                  "the recorded runtime per job and the FLOPs of the reference preset's phase config."),
            ("table", ["variant", "mean final return", "GPU-h per run", "return / GPU-h", "FLOPs / epoch",
                       "FLOPs / run", "return / 10^12 FLOPs"], rows)]


def _diagnostics_section(diag: dict) -> list[tuple]:
    rows = []
    for label, v in diag.items():
        d = v["curves"]["diagnostics"]
        cells = [label]
        for k in DIAG_KEYS:
            if k in d and d[k]:
                e0, e1 = min(d[k]), max(d[k])
                x = "env steps" if v["curves"].get("x") == "env steps" else "epochs"
                cells.append(f"{np.median(d[k][e0]):.3g} → {np.median(d[k][e1]):.3g} ({x} {e0} → {e1})")
            else:
                cells.append("–")
        rows.append(cells)
    return [("h", 2, "Diagnostics"),
            ("p", "From diagnostics.jsonl (fmbpo_jax.diagnostics.epoch_diagnostics): actor-gradient ESNR in dB over "
                  "groups of start states, and RMS Frobenius norms of the WM macro-step Jacobians dF/dz and dF/da "
                  "(random-probe VJP estimates). Median over runs at the first and the last diagnosed epoch."),
            ("table", ["variant", *DIAG_KEYS], rows)]


def _pretrain_section(pre: dict) -> list[tuple]:
    rows = []
    for label, v in pre.items():
        p = v["pretrain"]
        ref = p["reference"]
        rows.append([label, str(p["iters"]), f"{p['best_wm_loss']:.4f}", str(p["best_iter"]), f"{p['time_s'] / 3600:.3f}",
                     f"{ref[0]:.4f} (at {ref[1] // 1000}k)" if ref else "–"])
    return [("h", 2, "World-model pretraining"),
            ("table", ["variant", "iterations", "best loss", "at iteration", "wall h", "reference best"], rows)]


def build_blocks(data: dict, figs: dict[str, str]) -> list[tuple]:
    """The report as blocks (see the module docstring), section by section."""
    V = data["variants"]
    B = _runs_section(data)
    policy = {k: v for k, v in V.items() if v["mode"] != "pretrain_wm"}  # policy training, offline or online
    if policy:
        B += _aggregate_section(policy) + _per_task_section(policy) + _timing_section(policy)
        B += _compute_section(policy, data["gpus_per_run"])
    diag = {k: v for k, v in policy.items() if v["curves"]["diagnostics"]}
    if diag:
        B += _diagnostics_section(diag)
    pre = {k: v for k, v in V.items() if v["mode"] == "pretrain_wm"}
    if pre:
        B += _pretrain_section(pre)
    if figs:
        B.append(("h", 2, "Figures"))
        B += [("img", FIGURE_TITLES.get(name, name), path) for name, path in figs.items()]
    return B
