"""``python -m fmbpo_jax.report RUN_DIR [RUN_DIR ...] --out DIR [--format md|html] [--gpus-per-run N]``."""
from __future__ import annotations

import argparse
import os
import sys

from fmbpo_jax.tools.report.aggregate import collect
from fmbpo_jax.tools.report.blocks import build_blocks
from fmbpo_jax.tools.report.figures import make_figures
from fmbpo_jax.tools.report.render import render_html, render_md

DESCRIPTION = "Results people can look at: tables, learning curves and compute-normalised views of trained runs."


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
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.report", description=DESCRIPTION)
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
