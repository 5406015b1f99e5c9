"""The bench's results: the JSON file (meta, rows, derived vmap ratios) and the printed table."""
from __future__ import annotations

from fmbpo_jax.textio import markdown_table, write_json

TABLE_COLS = [
    ("variant", "variant"), ("size", "size"), ("tasks", "T"), ("seeds", "S"), ("precision", "precision"),
    ("remat", "remat"), ("compile_s", "compile s"), ("median_s_epoch", "median s/ep"), ("min_s_epoch", "min s/ep"),
    ("task_epochs_s", "task-ep/s"), ("gflop_epoch", "GFLOP/ep"), ("gflop_naive_epoch", "naive GFLOP/ep"),
    ("achieved_gflops", "GFLOP/s"), ("peak_gflops", "peak GFLOP/s"), ("mfu", "MFU"), ("peak_mem_gb", "peak mem GB"),
    ("program_mem_gb", "prog mem GB"), ("ref_s_epoch", "ref s/ep"), ("speedup_vs_ref", "x ref"),
]


def format_value(v) -> str:
    """A table cell: floats to 3 significant digits (0 decimals from 100, 2 from 1), everything else as str."""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def _vmap_check_line(r: dict) -> str:
    if "error" in r:
        return f"vmap-check {r['variant']} {r['size']} T={r['tasks']} {r['precision']}: ERROR {r['error']}"
    return (f"vmap-check {r['variant']} {r['size']} {r['precision']}: {r['tasks']} tasks in one program "
            f"{r['multi_s_epoch']:.3f} s/epoch vs {r['tasks']} single-task programs one after another "
            f"{r['sequential_s_epoch']:.3f} s/epoch: ratio {r['ratio']:.3f} (target <= 0.5)")


def format_rows(rows: list[dict]) -> str:
    """The bench rows as an aligned Markdown table (columns some row has), then one line per vmap-check row."""
    bench = [r for r in rows if r.get("kind") != "vmap-check"]
    out = []
    if bench:
        cols = [(k, h) for k, h in TABLE_COLS if any(k in r for r in bench)]
        cells = [[("ERROR: " + r["error"]) if k == "compile_s" and "error" in r else format_value(r.get(k, "")) for k, _ in cols]
                 for r in bench]
        out.append(markdown_table([h for _, h in cols], cells))
    out += [_vmap_check_line(r) for r in rows if r.get("kind") == "vmap-check"]
    return "\n".join(out)


def derived_vmap_ratios(rows: list[dict]) -> list[dict]:
    """From rows of the same variant/precision at T=1 and T=N: N-task time / (N x 1-task time)."""
    out = []
    ok = [r for r in rows if r.get("kind") != "vmap-check" and "error" not in r and "median_s_epoch" in r]
    for r in ok:
        if r["tasks"] <= 1 or r["mode"] != "policy":
            continue
        for s in ok:
            if (s["tasks"] == 1 and s["variant"] == r["variant"] and s["precision"] == r["precision"]
                    and s["size"] == r["size"] and s["seeds"] == r["seeds"]):
                out.append({"variant": r["variant"], "size": r["size"], "precision": r["precision"], "tasks": r["tasks"],
                            "ratio": r["median_s_epoch"] / (r["tasks"] * s["median_s_epoch"])})
    return out


def write_results(path: str, meta: dict, rows: list[dict]) -> None:
    """--json: {'meta', 'rows', 'derived_vmap_ratios'}, rewritten after every row (nothing when path is '')."""
    if path:
        write_json(path, {"meta": meta, "rows": rows, "derived_vmap_ratios": derived_vmap_ratios(rows)})
