"""The order rows are compiled and timed in (``--compile-workers``, ``--pipeline``, ``--max-seconds``).

Rows are timed one at a time, in the planned order. With ``--compile-workers N > 1`` their programs compile in N
threads first (all of them before any timing, so nothing else runs while a row is timed); with ``--pipeline``
each row is timed as soon as its own program is ready while later rows still compile (GPUs whose compiles do not
use the device; never on CPU, where compiling takes the cores being timed). A row not started within
``--max-seconds`` is written as skipped; a row that fails keeps its error and the others still run.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Callable

from fmbpo_jax.tools.bench.breakdown import breakdown
from fmbpo_jax.tools.bench.plan import Row, compile_row, error_text, lower_row, row_label
from fmbpo_jax.tools.bench.timing import execute_row


class RowRunner:
    """Compiles and times a list of rows; `on_row(row)` after each row (done, failed or skipped)."""

    def __init__(self, args, peaks: dict, t_start: float, log: Callable[[str], None], on_row: Callable[[dict], None]):
        self.args, self.peaks, self.t_start, self.log, self.on_row = args, peaks, t_start, log, on_row
        self.futures: dict[Future, Row] = {}
        self.pending: dict[int, Future] = {}  # --pipeline: id(row) -> the future of its compile
        self.executor: ThreadPoolExecutor | None = None

    def over_budget(self) -> bool:
        return bool(self.args.max_seconds) and time.perf_counter() - self.t_start > self.args.max_seconds

    def elapsed(self) -> str:
        return f"[{time.perf_counter() - self.t_start:6.0f} s]"

    def start_compiles(self, rows: list[Row]) -> None:
        """Submit every row's compile to the thread pool; without --pipeline wait for all of them."""
        workers, pipeline = self.args.compile_workers, self.args.pipeline
        self.log(f"compiling {len(rows)} programs in {workers} threads" + (" (timing each as soon as it is ready)" if pipeline else ""))
        self.executor = ThreadPoolExecutor(workers)
        if pipeline:
            # the workers lower too (one at a time: tracing holds the GIL), so the first row is timed as soon as
            # its own program is ready instead of after every row has been traced
            trace_lock = threading.Lock()

            def lower_and_compile(r: Row) -> None:
                with trace_lock:
                    lower_row(r)
                compile_row(r)

            self.futures = {self.executor.submit(lower_and_compile, r): r for r in rows}
            self.pending = {id(r): f for f, r in self.futures.items()}  # waited for just before the row is timed
        else:
            for r in rows:  # lower in this thread; XLA compiles concurrently, each as soon as it is lowered
                try:
                    lower_row(r)
                    self.futures[self.executor.submit(compile_row, r)] = r
                except Exception as e:  # noqa: BLE001
                    r.row["error"] = error_text(e)
            for f in as_completed(self.futures):  # logged as they finish: a long compile shows up while it runs
                self.collect(f)
        for r in rows:
            r.row["compiled_concurrently"] = workers
            if id(r) in self.pending:
                r.row["timed_while_compiling"] = True

    def collect(self, f: Future) -> None:
        r = self.futures[f]
        try:
            f.result()
            self.log(f"    {self.elapsed()} compiled {row_label(r.row)} in {r.row['compile_s']:.1f} s")
        except Exception as e:  # noqa: BLE001 - one failing row (e.g. OOM) must not lose the others
            r.row["error"] = error_text(e)
            r.lowered = None

    def prepare(self, r: Row) -> None:
        """Lower and compile in this thread (no --compile-workers)."""
        try:
            lower_row(r)
            compile_row(r)
            # printed before the timing, so a run killed in a long compile still shows which programs finished
            self.log(f"    {self.elapsed()} compiled in {r.row['compile_s']:.1f} s")
        except Exception as e:  # noqa: BLE001
            r.row["error"] = error_text(e)
            r.lowered = r.compiled = None

    def run_one(self, r: Row) -> None:
        """Wait for the row's compile (or skip it past --max-seconds), then time it."""
        row = r.row
        if id(r) in self.pending:
            if self.over_budget():  # do not wait for a program that will not be timed
                self.pending[id(r)].cancel()
            else:
                self.collect(self.pending[id(r)])
        if "error" not in row and self.over_budget():
            row["error"] = f"skipped: --max-seconds {self.args.max_seconds:g} reached"
        if "error" in row:
            return
        self.log(f"... {self.elapsed()} {row_label(row)}")
        try:
            if r.compiled is None:
                self.prepare(r)
            if "error" not in row:
                execute_row(r, self.args, self.peaks)
        except Exception as e:  # noqa: BLE001
            row["error"] = error_text(e)
        r.compiled = None

    def report(self, r: Row) -> None:
        """Log the row's result; --breakdown times its parts."""
        row = r.row
        if "error" in row:
            self.log(f"    {row['variant']} T={row['tasks']} {row['precision']}: ERROR {row['error']}")
            return
        self.log(f"    compile {row['compile_s']:.1f} s, median {row['median_s_epoch']:.4g} s/{row['unit']}, "
                 f"min {row['min_s_epoch']:.4g}, {row['achieved_gflops']:.0f} GFLOP/s (MFU {row['mfu']:.2f})")
        for o in row.get("profile_top_ops", [])[:8]:
            self.log(f"      {o['ms']:9.1f} ms {o['calls']:5d}x {o['op'][:28]:28s} {o['shape'][:28]:28s} {o['source'][-70:]}")
        if self.args.breakdown and r.mode == "policy":
            try:
                row["breakdown"] = breakdown(r, self.args)
                self.log("    breakdown (1 run, parts jitted alone): " + ", ".join(
                    f"{k} {v['s']:.3g} s ({v['gflops']:.0f} GFLOP/s)" for k, v in row["breakdown"].items()))
            except Exception as e:  # noqa: BLE001
                row["breakdown"] = {"error": error_text(e)}

    def run(self, rows: list[Row]) -> None:
        if self.args.compile_workers > 1:
            self.start_compiles(rows)
        for r in rows:
            self.run_one(r)
            self.report(r)
            self.on_row(r.row)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)  # compiles of skipped rows that have not started


def run_rows(rows: list[Row], args, peaks: dict, t_start: float, log: Callable, on_row: Callable) -> None:
    """Compile and time `rows` in order (see the module docstring)."""
    RowRunner(args, peaks, t_start, log, on_row).run(rows)


def leftover_compiles(threads=None) -> bool:
    """True while a compile worker still runs (a row skipped by --max-seconds whose compile had started):
    a live non-daemon thread other than the main one (`threads`: default all of this process's)."""
    threads = threading.enumerate() if threads is None else threads
    return any(t.is_alive() and not t.daemon for t in threads if t is not threading.main_thread())
