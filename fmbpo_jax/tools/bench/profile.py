"""``--profile DIR``: trace one more call of a row with ``jax.profiler`` and list the ops that took the most time.

The trace goes to ``DIR/<row>/`` (Perfetto/TensorBoard), with the compiled program's HLO text (to map a GPU
trace's kernels to ops offline) and ``top_ops.txt``. On CPU, XLA emits per-op trace events only with
``--xla_cpu_enable_xprof_traceme``, which the CLI sets when the backend has not started yet.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Sequence

import jax

# Trace events of the runtime itself (executor, dispatch, compile), not of the program's ops.
_RUNTIME_EVENT = ("Thunk", "Execute", "Pjit", "pjit", "ispatch", "Await", "Compile", "compile", "$")


def summarize_trace(events: Sequence[dict], hlo_text: str, top: int = 20) -> list[dict]:
    """The program's ops that took the most time in a profiler trace, with the source op they came from.

    events: Chrome/Perfetto trace events ('ph' == 'X' complete events with 'name' and 'dur' in microseconds);
    hlo_text: the compiled program (`compiled.as_text()`), whose `metadata={op_name=...}` names the JAX op.
    Returns [{'op', 'ms', 'calls', 'shape', 'source'}] by total time. Ops that run asynchronously on other
    threads (e.g. Eigen dots on CPU) show only their dispatch, so read it together with the wall time.
    """
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or any(t in name for t in _RUNTIME_EVENT):
            continue
        total[name] += float(e.get("dur", 0.0))
        calls[name] += 1
    out = []
    for name, us in total.most_common(top):
        m = re.search(r"%" + re.escape(name) + r" = (\S+) [^\n]*?op_name=\"([^\"]*)\"", hlo_text)
        out.append({"op": name, "ms": us / 1e3, "calls": calls[name], "shape": m.group(1) if m else "",
                    "source": m.group(2) if m else ""})
    return out


def _write_top_ops(path: str, ops: list[dict]) -> None:
    with open(path, "w") as f:
        f.write("ms\tcalls\top\tshape\tsource\n")
        f.writelines(f"{o['ms']:.2f}\t{o['calls']}\t{o['op']}\t{o['shape']}\t{o['source']}\n" for o in ops)


def profile_call(compiled, state, rest, out_dir: str, top: int = 20) -> list[dict]:
    """Trace one call compiled(state, *rest) into out_dir; returns and writes its top ops."""
    os.makedirs(out_dir, exist_ok=True)
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # Python frames would fill the trace's event budget
    jax.profiler.start_trace(out_dir, create_perfetto_trace=True, profiler_options=opts)
    try:
        jax.block_until_ready(compiled(state, *rest))
    finally:
        jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not traces:
        return []
    with gzip.open(traces[-1]) as f:
        ev = json.load(f)
    hlo = compiled.as_text()
    with open(os.path.join(out_dir, "program.hlo.txt"), "w") as f:
        f.write(hlo)
    ops = summarize_trace(ev["traceEvents"] if isinstance(ev, dict) else ev, hlo, top)
    _write_top_ops(os.path.join(out_dir, "top_ops.txt"), ops)
    return ops
