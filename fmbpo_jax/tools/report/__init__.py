"""Results people can look at: tables, learning curves and compute-normalised views of trained runs.

    python -m fmbpo_jax.report RUN_DIR [RUN_DIR ...] --out DIR [--format md|html] [--gpus-per-run N]

Reads every run directory's `config.json`, `metrics.jsonl`, `eval.jsonl`, `results.csv` (and `pretrain.jsonl`
for WM pretraining, `diagnostics.jsonl` when the trainer wrote diagnostics), groups the runs by variant and
writes DIR/report.md (plus DIR/report.html with the figures embedded when --format html) and PNG figures:

- per-task tables: mean +- std over seeds of the final, best and planning evaluation returns and the success
  rates, next to the reference's recorded numbers when the phase matches (config.phase);
- an aggregate over tasks: mean, median and IQM (interquartile mean) of the final return;
- training time, task-epochs/s, and returns per GPU-hour and per 10^12 FLOPs (`fmbpo_jax.tools.flops`);
- figures: evaluation return vs epoch per task (seeds as a band, variants in one panel), training loss curves,
  a bar chart of the final return per task per variant, and (when present) the actor-gradient ESNR and WM
  Jacobian proxies vs epoch.

A run without results.csv (still training) reports its last evaluation as "final" and is marked. Nothing here
needs JAX; matplotlib is imported only to draw.

Modules: references (the reference's recorded results), runs (one run directory, variants), aggregate (numbers
per variant), figures, blocks (the report's content), render (Markdown, HTML), cli.
"""
from fmbpo_jax.tools.report.aggregate import collect, iqm
from fmbpo_jax.tools.report.cli import build_report, main
from fmbpo_jax.tools.report.references import REFERENCE_PRETRAIN, REFERENCE_RESULTS, ref_number, reference_row

__all__ = ["REFERENCE_PRETRAIN", "REFERENCE_RESULTS", "build_report", "collect", "iqm", "main", "ref_number", "reference_row"]
