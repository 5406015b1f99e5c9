"""The report's figures (PNG): evaluation return vs epoch per task, final return per task, training-loss and
diagnostics curves, WM pretraining loss. matplotlib is imported only to draw (the Agg backend)."""
from __future__ import annotations

import math
import os

import numpy as np

from fmbpo_jax.tools.report.aggregate import DIAG_KEYS, LOSS_KEYS, mean_std, task_order
from fmbpo_jax.tools.report.references import ref_number


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


def _x_label(policy: dict) -> str:
    """'env steps' when every variant's curves are in env steps (online runs), else 'epoch'."""
    xs = {v["curves"].get("x", "epoch") for v in policy.values()}
    return xs.pop() if len(xs) == 1 else "epoch (offline) / env steps (online)"


def _eval_curves(plt, policy: dict, colors: dict, tasks: list[str], out: str) -> str:
    """One panel per task: mean +- std over seeds of the evaluation return vs epoch per variant; dashed: reference."""
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
            sd = np.array([mean_std(d[e])[1] for e in ep])
            lo, hi = mean - sd, mean + sd
            ax.plot(ep, mean, color=colors[label], label=label, lw=1.5, marker="." if len(ep) < 20 else None)
            ax.fill_between(ep, lo, hi, color=colors[label], alpha=0.2, lw=0)
            ref = ref_number(v["tasks"].get(t, {}).get("ref"))
            if ref is not None:
                ax.axhline(ref, color=colors[label], ls="--", lw=0.8)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(_x_label(policy), fontsize=8)
        ax.set_ylabel("eval return", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    _legend(fig, axes)
    fig.suptitle("Evaluation return (mean ± std over seeds; dashed: reference final)", fontsize=10)
    return _save(fig, out, "eval_curves.png")


def _final_return_bars(plt, policy: dict, colors: dict, tasks: list[str], out: str) -> str:
    """Final return per task (mean +- std over seeds) per variant; x: the reference's recorded final return."""
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
    return _save(fig, out, "final_return_bars.png")


def _pretrain_loss(plt, pre: dict, colors: dict, out: str) -> str:
    """WM pretraining loss vs iteration per variant (log scale); dashed: the reference's best."""
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
    return _save(fig, out, "pretrain_loss.png")


def make_figures(data: dict, out: str) -> dict[str, str]:
    """Write the PNGs; returns {name: path}."""
    plt = _plt()
    policy = {k: v for k, v in data["variants"].items() if v["mode"] != "pretrain_wm"}  # offline or online
    figs: dict[str, str] = {}
    colors = dict(zip(data["variants"], _colors(len(data["variants"]))))
    tasks = sorted({t for v in policy.values() for t in v["tasks"]}, key=task_order)
    if tasks:
        figs["eval_curves"] = _eval_curves(plt, policy, colors, tasks, out)
        figs["final_return_bars"] = _final_return_bars(plt, policy, colors, tasks, out)
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
        figs["pretrain_loss"] = _pretrain_loss(plt, pre, colors, out)
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
        ax.set_xlabel(_x_label(policy), fontsize=8)
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
