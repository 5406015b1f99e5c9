"""Summarise a phase-3 end-to-end run (launch/gpu_phase3_e2e.sh) and extrapolate it to the whole phase.

Reads the stamped log written through launch/e2e_main.py (`@<unix time> <line>`: the trainer's progress lines
`[epoch N/E] X epochs/s, ...`, its `[eval epoch N] ...` lines and the `[timing] {json}` events) and the run's
`config.json`, and writes one JSON with what each part took and the estimate for `--target-epochs` epochs with
evaluation every `--target-eval-freq`. Works on a partial log too (a run stopped by its time limit): the
summary then says `"complete": false` and extrapolates from the chunks measured (terms not measured yet, e.g. the
final evaluation, are listed and the total is a lower bound).

The model (every term measured in the same run; counts from the target config):
  total = startup + compile + E * steady + (n_background - 1) * background_eval_overhead
          + n_blocking * eval_wall + n_inloop_checkpoints * checkpoint + tail
* startup: launch -> start of the first chunk (imports, store, checkpoint, env workers, evaluation 0 submitted);
* compile: first chunk minus its epochs at the steady rate (it overlaps evaluation 0, as in the full run);
* steady: median seconds per epoch of the later chunks that overlap no evaluation;
* background evaluations: the trainer evaluates in a thread while training goes on; their cost is what the
  later chunks and the gaps between them took beyond the steady rate, per evaluation (checkpoints excluded);
* blocking evaluations: at a checkpoint epoch that is also an evaluation epoch (every 1,000 with evaluation
  every 500) the trainer submits the evaluation and then waits for it before saving, so its whole wall time
  counts; a run that ends at that epoch (the measured one) has none, so `eval_wall` is the measured
  evaluations' own wall time;
* tail: after the last chunk: final checkpoint, final plain, planning (MPPI) and best-params evaluations.

    python -m launch.e2e_summary --log e2e_log.txt --workdir RUN --t0 T --exit-code 0 --json e2e_summary.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from typing import Sequence

STAMPED = re.compile(r"^@(\d+(?:\.\d+)?) (.*)$")
PROGRESS = re.compile(r"\[epoch (\d+)/(\d+)\] ([0-9.]+) epochs/s")
EVAL_DONE = re.compile(r"\[eval epoch (\d+)\]")
TIMING = "[timing] "


def parse_log(lines: Sequence[str]) -> dict:
    """{'progress': [(stamp, epoch, epochs, eps)], 'eval_done': [(stamp, epoch)], 'events': [finished timing events],
    'starts': [timing start events], 'first'/'last': the first and last stamps}."""
    out = {"progress": [], "eval_done": [], "events": [], "starts": [], "last": None, "first": None}
    for raw in lines:
        m = STAMPED.match(raw.rstrip("\n"))
        if not m:
            continue
        t, text = float(m.group(1)), m.group(2)
        out["first"] = t if out["first"] is None else out["first"]
        out["last"] = t
        if (p := PROGRESS.search(text)) is not None:
            out["progress"].append((t, int(p.group(1)), int(p.group(2)), float(p.group(3))))
        elif (e := EVAL_DONE.search(text)) is not None:
            out["eval_done"].append((t, int(e.group(1))))
        elif text.startswith(TIMING):
            try:
                e = json.loads(text[len(TIMING):])
            except json.JSONDecodeError:
                continue
            out["starts" if e.get("phase") == "start" else "events"].append(e)
    return out


def chunks_from_progress(progress: list) -> list[dict]:
    """Each chunk's epochs, end stamp and duration (epochs / the printed epochs/s), in order."""
    chunks, prev = [], 0
    for t, epoch, _, eps in progress:
        n = epoch - prev
        seconds = n / eps if eps > 0 else float("nan")
        chunks.append({"epoch_end": epoch, "epochs": n, "start": t - seconds, "end": t, "seconds": seconds})
        prev = epoch
    return chunks


def overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def target_counts(epochs: int, eval_freq: int, checkpoint_freq: int, evaluate: bool = True) -> dict:
    """How many periodic evaluations (background / blocking) and in-loop checkpoints a run of `epochs` has.

    The trainer evaluates at epoch 0 and at every multiple of eval_freq below `epochs`, checkpoints at every
    multiple of checkpoint_freq below `epochs` (the one at `epochs` is in the tail), and waits for an
    evaluation submitted at a checkpoint epoch before saving (blocking).
    """
    evals = [0] + list(range(eval_freq, epochs, eval_freq)) if evaluate else []
    ckpts = list(range(checkpoint_freq, epochs, checkpoint_freq))
    blocking = [e for e in evals if e > 0 and e % checkpoint_freq == 0]
    return {"evaluations": len(evals), "blocking_evaluations": len(blocking),
            "background_evaluations": len(evals) - len(blocking), "inloop_checkpoints": len(ckpts)}


def checkpoint_seconds(save: dict, waits: list[dict], within: float = 60.0) -> float:
    """A checkpoint's wall time: orbax's save() plus the wait_until_finished() the trainer calls right after it."""
    after = [w for w in waits if save["end"] - 1e-3 <= w["start"] <= save["end"] + within]
    return (min(after, key=lambda w: w["start"])["end"] if after else save["end"]) - save["start"]


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


def first_chunk_elapsed(metrics_rows: list[dict], first_epoch_end: int) -> float | None:
    """Seconds from the training loop's start to the end of the first chunk, from metrics.jsonl's `total_time`
    (3 decimals; the progress line's epochs/s has 2, too coarse for a first chunk that includes compiling)."""
    times = [r["total_time"] for r in metrics_rows if r.get("epoch", first_epoch_end) < first_epoch_end and "total_time" in r]
    return min(times) if times else None


def unfinished(parsed: dict) -> list[dict]:
    """Timed calls that started and never returned (the run was stopped inside them), oldest first."""
    done = {(e["event"], e["start"]) for e in parsed["events"]}
    return [s for s in parsed["starts"] if (s["event"], s["start"]) not in done]


