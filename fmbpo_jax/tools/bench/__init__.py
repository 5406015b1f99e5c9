"""Training-speed benchmark: ``python -m fmbpo_jax.bench``. Every speed claim of the project is a row it prints,
never a timed test.

What one row measures
---------------------
One *variant* (what is trained: ``catalog.VARIANTS``) at one size, task count, seed count and matmul precision.
The program is the trainer's own jitted chunk (``plan``), timed after its compile (``timing``):

* ``compile_s``: ``jit(...).lower(...).compile()`` wall time.
* one untimed warm-up call, then ``--timed-calls`` calls, each synchronised with ``jax.block_until_ready``;
  ``median_s_epoch`` / ``min_s_epoch`` = call time / epochs per call. Compile time is never inside these numbers.
* ``task_epochs_s`` = runs (seeds x tasks) / median seconds per epoch.
* ``gflop_epoch``: analytic matmul FLOPs per epoch of all runs that the algorithm NEEDS; ``gflop_naive_epoch``:
  what a naive autodiff implementation such as the PyTorch reference computes (``fmbpo_jax.tools.flops``).
* ``peak_gflops``: the best rate of one large matmul (``--peak-shape``; default 512x1792x1792 on CPU, the 48M
  layer shape, and 8192^3 on GPU) under the same precision in the same process (``device``); ``mfu`` =
  achieved / peak.
* ``peak_mem_gb``: ``device.memory_stats()['peak_bytes_in_use']`` (process-wide high-water mark so far; 'n/a'
  where the backend has no memory stats, e.g. CPU); ``program_mem_gb``: XLA's ``memory_analysis()`` of the
  compiled program (arguments + outputs + temporaries - aliased).

Per-epoch work (``--preset``, default ``reference``): the reference's, i.e. one WM step on the policy batch
(B=512 x H=16) when fine-tuning, one actor step over B x H imagined steps, critic_iterations x critic_batches =
32 critic steps of 2048 rows. ``--preset fixed`` runs the repaired behaviours (WM: wm_iterations x
wm_batch_size = 8 x 256 sequences).

Usage::

    python -m fmbpo_jax.bench --variant main --size 5M --tasks 1 --json cpu.json          # the 4 reference variants
    python -m fmbpo_jax.bench --variant baseline-frozen --size 48M --tasks 1,30 --precision fp32-highest,bf16
    python -m fmbpo_jax.bench --variant baseline-frozen --size small --tasks 8 --vmap-check
    python -m fmbpo_jax.bench --variant baseline-frozen --size 48M --breakdown             # time per part of an epoch

Other switches: ``--breakdown`` (``breakdown``), ``--min-call-seconds``, ``--compile-workers N`` and
``--pipeline`` (``schedule``), ``--rows V:T:P[:SIZE[:CHUNK]],...`` (explicit rows in priority order, so a time
limit cuts the least important ones; CHUNK is that row's ``--task-chunk``), ``--task-chunk`` /
``--finetune-task-chunk`` (lax.map the run axis for memory), ``--max-seconds`` (skip rows not started in time),
``--batch-size/--horizon/--critic-iterations`` (shrink for tests), ``--profile DIR`` (``profile``),
``--remat on|matmul_inputs`` (what the rollout scans keep for the backward pass, ``--config.remat_policy``:
``on`` = ``step`` recomputes each step, ``matmul_inputs`` keeps only the matmul operands; ``off`` = ``all``), ``--vmap-check``
(``vmap_check``).

Modules: catalog (variants, precisions, reference speeds, a row's config), device (device info, peak matmul),
plan (a row's program and arguments, lowering, compiling), schedule (compile threads, order, time limit),
timing (warm-up, timed samples, derived fields), profile, breakdown, vmap_check, output (JSON, table), cli.
"""
from fmbpo_jax.tools.bench.catalog import MAIN_VARIANTS, PRECISIONS, VARIANTS, build_config
from fmbpo_jax.tools.bench.cli import main, parse_args, row_plan, run
from fmbpo_jax.tools.bench.output import format_rows, write_results
from fmbpo_jax.tools.bench.plan import plan_row
from fmbpo_jax.tools.bench.profile import summarize_trace
from fmbpo_jax.tools.bench.schedule import leftover_compiles

__all__ = ["MAIN_VARIANTS", "PRECISIONS", "VARIANTS", "build_config", "format_rows", "leftover_compiles", "main",
           "parse_args", "plan_row", "row_plan", "run", "summarize_trace", "write_results"]
