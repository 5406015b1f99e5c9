"""Matmul FLOPs of a compiled XLA program, read from its optimized HLO text (`compiled.as_text()`).

XLA's own `cost_analysis()` counts a while loop's body once, whatever its trip count, so it undercounts every
`lax.scan` (horizon, substeps, critic steps, epochs). This walks the program instead: each `dot` costs
2 x (output elements) x (contracted size), and a computation called by a while loop counts `known_trip_count`
times (fusions, calls and conditional branches once). Used to check the analytic model of `tools.flops`.
Limits: dots that XLA rewrote into other ops (e.g. a matrix-vector product into a reduction) or library calls
(cuBLAS custom-calls on GPU) are not seen; read it on the CPU backend.
"""
from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .*\{$")
_PARAM = re.compile(r"(\S+): \w+\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_ARRAY_DIMS = re.compile(r"^\w+\[([\d,]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class _Computation:
    dims: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # value name -> array dims
    dots: list[tuple[list[int], str, list[int]]] = dataclasses.field(default_factory=list)  # (out dims, lhs, lhs contracting)
    calls: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)  # (callee, times; None = unknown)


def _dims(text: str) -> list[int] | None:
    m = _ARRAY_DIMS.match(text)
    return [int(x) for x in m.group(1).split(",") if x] if m else None


def _split_shape(body: str) -> tuple[str, str]:
    """'f32[2,3]{1,0} dot(...)' or '(s32[], f32[2]) while(...)' -> (shape, 'op(...)...')."""
    if not body.startswith("("):
        shape, _, rest = body.partition(" ")
        return shape, rest
    depth = 0
    for i, ch in enumerate(body):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return body[:i + 1], body[i + 2:]
    raise ValueError(f"unbalanced tuple shape in HLO: {body[:80]!r}")


def _add_instruction(comp: _Computation, name: str, body: str) -> None:
    shape, rest = _split_shape(body)
    m = re.match(r"([\w-]+)\((.*)$", rest)
    if not m:
        return
    op, args = m.groups()
    comp.dims[name] = _dims(shape)
    if op == "dot":
        lhs = re.match(r"\s*%([\w.\-]+)", args).group(1)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", args).group(1)
        comp.dots.append((comp.dims[name], lhs, [int(x) for x in contracting.split(",") if x]))
    elif op == "while":
        trip = _TRIP_COUNT.search(args)
        comp.calls.append((re.search(r"body=%([\w.\-]+)", args).group(1), int(trip.group(1)) if trip else None))
    else:
        comp.calls += [(c, 1) for c in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", args)]
        branches = re.search(r"branch_computations=\{([^}]*)\}", args)
        if branches:
            comp.calls += [(c, 1) for c in re.findall(r"%([\w.\-]+)", branches.group(1))]


def parse_hlo(text: str) -> tuple[dict[str, _Computation], str]:
    """The module's computations by name, and the name of its entry computation."""
    comps: dict[str, _Computation] = {}
    current, entry = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current] = _Computation(dims={p: [int(x) for x in d.split(",") if x]
                                                for p, d in _PARAM.findall(header.group(2))})
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and (m := _INSTRUCTION.match(line)):
            _add_instruction(comps[current], *m.groups())
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def dot_flops(hlo_text: str) -> float:
    """Matmul FLOPs of one execution of the program (while bodies times their known trip count)."""
    comps, entry = parse_hlo(hlo_text)
    memo: dict[str, float] = {}

    def total(name: str) -> float:
        if name not in memo:
            c = comps[name]
            f = sum(2.0 * math.prod(out) * math.prod(c.dims[lhs][i] for i in contracting) for out, lhs, contracting in c.dots)
            for callee, times in c.calls:
                if times is None:
                    raise ValueError(f"HLO while loop around %{callee} has no known trip count")
                f += times * total(callee)
            memo[name] = f
        return memo[name]

    return total(entry)
