"""Plain-text I/O shared by the trainer and the tools: JSONL and CSV logs in and out, Markdown tables, JSON files.

The trainer writes its logs (metrics.jsonl, eval.jsonl, diagnostics.jsonl, pretrain.jsonl, results.csv) with these
functions and the report reads them back with these functions; `markdown_table` is the one table printer (the
trainer's results table, the demo's, the bench's, the report's). No jax here: the report runs without it.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Callable, Sequence


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped); [] when the file does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_results_csv(path: str) -> list[dict]:
    """results.csv rows: 'seed' as int, 'task' as str, every other number as float (text kept when not a number);
    [] when the file does not exist."""
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


def write_json(path: str, obj) -> None:
    """Write obj as indented JSON (non-JSON values as str) through a temporary file, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: bool = True) -> str:
    """A Markdown table of text cells ('|' in a cell escaped).

    align: pad every column to its widest cell (readable as plain text: the bench's and the trainer's tables);
    otherwise single spaces and '---' rules (the report's Markdown).
    """
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    header = [esc(h) for h in header]
    rows = [[esc(c) for c in row] for row in rows]
    if not align:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(row) for row in rows])


def append_jsonl(path: str, rows: list[dict]) -> None:
    """Append rows to a JSONL log, flushed to disk (a kill -9 right after keeps them)."""
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path: str, keep: Callable[[dict], bool]) -> None:
    """Keep only the rows of a JSONL log that `keep` accepts (rows written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    rows = read_jsonl(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            if keep(r):
                f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def write_csv(path: str, rows: list[dict]) -> None:
    """rows (the first row's keys as the header) to a CSV file, atomically."""
    if not rows:
        return
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def rows_table(rows: list[dict], cols: list[str]) -> str:
    """`markdown_table` of dict rows: floats with one decimal, missing cells empty (results and demo tables)."""
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    return markdown_table(cols, [[fmt(r.get(c, "")) for c in cols] for r in rows])
