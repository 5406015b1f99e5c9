"""Blocks (blocks.py) -> report.md (figures as relative links) or a self-contained report.html (figures embedded)."""
from __future__ import annotations

import base64
import html
import os

from fmbpo_jax.textio import markdown_table


def render_md(blocks: list[tuple], out: str) -> str:
    lines = []
    for b in blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "table":
            lines += [markdown_table(b[1], b[2], align=False), ""]
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
