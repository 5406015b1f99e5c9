"""A run's life outside the compiled program: the loop skeleton, checkpoints, preemption, errors.

Shared by the policy trainer (`training.trainer`) and WM pretraining (`fmbpo_jax.pretrain`):
- `run_chunks`: the loop skeleton. One step per jitted call; a checkpoint on the save clock, at the end and after
  a SIGTERM; the caller turns a stop into `Preempted` (exit code EXIT_REQUEUE = 75 in the main job).
- `every(n)`: a clock, true at multiples of n.
- `Checkpointer`: one orbax CheckpointManager (atomic steps, two kept) holding a params/state tree and the run's
  host-side bookkeeping as JSON in the same step.
- `SigtermFlag`: SIGTERM only sets a flag, read between jitted calls.
- `TrainingStopped` / `OutOfDeviceMemory` (exit code 1 with the message), `out_of_memory_advice`.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

import orbax.checkpoint as ocp

EXIT_REQUEUE = 75  # EX_TEMPFAIL: the launch scripts requeue on it (SIGTERM -> checkpoint -> exit)


class Preempted(Exception):
    """SIGTERM arrived: the trainer checkpointed and should exit with EXIT_REQUEUE."""


class TrainingStopped(RuntimeError):
    """A run kept producing non-finite updates; the message names the run and the quantity."""


class OutOfDeviceMemory(TrainingStopped):
    """The jitted chunk of epochs did not fit the device; the message names the flags that shrink it."""


class SigtermFlag:
    """Installs a SIGTERM handler that only sets a flag; the loop checks it between jitted chunks."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class Checkpointer:
    """Steps of a run directory's `checkpoints/`: a tree of arrays and a JSON dict of bookkeeping, saved atomically.

    The trainer saves {'state', 'best'} (unpadded runs) and {'epoch', 'last_eval_epoch', 'elapsed', 'evals'};
    WM pretraining {'state', 'best_params'} and {'iter', 'best', 'elapsed'}. Two steps are kept.
    """

    def __init__(self, workdir: str):
        self._mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                           options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, target: Any) -> tuple[Any, dict]:
        """(tree, bookkeeping) of the latest step; `target`: arrays or ShapeDtypeStructs (with shardings) to restore into."""
        out = self._mngr.restore(self._mngr.latest_step(), args=ocp.args.Composite(
            train=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["train"], out["meta"]

    def save(self, step: int, tree: Any, meta: dict) -> None:
        """Write step `step` and wait for it: on return it is on disk (a later kill -9 cannot lose it)."""
        self._mngr.save(step, args=ocp.args.Composite(train=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                        force=True)
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()


def every(n: int) -> Callable[[int], bool]:
    """A clock: true at the multiples of n."""
    return lambda step: step % n == 0


def run_chunks(done: int, total: int, chunk: int, step: Callable[[int, int], None], save: Callable[[int], None],
               should_save: Callable[[int], bool], stop: Callable[[], bool]) -> tuple[int, bool]:
    """The loop both trainers share: `step(done, n)` for chunks of n <= `chunk` units until `total`.

    After each step: `stop()` (a SIGTERM, agreed by every process), then `save(done)` when the clock
    `should_save(done)` says so, at the last unit or when stopping. Returns (units done, stopped early by `stop`).
    """
    while done < total:
        n = min(chunk, total - done)
        step(done, n)
        done += n
        stopped = stop()
        if should_save(done) or done == total or stopped:
            save(done)
        if stopped:
            return done, True
    return done, False


def out_of_memory_advice(err: BaseException, runs: int, task_chunk: int, remat: bool | str) -> str | None:
    """What to change after XLA's RESOURCE_EXHAUSTED (compile or first call of the training chunk); None for other errors.

    runs: runs per device (padded); task_chunk: --config.task_chunk (0 = all runs vmapped at once); remat: the
    rollout's remat policy ('all' | 'matmul_inputs' | 'step'; False / True mean 'all' / 'step').
    Why a message of our own: XLA's names only the allocation ("... 164.02GiB ... jit_chunk"), not the flags
    that set it, and on one 80 GB GPU 48M full flow x 30 tasks needs --config.task_chunk=3 (README, Memory).
    """
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
        return None
    at_once = task_chunk if 0 < task_chunk < runs else runs
    fixes = []
    if at_once > 1:
        fixes.append(f"--config.task_chunk={max(1, at_once // 2)} (runs trained at once, lax.map over the rest; "
                     "same numbers, activation memory roughly proportional), or --config.task_chunk=-1 to measure "
                     "and take the largest group that fits")
    policy = {False: "all", True: "step"}.get(remat, remat)
    if policy == "all":
        fixes.append("--config.remat_policy=matmul_inputs (keep only the matmul inputs for the backward pass; same "
                     "numbers up to rounding)")
    if policy != "step":
        fixes.append("--config.remat=True (recompute each rollout step in the backward pass; the least memory)")
    fixes.append("fewer runs per job (--config.tasks / --config.seeds)")
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return (f"out of device memory in the training step with {at_once} of {runs} runs per device at once "
            f"(--config.task_chunk={task_chunk}, remat policy {policy!r}): {first}\n"
            "Try " + "; or ".join(fixes) + ".\nThe last checkpoint in the workdir is intact: rerun with the new "
            "flags to resume (README: 'Memory at 48M x 30 tasks').")
