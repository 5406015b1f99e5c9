"""``python -m fmbpo_jax.bench``: flags, the row plan, and the run from peaks to the printed table."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable, Sequence

from jax._src import xla_bridge  # no public API tells whether the backends have started

from fmbpo_jax.tools.bench.catalog import MAIN_VARIANTS, PRECISIONS, VARIANTS
from fmbpo_jax.tools.bench.device import default_peak_shape, device_info, measure_peaks
from fmbpo_jax.tools.bench.output import derived_vmap_ratios, format_rows, write_results
from fmbpo_jax.tools.bench.plan import REMAT_POLICY_OF, error_text, plan_row, row_base
from fmbpo_jax.tools.bench.schedule import leftover_compiles, run_rows
from fmbpo_jax.tools.bench.vmap_check import vmap_checks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.bench", description="Training-speed benchmark: ``python -m fmbpo_jax.bench``.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="variants: " + ", ".join(VARIANTS) + "; precisions: " + ", ".join(PRECISIONS))
    p.add_argument("--variant", default="baseline-frozen",
                   help="comma-separated: " + ", ".join(VARIANTS) + " ('main' = the four reference variants, 'all')")
    p.add_argument("--size", default="5M", help="5M | 48M | small | tiny | a config .py file with get_config(); comma-separated")
    p.add_argument("--tasks", default="1", help="tasks in one program (1..30); comma-separated for several rows, e.g. 1,30")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--precision", default="fp32-highest", help="comma-separated: " + ", ".join(PRECISIONS))
    p.add_argument("--remat", choices=tuple(REMAT_POLICY_OF), default="off",
                   help="what the rollout scans keep for the backward pass (--config.remat_policy): off = all (every "
                        "activation), on = step (recompute each step from its carry: activation memory of one step), "
                        "matmul_inputs (only the matmul operands, bf16 under bf16)")
    p.add_argument("--epochs-per-call", type=int, default=2)
    p.add_argument("--timed-calls", type=int, default=3)
    p.add_argument("--json", default="", help="write all rows and the run's metadata to this file (after every row)")
    p.add_argument("--vmap-check", action="store_true",
                   help="also time N single-task programs one after another vs the N-task program (N = largest --tasks)")
    p.add_argument("--preset", choices=("reference", "fixed"), default="reference",
                   help="per-epoch work: reference (1 WM step on the policy batch) or fixed (wm_iterations x wm_batch_size)")
    p.add_argument("--wm-updates", choices=("policy_batch", "iterations"), default=None, help="override the preset's WM steps per epoch")
    p.add_argument("--batch-size", type=int, default=0, help="override alg.batch_size (pretraining uses 2x, as 1024 vs 512)")
    p.add_argument("--horizon", type=int, default=0, help="override alg.horizon")
    p.add_argument("--critic-iterations", type=int, default=0, help="override alg.critic_iterations")
    p.add_argument("--task-chunk", type=int, default=0, help="lax.map the run axis in groups of this size (memory); 0 = vmap all")
    p.add_argument("--finetune-task-chunk", type=int, default=0, help="--task-chunk for the WM fine-tuning variants only")
    p.add_argument("--min-call-seconds", type=float, default=0.0,
                   help="repeat the chunk back-to-back within one timed sample until about this long (short GPU calls)")
    p.add_argument("--compile-workers", type=int, default=1,
                   help=">1: compile the rows concurrently in this many threads, then time them one by one")
    p.add_argument("--pipeline", action="store_true",
                   help="with --compile-workers > 1: time each row as soon as its program is ready while later rows "
                        "still compile (for GPUs where compiling does not use the device, e.g. with "
                        "--xla_gpu_autotune_level=0; never on CPU, where compiling takes the cores being timed)")
    p.add_argument("--peak-shape", default="", help="M,K,N of the peak matmul (default 512,1792,1792 on CPU, 8192^3 on GPU)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="skip rows not started within this many seconds (0 = no limit)")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="trace one extra call per row with jax.profiler into DIR/<row>/ and list its slowest ops")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the epoch's parts (WM step, actor step, critic steps) of one run, each jitted alone")
    p.add_argument("--rows", default="",
                   help="explicit rows in this order, VARIANT:TASKS:PRECISION[:SIZE[:CHUNK]], comma-separated (replaces the "
                        "--variant x --size x --tasks x --precision product; SIZE defaults to the first --size, empty "
                        "allowed; CHUNK is this row's --task-chunk, e.g. 3 for 48M full flow x 30 tasks on an 80 GB GPU); "
                        "puts the rows that matter first when a time limit may cut the run short")
    p.add_argument("--quiet", action="store_true")
    return p


def _parse_lists(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--variant, --precision, --size, --tasks as lists (args.variants, .precisions, .sizes, .task_counts)."""
    if args.variant == "main":
        args.variant = ",".join(MAIN_VARIANTS)
    elif args.variant == "all":
        args.variant = ",".join(VARIANTS)
    args.variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variant {v!r}: known {', '.join(VARIANTS)}")
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    for x in args.precisions:
        if x not in PRECISIONS:
            p.error(f"--precision {x!r}: use {', '.join(PRECISIONS)}")
    args.sizes = [s.strip() for s in args.size.split(",") if s.strip()]
    try:
        args.task_counts = [int(t) for t in args.tasks.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tasks {args.tasks!r}: integers 1..30, comma-separated")
    for t in args.task_counts:
        if not 1 <= t <= 30:
            p.error(f"--tasks {t}: must be 1..30 (MT30)")


def _parse_rows(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--rows VARIANT:TASKS:PRECISION[:SIZE[:CHUNK]],... -> args.row_specs (in order) and args.row_chunks."""
    args.row_specs, args.row_chunks = [], {}
    for item in (x.strip() for x in args.rows.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (3, 4, 5):
            p.error(f"--rows item {item!r}: VARIANT:TASKS:PRECISION[:SIZE[:CHUNK]]")
        v, t, x = parts[:3]
        size = parts[3] if len(parts) >= 4 and parts[3] else args.sizes[0]
        if v not in VARIANTS:
            p.error(f"--rows item {item!r}: variant {v!r} unknown (known {', '.join(VARIANTS)})")
        if x not in PRECISIONS:
            p.error(f"--rows item {item!r}: precision {x!r} unknown (use {', '.join(PRECISIONS)})")
        if not t.isdigit() or not 1 <= int(t) <= 30:
            p.error(f"--rows item {item!r}: tasks {t!r} must be 1..30 (MT30)")
        args.row_specs.append((v, size, int(t), x))
        if len(parts) == 5:
            if not parts[4].isdigit():
                p.error(f"--rows item {item!r}: CHUNK {parts[4]!r} must be an integer >= 0 (runs per lax.map step; 0 = vmap all)")
            args.row_chunks[(v, size, int(t), x)] = int(parts[4])
    if args.row_specs:  # the peaks and the vmap check follow the rows actually asked for
        args.precisions = list(dict.fromkeys(x for _, _, _, x in args.row_specs))
        args.variants = list(dict.fromkeys(v for v, _, _, _ in args.row_specs))
        args.sizes = list(dict.fromkeys(sz for _, sz, _, _ in args.row_specs))
        args.task_counts = sorted({t for _, _, t, _ in args.row_specs})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    _parse_lists(p, args)
    _parse_rows(p, args)
    if args.seeds < 1 or args.epochs_per_call < 1 or args.timed_calls < 1:
        p.error("--seeds, --epochs-per-call and --timed-calls must be >= 1")
    if args.peak_shape:
        try:
            args.peak_shape = tuple(int(x) for x in args.peak_shape.split(","))
            assert len(args.peak_shape) == 3
        except (ValueError, AssertionError):
            p.error("--peak-shape: M,K,N")
    return args


def row_plan(args) -> list[tuple[str, str, int, str]]:
    """(variant, size, tasks, precision) of every row, in the order they run: --rows as given, else
    precision-major over the --precision x --size x --tasks x --variant product."""
    if args.row_specs:
        return list(args.row_specs)
    return [(v, s, t, p) for p in args.precisions for s in args.sizes for t in args.task_counts for v in args.variants]


def _meta(args, argv: Sequence[str] | None) -> dict:
    meta = device_info()
    default_work = args.preset == "reference" and not args.wm_updates
    meta.update(argv=list(sys.argv[1:] if argv is None else argv), preset=args.preset,
                per_epoch_work=("reference: one WM step on the policy batch when fine-tuning, actor step, "
                                "critic_iterations x critic_batches critic steps" if default_work
                                else f"preset {args.preset}, wm_updates={args.wm_updates or 'preset'}"),
                flops_formula="matmuls only: forward 2*rows*in*out per layer; input grad and weight grad the same each "
                              "(backward = 2x forward when both are needed); 'needed' vs 'naive' (reference autograd), see fmbpo_jax.tools.flops",
                remat=args.remat,
                note="timings on a shared machine are noisy; see loadavg fields" if meta["backend"] == "cpu" else "")
    return meta


def _plan_all(args) -> tuple[list, list[dict]]:
    """(planned rows, every row's output dict in plan order: 'pending', or 'error' when planning failed)."""
    planned, rows = [], []
    for v, s, t, p in row_plan(args):
        try:
            r = plan_row(args, v, s, t, p)
            planned.append(r)
            rows.append(r.row)
        except Exception as e:  # noqa: BLE001
            row = row_base(args, v, s, t, p)
            row["error"] = error_text(e)
            rows.append(row)
    for row in rows:
        row["status"] = "error" if "error" in row else "pending"
    return planned, rows


def _enable_cpu_op_tracing(args) -> None:
    """--profile: XLA:CPU emits per-op trace events only with this flag, read when the backend starts."""
    if args.profile and not xla_bridge.backends_are_initialized() and "xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns {'meta', 'rows'} (also written to --json)."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    _enable_cpu_op_tracing(args)
    if args.quiet:
        log = lambda *a, **k: None  # noqa: E731
    t_start = time.perf_counter()
    meta = _meta(args, argv)
    peaks = measure_peaks(args.precisions, args.peak_shape or default_peak_shape(), log)
    meta["peak"] = peaks
    planned, rows = _plan_all(args)
    write_results(args.json, meta, rows)

    def on_row(row):
        row["status"] = "error" if "error" in row else "done"
        write_results(args.json, meta, rows)

    run_rows(planned, args, peaks, t_start, log, on_row)
    planned.clear()
    if args.vmap_check:
        vmap_checks(args, rows, peaks, t_start, log, lambda _: write_results(args.json, meta, rows))
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = list(os.getloadavg())
    meta["total_s"] = time.perf_counter() - t_start
    write_results(args.json, meta, rows)
    log("")
    log(f"{meta['device']} ({meta['backend']}), jax {meta['jax']}, preset {args.preset}; {meta['per_epoch_work']}")
    log(format_rows(rows))
    for d in derived_vmap_ratios(rows):
        log(f"vmap ratio {d['variant']} {d['size']} {d['precision']}: T={d['tasks']} program / ({d['tasks']} x T=1) = {d['ratio']:.3f}")
    return {"meta": meta, "rows": rows}


def run() -> None:
    """The command line: main(), then exit at once if a compile of a skipped row still runs (do not hold a GPU
    machine for programs nobody will time; everything is written and printed by then)."""
    main()
    if leftover_compiles():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
