"""Plain-text I/O shared by the tools: JSONL and CSV logs in, Markdown tables and JSON files out.

The trainer's logs (metrics.jsonl, eval.jsonl, diagnostics.jsonl, pretrain.jsonl, results.csv) are read here by
the report; `markdown_table` is the one table printer (the bench's table, the report's tables).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Sequence


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
