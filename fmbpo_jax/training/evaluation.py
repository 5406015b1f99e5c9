"""Evaluation in the simulator: periodic (a background thread on a params snapshot), the per-run best params it
selects, and the final plain and planning evaluations with the results table.

Groups. Evaluation runs per (seed index, task positions) group of the runs this process holds (`eval_groups`):
one process holding every run has one group per seed over all tasks and one Evaluator; several processes each
evaluate only their own runs, with one Evaluator per distinct task subset, and the per-run scores are gathered
(`RunAxis.gather_runs`) so every process sees all of them.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax.envs.evaluate import Evaluator
from fmbpo_jax.envs.pool import workers_from_flag
from fmbpo_jax.envs.planner import evaluate_planning
from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.run_config import RunPlan, RunSpec
from fmbpo_jax.sharding import RunAxis
from fmbpo_jax.training import program
from fmbpo_jax.textio import rows_table, write_csv
from fmbpo_jax.training.runlog import RunLog

# per-episode values of one task row -> one number per run
_MEAN = lambda r, su: r.mean()  # noqa: E731
_STD = lambda r, su: r.std()  # noqa: E731 - per-episode spread: what a margin over another policy is judged by
_SUCCESS = lambda r, su: su.mean()  # noqa: E731


class EvalThread:
    """Evaluates params snapshots group by group in a background thread (one evaluation at a time).

    evs: one Evaluator per task-position tuple of `groups` ([(seed index, task positions)], `eval_groups`); one
    process holding every run has a single evaluator over all tasks, used for every seed.
    """

    def __init__(self, evs: dict, groups: list, seeds: tuple[int, ...], eval_seed: int, background: bool):
        self.evs = evs
        self.groups = groups
        self.seeds = seeds
        self.eval_seed = eval_seed
        self.background = background
        self._thread: threading.Thread | None = None
        self._results: list = []
        self._lock = threading.Lock()

    def idle(self) -> bool:
        """No evaluation running (every submitted one has its result queued)."""
        return self._thread is None or not self._thread.is_alive()

    def _work(self, epoch: int, bundles: list, snap_state: Any, seed_offset: int):
        try:
            res = [self.evs[pos].run(b, seed=self.eval_seed + seed_offset, tag=(epoch, self.seeds[s]))
                   for (s, pos), b in zip(self.groups, bundles)]
            with self._lock:
                self._results.append(("ok", epoch, res, snap_state))
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            with self._lock:
                self._results.append(("error", epoch, e, None))

    def submit(self, epoch: int, bundles: list, snap_state: Any = None, seed_offset: int = 0) -> None:
        self.wait()
        if self.background:
            self._thread = threading.Thread(target=self._work, args=(epoch, bundles, snap_state, seed_offset), daemon=True)
            self._thread.start()
        else:
            self._work(epoch, bundles, snap_state, seed_offset)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def poll(self) -> list:
        with self._lock:
            out, self._results = self._results, []
        for kind, epoch, value, _ in out:
            if kind == "error":
                raise value
        return out

    def close(self) -> None:
        self.wait()
        for ev in self.evs.values():
            ev.close()


def eval_groups(spec: RunSpec, rows: np.ndarray) -> list[tuple[int, tuple[int, ...]]]:
    """[(seed index s, task positions)]: the real runs among `rows` (padded run rows of one process), per seed.

    One process holding every run: [(s, (0..T-1)) for each seed], the evaluator's per-seed layout.
    """
    T = spec.num_tasks
    real = sorted(int(r) for r in rows if r < spec.num_runs)
    out: dict[int, list[int]] = {}
    for r in real:
        out.setdefault(r // T, []).append(r % T)
    return [(s, tuple(p)) for s, p in out.items()]


def group_bundles(spec: RunSpec, groups: list, rows: np.ndarray, local: dict, frozen_wm) -> tuple[list[dict], list]:
    """(evaluation bundles, critic rows) per group from one process's rows of the run axis.

    local: {'actor': [n, ...], 'critic'?: [n, ...], 'wm'?: [n, ...]} holding run rows `rows` [n] (numpy).
    bundle i = {'actor': rows of group i [len(pos), ...], 'wm': frozen_wm or its rows}; critic rows likewise
    (None without 'critic').
    """
    where = {int(r): i for i, r in enumerate(rows)}
    bundles, critics = [], []
    for s, pos in groups:
        idx = np.array([where[s * spec.num_tasks + p] for p in pos])
        take = lambda tree: jax.tree_util.tree_map(lambda x: x[idx], tree)  # noqa: E731
        bundles.append({"actor": take(local["actor"]), "wm": frozen_wm if frozen_wm is not None else take(local["wm"])})
        critics.append(take(local["critic"]) if "critic" in local else None)
    return bundles, critics


def per_run_values(spec: RunSpec, groups: list, results: list, fields: list[Callable]) -> tuple[np.ndarray, np.ndarray]:
    """(values [len(fields), R] float64, owned [R] bool) from one EvalResult per group.

    fields: functions (returns [E], successes [E]) -> float for one task row; runs not in `groups` stay 0.
    """
    T = spec.num_tasks
    vals = np.zeros((len(fields), spec.num_runs), np.float64)
    owned = np.zeros(spec.num_runs, bool)
    for (s, pos), res in zip(groups, results):
        for i, p in enumerate(pos):
            r = s * T + p
            vals[:, r] = [f(res.returns[i], res.successes[i]) for f in fields]
            owned[r] = True
    return vals, owned


class Evaluation:
    """The trainer's evaluations and the per-run best params (by periodic evaluation return).

    `best` = {'actor', 'return' [R], 'wm' (fine-tuning)}: unpadded runs, checkpointed with the state. `last_epoch` is
    the last evaluation submitted, `recorded_epoch` the last one recorded: a checkpoint holds what was recorded
    ('last_eval_epoch', 'evals'), so it never waits for the evaluation in flight; a resumed run evaluates that epoch
    again. Without episodes (--config.eval.episodes=0) nothing is evaluated and `best` keeps the initial params.
    """

    def __init__(self, plan: RunPlan, axis: RunAxis, state: dict, eval_wm, runlog: RunLog, on_eval: Callable | None,
                 log: Callable[[str], None]):
        """state: the initial unpadded state [R, ...]; eval_wm: the frozen WM the policy reads (None: each run's own)."""
        self.plan, self.axis, self.runlog, self.on_eval, self.log = plan, axis, runlog, on_eval, log
        self.eval_wm = eval_wm
        self.finetune = plan.pwm.finetune_wm
        self.groups = eval_groups(plan.spec, axis.rows)
        self.last_epoch = self.recorded_epoch = -1
        self.history = []
        best = {"actor": state.train.actor, "return": jnp.full((plan.spec.num_runs,), -jnp.inf, jnp.float32)}
        if self.finetune:
            best["wm"] = state.train.wm
        self.best = axis.place_unpadded(jax.tree_util.tree_map(jnp.array, best))  # own buffers: the state is donated
        self.thread: EvalThread | None = None
        self.clock = "epoch"  # what the `epoch` arguments count ('env step' in online training)

    def start(self) -> None:
        """Start the evaluators (env worker processes); without episodes there are none."""
        if self.plan.eval.episodes > 0:
            self.thread = self._evaluators()

    def _evaluators(self) -> "EvalThread":
        plan, spec = self.plan, self.plan.spec
        policy = program.make_policy_fn(plan.pwm, shared_wm=not self.finetune, apply_masks=bool(plan.behaviours["action_masks"]))
        evs = {pos: Evaluator(policy, [spec.task_ids[p] for p in pos], episodes=plan.eval.episodes,
                              num_workers=workers_from_flag(plan.eval.workers),
                              max_steps=plan.eval.max_steps)
               for pos in dict.fromkeys(pos for _, pos in self.groups)}
        return EvalThread(evs, self.groups, spec.seeds, plan.eval.seed, plan.eval.background)

    def restore(self, best: dict, meta: dict) -> None:
        self.best, self.history = best, meta["evals"]
        self.last_epoch = self.recorded_epoch = meta["last_eval_epoch"]

    def meta(self) -> dict:
        """What a checkpoint holds: the evaluations recorded so far (not the one in flight)."""
        return {"last_eval_epoch": self.recorded_epoch, "evals": list(self.history)}

    def _params(self, state: dict, *names: str) -> dict:
        return {k: getattr(state.train, k) for k in ("actor",) + names + (("wm",) if self.finetune else ())}

    def _bundles(self, params: dict, snapshot=None) -> tuple[list[dict], list]:
        rows, local = self.axis.local(params, snapshot)
        return group_bundles(self.plan.spec, self.groups, rows, local, self.eval_wm)

    # ------------------------------------------------------------------------------------- periodic

    def due(self, epoch: int) -> bool:
        return self.thread is not None and self.plan.cadence.should_eval(epoch)

    def submit(self, epoch: int, state: dict) -> None:
        """Evaluate the padded state's params as of now (a snapshot: the donated state cannot change it)."""
        params = self._params(state)
        snap = self.axis.unpad(params)
        self.thread.submit(epoch, self._bundles(params, snap)[0], snap)
        self.last_epoch = epoch

    def collect(self) -> None:
        """Record every finished evaluation: eval.jsonl rows, the best params, the history."""
        if self.thread is None:
            return
        # the gathers below are collectives: every process must poll the same evaluations, so wait for all
        if self.axis.multiprocess and not self.axis.all(self.thread.idle()):
            return
        for _, epoch, results, snap in self.thread.poll():
            self._record(epoch, results, snap)

    def wait(self) -> None:
        """Finish and record the evaluation in flight (before the final evaluations use the same env workers)."""
        if self.thread is not None:
            self.thread.wait()
            self.collect()

    def _record(self, epoch: int, results: list, snap: dict) -> None:
        spec = self.plan.spec
        vals, owned = per_run_values(spec, self.groups, results, [_MEAN, _STD, _SUCCESS])
        vals = self.axis.gather_runs(vals, owned)  # [3, R] mean, std, success per run, seed-major
        returns = vals[0].astype(np.float32)
        ret_dev = self.axis.place_unpadded(returns)
        new_best = {"actor": snap["actor"], "return": ret_dev}
        if "wm" in self.best:
            new_best["wm"] = snap["wm"]
        self.best = program.select_best(self.best, new_best, ret_dev > self.best["return"])
        rows = [{"epoch": epoch, "task": MT30_TASKS[spec.run_task_ids[r]], "seed": spec.run_seeds[r],
                 "episode_reward": float(vals[0, r]), "episode_reward_std": float(vals[1, r]),
                 "episode_success": float(vals[2, r])} for r in range(spec.num_runs)]
        self.runlog.evals(rows)
        self.history.append({"epoch": epoch, "mean_return": float(returns.mean())})
        self.recorded_epoch = epoch
        if self.on_eval:
            self.on_eval(rows)
        self.log(f"[eval {self.clock} {epoch}] mean return {returns.mean():.1f} over {spec.num_runs} runs")

    def close(self) -> None:
        if self.thread is not None:
            self.thread.close()

    # ------------------------------------------------------------------------------------- final

    def final(self, state: dict, workdir: str) -> list[dict]:
        """Final plain and planning evaluations of the padded state; results.csv and summary.md (process 0 writes).

        The per-run best params (kept by periodic evaluation return) are re-evaluated on fresh episodes (another
        seed than the selection saw) as `best_params_return`: the selection's own score is biased upwards, this
        one is not (one process only: several keep the best params per run but do not re-evaluate them).
        """
        spec = self.plan.spec
        bundles, critics = self._bundles(self._params(state, "critic"))
        best_return = self.axis.gather(self.best["return"])
        rows = [{"task": MT30_TASKS[spec.run_task_ids[r]], "seed": spec.run_seeds[r], "best_eval_return": float(best_return[r])}
                for r in range(spec.num_runs)]
        if self.thread is not None and self.plan.eval.final:
            self._final_scores(rows, bundles, critics)
            if not self.axis.multiprocess:
                best = {k: v for k, v in self.best.items() if k != "return"}  # unpadded already
                self._best_params_scores(rows, self._bundles(best, snapshot=best)[0])
        table = rows_table(rows, list(rows[0]) if rows else [])
        if self.runlog.write:
            write_csv(os.path.join(workdir, "results.csv"), rows)
            with open(os.path.join(workdir, "summary.md"), "w") as f:
                f.write(table + "\n")
        self.log(table)
        return rows

    def _final_scores(self, rows: list[dict], bundles: list, critics: list) -> None:
        evs, groups, seed = self.thread.evs, self.groups, self.plan.eval.seed
        final = [evs[pos].run(b, seed=seed + 1) for (_, pos), b in zip(groups, bundles)]
        if self.plan.eval.planning == "mppi":
            planning = self._planning(bundles, critics)
        else:  # B8: the reference's "planning" number is a second plain evaluation
            planning = [evs[pos].run(b, seed=seed + 2) for (_, pos), b in zip(groups, bundles)]
        spec = self.plan.spec
        v_final, owned = per_run_values(spec, groups, final, [_MEAN, _SUCCESS, _STD])
        v_plan, _ = per_run_values(spec, groups, planning, [_MEAN, _SUCCESS])
        vals = self.axis.gather_runs(np.concatenate([v_final, v_plan]), owned)  # [5, R]
        for r in range(spec.num_runs):
            rows[r].update(final_return=float(vals[0, r]), final_return_std=float(vals[2, r]), final_success=float(vals[1, r]),
                           planning_return=float(vals[3, r]), planning_success=float(vals[4, r]))

    def _planning(self, bundles: list, critics: list) -> list:
        """MPPI evaluation per group: one call per task subset with its seeds' bundles and critic rows (seed-major, as
        evaluate_planning reads them); the idle evaluator workers are reused. The MPPI noise is split per env slot, so
        a process's subset of tasks plans with other noise than a single process would (plain evaluation is not)."""
        plan, spec, groups = self.plan, self.plan.spec, self.groups
        planning = [None] * len(groups)
        for pos in dict.fromkeys(pos for _, pos in groups):
            idx = [i for i, g in enumerate(groups) if g[1] == pos]
            sub = RunSpec(task_ids=tuple(spec.task_ids[p] for p in pos), seeds=tuple(spec.seeds[groups[i][0]] for i in idx))
            crit = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *[critics[i] for i in idx])
            res = evaluate_planning(plan.pwm, plan.eval.mppi, sub, [bundles[i] for i in idx], crit, self.eval_wm is not None,
                                    episodes=plan.eval.episodes, max_steps=plan.eval.max_steps, eval_seed=plan.eval.seed,
                                    num_workers=plan.eval.workers or None, task_chunk=plan.eval.task_chunk,
                                    pool=self.thread.evs[pos].pool)
            for i, r in zip(idx, res):
                planning[i] = r
        return planning

    def _best_params_scores(self, rows: list[dict], best_bundles: list) -> None:
        evs, groups, seed = self.thread.evs, self.groups, self.plan.eval.seed
        best_res = [evs[pos].run(b, seed=seed + 3) for (_, pos), b in zip(groups, best_bundles)]
        v_best, _ = per_run_values(self.plan.spec, groups, best_res, [_MEAN])
        for r in range(self.plan.spec.num_runs):
            rows[r]["best_params_return"] = float(v_best[0, r])
