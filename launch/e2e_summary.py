"""Summarise a phase-3 end-to-end run (launch/gpu_phase3_e2e.sh) and extrapolate it to the whole phase.

Reads the stamped log written through launch/e2e_main.py (`@<unix time> <line>`: the trainer's progress lines
`[epoch N/E] X epochs/s, ...`, its `[eval epoch N] ...` lines and the `[timing] {json}` events) and the run's
`config.json`, and writes one JSON with what each part took and the estimate for `--target-epochs` epochs with
evaluation every `--target-eval-freq`. Works on a partial log too (a run stopped by its time limit): the
summary then says `"complete": false` and extrapolates from the chunks measured (terms not measured yet, e.g. the
final evaluation, are listed and the total is a lower bound).

The model (every term measured in the same run; counts from the target config; E target epochs, C chunk_epochs):
  total = startup + compile + E * steady + (E / C - 1) * chunk_gap + n_background * eval_background
          + n_blocking * eval_alone + n_checkpoints * checkpoint + final_evaluation + after
* startup: launch -> start of the first chunk (imports, data, checkpoint load, env workers, evaluation 0 submitted);
* compile: the first chunk minus its epochs at the steady rate (it overlaps evaluation 0, as in the full run);
* steady: median seconds per epoch of the later chunks that overlap no evaluation;
* chunk_gap: median pause between two chunks with no evaluation or checkpoint in it (metrics, logging);
* eval_background: what each periodic evaluation (run in a thread beside training) cost the loop: the time from
  the end of the first chunk to the start of the final evaluation, minus the later chunks at the steady rate,
  the chunk gaps and the checkpoints, divided by the periodic evaluations measured. (On one GPU the evaluation's
  policy calls can queue behind whole training chunks; whatever that costs, it is in this term.)
* eval_alone: one evaluation pass with nothing beside it: the final evaluation's plain passes (else the periodic
  ones' wall time). It prices the blocking evaluations: at a checkpoint epoch that is also an evaluation epoch
  (every 1,000 with evaluation every 500) the trainer submits the evaluation and waits for it before saving.
  The measured 1,000-epoch run ends at such an epoch and so has none;
* checkpoint: orbax save + wait, at every multiple of checkpoint_freq and at the end;
* final_evaluation: final plain, planning (MPPI) and best-params evaluations; after: from its end to the exit.

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


def target_counts(epochs: int, eval_freq: int, checkpoint_freq: int, chunk_epochs: int, evaluate: bool = True) -> dict:
    """How many chunks, periodic evaluations (background / blocking) and checkpoints a run of `epochs` has.

    The trainer evaluates at epoch 0 and at every multiple of eval_freq below `epochs`, checkpoints at every
    multiple of checkpoint_freq and at `epochs`, and waits for an evaluation submitted at a checkpoint epoch
    before saving (blocking).
    """
    evals = [0] + list(range(eval_freq, epochs, eval_freq)) if evaluate else []
    ckpts = sorted(set(range(checkpoint_freq, epochs, checkpoint_freq)) | {epochs})
    blocking = [e for e in evals if e > 0 and e % checkpoint_freq == 0]
    return {"chunks": math.ceil(epochs / chunk_epochs), "evaluations": len(evals),
            "blocking_evaluations": len(blocking), "background_evaluations": len(evals) - len(blocking),
            "checkpoints": len(ckpts)}


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
    times = [r["total_time"] for r in metrics_rows
             if r.get("epoch", first_epoch_end) < first_epoch_end and "total_time" in r]
    return min(times) if times else None


def unfinished(parsed: dict) -> list[dict]:
    """Timed calls that started and never returned (the run was stopped inside them), oldest first."""
    done = {(e["event"], e["start"]) for e in parsed["events"]}
    return [s for s in parsed["starts"] if (s["event"], s["start"]) not in done]


def _gaps(chunks: list[dict], busy: list[dict], marks: list[float]) -> list[float]:
    """Pauses between consecutive chunks that overlap none of the `busy` intervals (evaluations, checkpoints) and
    hold none of the `marks` (an evaluation's result collected: the best-params update runs there)."""
    gaps = [{"start": a["end"], "end": b["start"]} for a, b in zip(chunks, chunks[1:])]
    return [g["end"] - g["start"] for g in gaps
            if not any(overlaps(g, x) for x in busy) and not any(g["start"] <= t <= g["end"] for t in marks)]


def _timeline(parsed: dict, metrics_rows: list[dict] | None) -> dict:
    """Chunks (first one anchored on metrics.jsonl) and the timing events, sorted by kind."""
    chunks = chunks_from_progress(parsed["progress"])
    if chunks and (el := first_chunk_elapsed(metrics_rows or [], chunks[0]["epoch_end"])) is not None:
        chunks[0].update(start=chunks[0]["end"] - el, seconds=el)
    ev = parsed["events"]
    final = next((e for e in ev if e["event"] == "final_evaluation"), None)
    running = [u["start"] for u in unfinished(parsed) if u["event"] == "final_evaluation"]
    final_start = final["start"] if final else (running[0] if running else None)
    waits = [e for e in ev if e["event"] == "checkpoint_wait"]
    saves = [e for e in ev if e["event"] == "checkpoint_save"]
    return {"chunks": chunks, "final": final, "final_start": final_start,
            "periodic": [e for e in ev if e["event"] == "eval_run" and e.get("tag") is not None],
            "ckpts": [{"start": c["start"], "end": c["start"] + checkpoint_seconds(c, waits), "tag": c.get("tag")}
                      for c in saves],
            "end": next((e["end"] for e in ev if e["event"] == "main_end"), parsed["last"])}


def _evaluation_cost(tl: dict, steady: float | None, gap: float) -> tuple[float | None, int]:
    """(seconds per periodic evaluation, evaluations measured): the loop's time after the first chunk, up to the
    final evaluation (or the last chunk of a stopped run), beyond training at the steady rate, gaps and checkpoints."""
    chunks = tl["chunks"]
    if len(chunks) < 2 or steady is None:
        return None, 0
    stop = tl["final_start"] if tl["final_start"] is not None else chunks[-1]["end"]
    evals = [e for e in tl["periodic"] if e["start"] < stop]
    ckpt_s = sum(c["end"] - c["start"] for c in tl["ckpts"] if c["end"] <= stop)
    rest = (stop - chunks[0]["end"]) - sum(c["epochs"] for c in chunks[1:]) * steady - (len(chunks) - 1) * gap - ckpt_s
    return (max(rest, 0.0) / len(evals), len(evals)) if evals else (None, 0)


def measure(parsed: dict, t0: float, metrics_rows: list[dict] | None = None) -> dict:
    """The measured parts of the run (seconds; times relative to t0, the launch)."""
    tl = _timeline(parsed, metrics_rows)
    chunks, periodic, final, end = tl["chunks"], tl["periodic"], tl["final"], tl["end"]
    for c in chunks:
        c["eval_overlap"] = any(overlaps(c, e) for e in periodic)
    later = chunks[1:]
    steady = _median([c["seconds"] / c["epochs"] for c in later if not c["eval_overlap"]])
    steady = steady if steady is not None else _median([c["seconds"] / c["epochs"] for c in later])
    first = chunks[0] if chunks else None
    gap = _median(_gaps(chunks, periodic + tl["ckpts"], [t for t, _ in parsed["eval_done"]])) or 0.0
    per_eval, n_evals = _evaluation_cost(tl, steady, gap)
    parts = [e for e in parsed["events"] if tl["final_start"] is not None and e["event"] in ("eval_run", "planning_run")
             and e["start"] >= tl["final_start"]]
    alone = _median([e["seconds"] for e in parts if e["event"] == "eval_run"])
    return {
        "total_s": _rel(end, t0),
        "startup_s": _rel(first["start"], t0) if first else None,
        "first_chunk_s": round(first["seconds"], 3) if first else None,
        "compile_s": round(first["seconds"] - first["epochs"] * steady, 3) if first and steady is not None else None,
        "steady_s_per_epoch": steady,
        "chunk_gap_s": round(gap, 4),
        "epochs_done": chunks[-1]["epoch_end"] if chunks else 0,
        "loop_s": round(chunks[-1]["end"] - first["start"], 3) if first else None,
        "chunks": [{"epoch_end": c["epoch_end"], "start_s": _rel(c["start"], t0), "seconds": round(c["seconds"], 3),
                    "s_per_epoch": c["seconds"] / c["epochs"], "eval_overlap": c["eval_overlap"]} for c in chunks],
        "periodic_evaluations": [{"tag": e.get("tag"), "start_s": _rel(e["start"], t0), "seconds": e["seconds"],
                                  **{k: e[k] for k in ("wall_time_s", "policy_time_s", "env_cpu_s") if k in e}}
                                 for e in periodic],
        "periodic_evaluations_costed": n_evals,
        "eval_background_s": round(per_eval, 3) if per_eval is not None else None,
        "eval_alone_s": alone if alone is not None else _median([e["seconds"] for e in periodic]),
        "eval_alone_from": "final plain evaluation" if alone is not None else "periodic evaluations (beside training)",
        "checkpoints": [{"step": c["tag"], "start_s": _rel(c["start"], t0), "seconds": round(c["end"] - c["start"], 3)}
                        for c in tl["ckpts"]],
        "checkpoint_s": _median([c["end"] - c["start"] for c in tl["ckpts"]]),
        "final_evaluation_s": final["seconds"] if final else None,
        "final_evaluation_parts": [{"event": e["event"], "tag": e.get("tag"), "seconds": e["seconds"],
                                    **{k: e[k] for k in ("wall_time_s", "policy_time_s") if k in e}} for e in parts],
        "after_final_s": round(end - final["end"], 3) if final and end is not None else None,
        "missing_timers": [e.get("target") for e in parsed["events"] if e["event"] == "missing"],
        "unfinished": [{"event": u["event"], "tag": u.get("tag"), "start_s": _rel(u["start"], t0),
                        "at_least_s": round(parsed["last"] - u["start"], 3)} for u in unfinished(parsed)],
    }


def extrapolate(m: dict, counts: dict, epochs: int) -> dict:
    """The model of the module docstring, term by term. A term not measured is None and listed in terms_missing;
    a final evaluation the run was stopped in counts with the time it had run ('at least'). With any term missing
    or at least, the total is a lower bound."""
    def term(count, each):
        return 0.0 if count == 0 else (None if each is None else count * each)

    final, at_least = m["final_evaluation_s"], []
    if final is None:
        running = [u["at_least_s"] for u in m["unfinished"] if u["event"] == "final_evaluation"]
        final = running[0] if running else None
        at_least = ["final_evaluation_s (at least)"] if running else []
    terms = {
        "startup_s": m["startup_s"],
        "compile_s": m["compile_s"],
        "training_s": term(epochs, m["steady_s_per_epoch"]),
        "chunk_gaps_s": term(counts["chunks"] - 1, m["chunk_gap_s"]),
        "background_evaluations_s": term(counts["background_evaluations"], m["eval_background_s"]),
        "blocking_evaluations_s": term(counts["blocking_evaluations"], m["eval_alone_s"]),
        "checkpoints_s": term(counts["checkpoints"], m["checkpoint_s"]),
        "final_evaluation_s": final,
        "after_final_s": m["after_final_s"] if m["final_evaluation_s"] is not None else None,
    }
    missing = [k for k, v in terms.items() if v is None] + at_least
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
    chunk = int(config.get("chunk_epochs", 100))
    measured_counts = target_counts(int(config.get("epochs", m["epochs_done"])), int(ev.get("freq", target_eval_freq)),
                                    int(config.get("checkpoint_freq", 1000)), chunk, evaluate)
    counts = target_counts(target_epochs, target_eval_freq, target_checkpoint_freq, chunk, evaluate)
    complete = exit_code == 0 and m["final_evaluation_s"] is not None
    return {
        "complete": complete,
        "exit_code": exit_code,
        "meta": meta or {},
        "config": {k: config.get(k) for k in ("name", "preset", "tasks", "seeds", "epochs", "chunk_epochs",
                                              "checkpoint_freq", "precision", "task_chunk", "remat")}
        | {"model_size": config.get("model", {}).get("size"),
           "eval": {k: ev.get(k) for k in ("freq", "episodes", "max_steps", "final", "background")},
           "data_sampler": config.get("data", {}).get("sampler"), "checkpoint": config.get("checkpoint")},
        "measured": m,
        "measured_counts": measured_counts,
        "target": {"epochs": target_epochs, "eval_freq": target_eval_freq, "checkpoint_freq": target_checkpoint_freq,
                   **counts},
        "extrapolation": extrapolate(m, counts, target_epochs),
        "model": "The model" + __doc__.split("The model")[1].split("\n\n    python")[0].rstrip(),
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
        state = "complete" if out["complete"] else "INCOMPLETE"
        bound = f" (lower bound: {', '.join(x['terms_missing'])})" if x["lower_bound"] else ""
        print(f"e2e: {out['measured']['epochs_done']} epochs measured ({state}); {a.target_epochs} epochs, eval every "
              f"{a.target_eval_freq}: {x['total_s']:.0f} s = {x['total_min']:.1f} min{bound}; terms {x['terms']}")
    else:
        print(f"e2e: {out.get('error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