def measure(parsed: dict, t0: float, metrics_rows: list[dict] | None = None) -> dict:
    """The measured parts of the run (seconds; times relative to t0, the launch)."""
    chunks = chunks_from_progress(parsed["progress"])
    if chunks and (el := first_chunk_elapsed(metrics_rows or [], chunks[0]["epoch_end"])) is not None:
        chunks[0].update(start=chunks[0]["end"] - el, seconds=el)
    ev = parsed["events"]
    periodic = [e for e in ev if e["event"] == "eval_run" and e.get("tag") is not None]
    ckpts = [e for e in ev if e["event"] == "checkpoint_save"]
    waits = [e for e in ev if e["event"] == "checkpoint_wait"]
    final = next((e for e in ev if e["event"] == "final_evaluation"), None)
    end = next((e["end"] for e in ev if e["event"] == "main_end"), parsed["last"])
    for c in chunks:
        c["eval_overlap"] = any(overlaps(c, e) for e in periodic)
    later = chunks[1:]
    steady = _median([c["seconds"] / c["epochs"] for c in later if not c["eval_overlap"]])
    steady = steady if steady is not None else _median([c["seconds"] / c["epochs"] for c in later])
    first = chunks[0] if chunks else None
    compile_s = first["seconds"] - first["epochs"] * steady if first and steady is not None else None
    last_end = chunks[-1]["end"] if chunks else None
    ckpt_cost = [checkpoint_seconds(c, waits) for c in ckpts]
    inloop_ckpt_s = sum(c for c, e in zip(ckpt_cost, ckpts) if last_end is not None and e["end"] <= last_end)
    bg = [e for e in periodic if len(chunks) > 1 and chunks[1]["start"] <= e["start"] < last_end]
    excess = None
    if len(chunks) > 1 and steady is not None:
        excess = (last_end - chunks[1]["start"]) - sum(c["epochs"] for c in later) * steady - inloop_ckpt_s
    return {
        "total_s": _rel(end, t0),
        "startup_s": _rel(first["start"], t0) if first else None,
        "first_chunk_s": round(first["seconds"], 3) if first else None,
        "compile_s": round(compile_s, 3) if compile_s is not None else None,
        "steady_s_per_epoch": steady,
        "epochs_done": chunks[-1]["epoch_end"] if chunks else 0,
        "loop_s": round(last_end - first["start"], 3) if first else None,
        "chunks": [{"epoch_end": c["epoch_end"], "start_s": _rel(c["start"], t0), "seconds": round(c["seconds"], 3),
                    "s_per_epoch": c["seconds"] / c["epochs"], "eval_overlap": c["eval_overlap"]} for c in chunks],
        "periodic_evaluations": [{"tag": e.get("tag"), "start_s": _rel(e["start"], t0), "seconds": e["seconds"],
                                  **{k: e[k] for k in ("wall_time_s", "policy_time_s", "env_cpu_s") if k in e}}
                                 for e in periodic],
        "eval_wall_s": _median([e["seconds"] for e in periodic[1:]] or [e["seconds"] for e in periodic]),
        "background_evals_after_first_chunk": len(bg),
        "loop_excess_s": round(excess, 3) if excess is not None else None,
        "background_eval_overhead_s": round(excess / len(bg), 3) if excess is not None and bg else None,
        "checkpoints": [{"step": e.get("tag"), "start_s": _rel(e["start"], t0), "seconds": round(s, 3)}
                        for e, s in zip(ckpts, ckpt_cost)],
        "checkpoint_s": _median(ckpt_cost),
        "tail_s": round(end - last_end, 3) if last_end is not None and end is not None else None,
        "final_evaluation_s": final["seconds"] if final else None,
        "final_evaluation_parts": [{"event": e["event"], "tag": e.get("tag"), "seconds": e["seconds"],
                                    **{k: e[k] for k in ("wall_time_s", "policy_time_s") if k in e}}
                                   for e in ev if final and e["event"] in ("eval_run", "planning_run")
                                   and final["start"] <= e["start"] <= final["end"]],
        "missing_timers": [e.get("target") for e in ev if e["event"] == "missing"],
        "unfinished": [{"event": u["event"], "tag": u.get("tag"), "start_s": _rel(u["start"], t0),
                        "at_least_s": round(parsed["last"] - u["start"], 3)} for u in unfinished(parsed)],
    }


def extrapolate(m: dict, counts: dict, epochs: int, tail_state: str) -> dict:
    """The model of the module docstring, term by term. A term not measured is None and listed in terms_missing;
    tail_state: 'measured' (the run ended), 'at_least' (stopped during its tail: the time it had run) or 'missing'.
    With any term missing or at-least, the total is a lower bound."""
    def term(count, each):
        return 0.0 if count == 0 else (None if each is None else count * each)

    terms = {
        "startup_s": m["startup_s"],
        "compile_s": m["compile_s"],
        "training_s": term(epochs, m["steady_s_per_epoch"]),
        # evaluation 0 overlaps the first chunk: its cost is inside compile_s
        "background_evaluations_s": term(max(counts["background_evaluations"] - 1, 0), m["background_eval_overhead_s"]),
        "blocking_evaluations_s": term(counts["blocking_evaluations"], m["eval_wall_s"]),
        "inloop_checkpoints_s": term(counts["inloop_checkpoints"], m["checkpoint_s"]),
        "tail_s": m["tail_s"] if tail_state != "missing" else None,
    }
    missing = [k for k, v in terms.items() if v is None] + (["tail_s (at least)"] if tail_state == "at_least" else [])
    total = sum(v for v in terms.values() if v is not None)
    return {"terms": {k: (round(v, 1) if v is not None else None) for k, v in terms.items()},
            "total_s": round(total, 1), "total_min": round(total / 60, 2), "terms_missing": missing,
            "lower_bound": bool(missing)}


