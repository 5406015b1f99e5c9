"""`python -m fmbpo_jax.main`, unchanged, with a wall-clock stamp on every output line and timing events.

The phase-3 end-to-end measurement (launch/gpu_phase3_e2e.sh) runs the main job through this module so that
its log tells when each part ran: the trainer's own progress lines say how long each chunk of epochs took,
but not when an evaluation that runs in a background thread started and ended, nor how long a checkpoint
took. This module changes nothing in the run; before handing over to `fmbpo_jax.main.main` it

* prefixes every line written to stdout/stderr with `@<unix time> ` (the summary, launch/e2e_summary.py,
  aligns the parts on these stamps);
* wraps, where they exist, `Evaluator.run` and `PlanningEvaluator.run` (one evaluation pass over the envs),
  `fmbpo_jax.training.evaluation.Evaluation.final` and orbax's `CheckpointManager.save` / `wait_until_finished`, printing a
  `[timing] {json}` line when each starts (`"phase": "start"`) and one when it returns, with its start and end
  time (and the evaluator's own wall/policy/env-CPU split). Anything not found (e.g. renamed by a refactor) is
  reported once and skipped.

    python -m launch.e2e_main --config=configs/phase3.py --config.checkpoint=... [any fmbpo_jax.main flag]
"""
from __future__ import annotations

import functools
import importlib
import json
import sys
import threading
import time
from typing import Any, Callable, TextIO

STAMP_PREFIX = "@"
TIMING_TAG = "[timing] "


class StampedStream:
    """A text stream that writes `@<time.time()> ` before each line to `inner`; thread-safe, flushes per line."""

    def __init__(self, inner: TextIO, clock: Callable[[], float] = time.time):
        self.inner = inner
        self.clock = clock
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            if lines:
                now = self.clock()
                self.inner.write("".join(f"{STAMP_PREFIX}{now:.3f} {line}\n" for line in lines))
                self.inner.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self.inner.flush()

    def close_line(self) -> None:
        """Write out a last unterminated line."""
        if self._pending:
            self.write("\n")

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # for libraries that ask (faulthandler, subprocess): the real descriptor
        return self.inner.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def timing_event(event: str, start: float, end: float, **extra) -> None:
    print(TIMING_TAG + json.dumps({"event": event, "start": round(start, 3), "end": round(end, 3),
                                   "seconds": round(end - start, 3), **extra}, default=str), flush=True)


def _result_fields(result: Any) -> dict:
    """The evaluator's own timing split of an EvalResult, where it has one."""
    out = {}
    for name in ("wall_time_s", "policy_time_s", "env_cpu_s"):
        v = getattr(result, name, None)
        if isinstance(v, (int, float)):
            out[name] = round(float(v), 3)
    return out


def timed(event: str, fn: Callable, tag_of: Callable[[tuple, dict], Any] | None = None) -> Callable:
    """fn wrapped to print a timing event when it returns (or raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.time()
        tag = tag_of(args, kwargs) if tag_of is not None else None
        # a start line too: a run stopped inside this call still shows since when it ran
        start = {"event": event, "phase": "start", "start": round(t0, 3), "tag": tag}
        print(TIMING_TAG + json.dumps(start, default=str), flush=True)
        ok = False
        try:
            out = fn(*args, **kwargs)
            ok = True
            return out
        finally:
            extra = {"ok": ok, "thread": threading.current_thread().name}
            if tag_of is not None:
                extra["tag"] = tag
            if ok:
                extra.update(_result_fields(out))
            timing_event(event, t0, time.time(), **extra)

    wrapper.__e2e_timed__ = True
    return wrapper


def _eval_tag(args: tuple, kwargs: dict) -> Any:
    """`tag` of Evaluator.run(self, params, seed, tag) / PlanningEvaluator.run(self, bundle, seed, key, tag)."""
    return kwargs.get("tag")


def _step_tag(args: tuple, kwargs: dict) -> Any:
    """`step` of CheckpointManager.save(self, step, ...)."""
    return args[1] if len(args) > 1 else kwargs.get("step")


# (event name, module, attribute path, tag function)
TARGETS = (
    ("eval_run", "fmbpo_jax.envs.evaluate", "Evaluator.run", _eval_tag),
    ("planning_run", "fmbpo_jax.envs.planner", "PlanningEvaluator.run", _eval_tag),
    ("final_evaluation", "fmbpo_jax.training.evaluation", "Evaluation.final", None),
    ("checkpoint_save", "orbax.checkpoint", "CheckpointManager.save", _step_tag),
    ("checkpoint_wait", "orbax.checkpoint", "CheckpointManager.wait_until_finished", None),
)


def install_timers(targets=TARGETS, log: Callable[[str], None] = print) -> list[str]:
    """Wrap every target that exists; returns the names wrapped. A missing one is reported and skipped."""
    done = []
    for event, module, path, tag_of in targets:
        try:
            owner = importlib.import_module(module)
            *parents, attr = path.split(".")
            for p in parents:
                owner = getattr(owner, p)
            fn = getattr(owner, attr)
        except (ImportError, AttributeError) as e:
            log(f"{TIMING_TAG}{json.dumps({'event': 'missing', 'target': f'{module}.{path}', 'error': str(e)})}")
            continue
        if not getattr(fn, "__e2e_timed__", False):
            setattr(owner, attr, timed(event, fn, tag_of))
        done.append(f"{module}.{path}")
    return done


def main() -> None:
    t0 = time.time()
    sys.stdout = StampedStream(sys.stdout)
    sys.stderr = StampedStream(sys.stderr)
    from absl import app

    from fmbpo_jax import main as fmbpo_main  # defines the flags, as `python -m fmbpo_jax.main` does

    wrapped = install_timers()
    timing_event("wrapper_start", t0, time.time(), wrapped=wrapped, argv=sys.argv[1:])
    try:
        app.run(fmbpo_main.main)
    finally:
        timing_event("main_end", t0, time.time())
        for s in (sys.stdout, sys.stderr):
            if isinstance(s, StampedStream):
                s.close_line()


if __name__ == "__main__":
    main()