def summarize(log_lines: Sequence[str], config: dict, t0: float | None, exit_code: int | None,
              target_epochs: int, target_eval_freq: int, meta: dict | None = None,
              metrics_rows: list[dict] | None = None, target_checkpoint_freq: int = 1000) -> dict:
    """The summary JSON (see the module docstring). metrics_rows: the run's metrics.jsonl rows (optional)."""
    parsed = parse_log(log_lines)
    t0 = t0 if t0 is not None else parsed["first"]
    if t0 is None:
        return {"complete": False, "error": "no stamped lines in the log", "meta": meta or {}}
    m = measure(parsed, t0, metrics_rows)
    ev = config.get("eval", {})
    evaluate = int(ev.get("episodes", 1)) > 0
    measured_counts = target_counts(int(config.get("epochs", m["epochs_done"])), int(ev.get("freq", target_eval_freq)),
                                    int(config.get("checkpoint_freq", 1000)), evaluate)
    counts = target_counts(target_epochs, target_eval_freq, target_checkpoint_freq, evaluate)
    complete = exit_code == 0 and m["final_evaluation_s"] is not None
    loop_done = m["epochs_done"] >= int(config.get("epochs", 0) or 0) > 0
    tail_state = "measured" if complete else ("at_least" if loop_done else "missing")
    return {
        "complete": complete,
        "exit_code": exit_code,
        "meta": meta or {},
        "config": {k: config.get(k) for k in ("name", "preset", "tasks", "seeds", "epochs", "chunk_epochs", "checkpoint_freq",
                                              "precision", "task_chunk", "remat")}
        | {"model_size": config.get("model", {}).get("size"), "eval": {k: ev.get(k) for k in ("freq", "episodes", "max_steps", "final", "background")},
           "data_sampler": config.get("data", {}).get("sampler"), "checkpoint": config.get("checkpoint")},
        "measured": m,
        "measured_counts": measured_counts,
        "target": {"epochs": target_epochs, "eval_freq": target_eval_freq, "checkpoint_freq": target_checkpoint_freq,
                   **counts},
        "extrapolation": extrapolate(m, counts, target_epochs, tail_state),
        "model": __doc__.split("The model")[1].split("\n\n")[0].strip(),
    }


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file; [] when absent; a torn last line (the run still writing) is skipped."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.e2e_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, help="stamped log of launch/e2e_main.py")
    p.add_argument("--workdir", required=True, help="the run's --workdir (config.json)")
    p.add_argument("--t0", type=float, default=None, help="unix time of the launch (default: the first stamp)")
    p.add_argument("--exit-code", type=int, default=None, help="the run's exit code (absent: still running/killed)")
    p.add_argument("--target-epochs", type=int, default=15_000)
    p.add_argument("--target-eval-freq", type=int, default=500)
    p.add_argument("--target-checkpoint-freq", type=int, default=1000, help="configs/phase3.py's checkpoint_freq")
    p.add_argument("--meta", action="append", default=[], help="KEY=VALUE recorded as is (repeatable)")
    p.add_argument("--json", required=True, help="output JSON (written atomically)")
    a = p.parse_args(argv)
    try:
        with open(a.log, errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        print(f"e2e_summary: --log {a.log}: {e}", file=sys.stderr)
        return 2
    cfg_path = os.path.join(a.workdir, "config.json")
    config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    meta = dict(kv.split("=", 1) for kv in a.meta if "=" in kv)
    out = summarize(lines, config, a.t0, a.exit_code, a.target_epochs, a.target_eval_freq, meta,
                    read_jsonl(os.path.join(a.workdir, "metrics.jsonl")), a.target_checkpoint_freq)
    tmp = a.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, a.json)
    x = out.get("extrapolation")
    if x:
        print(f"e2e: {out['measured']['epochs_done']} epochs measured ({'complete' if out['complete'] else 'INCOMPLETE'}); "
              f"{a.target_epochs} epochs, eval every {a.target_eval_freq}: {x['total_s']:.0f} s = {x['total_min']:.1f} min"
              f"{' (lower bound: ' + ', '.join(x['terms_missing']) + ' not measured)' if x['lower_bound'] else ''}; terms {x['terms']}")
    else:
        print(f"e2e: {out.get('error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
