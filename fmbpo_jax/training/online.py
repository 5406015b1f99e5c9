"""Online MBPO (mode 'online', configs/online.py, docs/online.md): every (seed, task) run acts in its own env, in
lockstep, and learns from its own replay buffer on the device, all runs vmapped in one program.

    OnlineTrainer(plan, workdir).run()
      setup      per-run state (fresh WM, or --config.checkpoint's), empty buffer, env pool, resume from a checkpoint
      loop       lifecycle.run_chunks over EPISODES: collect one episode of every run (seed episodes: OU random
                 actions; then the policy's sample + noise, `online.utd` updates every env step, in calls of
                 `updates_per_call` = the offline trainer's jitted chunk `program.make_train_chunk` sampling the
                 buffer), probe the WM on the fresh episode, add it to the buffer, log, evaluate on the clock
      finish     final plain + planning evaluations, results.csv and summary.md (training.evaluation)

Checkpoints fall on episode boundaries: state, best params and the buffer are saved; the env needs nothing, since
each episode re-seeds it and every acting draw is a function of (run, episode, step) (training.acting). A resumed
run continues exactly as the uninterrupted one (bitwise on CPU; tested). Runs live on one device.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import run_config
from fmbpo_jax.envs.pool import EnvPool, workers_from_flag
from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.run_config import OnlinePlan, RunPlan
from fmbpo_jax.sharding import RunAxis, make_mesh
from fmbpo_jax.training import acting, program, replay
from fmbpo_jax.training.evaluation import Evaluation
from fmbpo_jax.training.lifecycle import Checkpointer, Preempted, SigtermFlag, TrainingStopped, run_chunks
from fmbpo_jax.training.runlog import RunLog, eta_string
from fmbpo_jax.training.trainer import load_pretrained_wm
from fmbpo_jax.textio import truncate_jsonl

# the compiled programs of a config, shared by trainers of the same plan in one process (tests, resumes)
learn_program = functools.lru_cache(maxsize=8)(program.make_train_chunk)
act_program = functools.lru_cache(maxsize=8)(acting.make_act_fn)
probe_program = functools.lru_cache(maxsize=8)(acting.make_wm_probe)
diagnostics_program = functools.lru_cache(maxsize=8)(program.make_diagnostics_fn)


@functools.lru_cache(maxsize=8)
def init_program(cfg) -> Callable:
    """jit(raw keys [R, 2], WM params | None) -> program.init_runs' state: one compile instead of an eager op-by-op
    init (~10 s of small compiles on CPU)."""
    return jax.jit(functools.partial(program.init_runs, cfg))


def train_online(config, workdir: str, *, on_metrics: Callable | None = None, on_eval: Callable | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Online training of every (seed, task) run of `config` (an ml_collections config or a RunPlan, mode 'online');
    resumes from `workdir`. Returns {'results', 'env_steps', 'updates'}; raises Preempted after checkpointing on SIGTERM."""
    return OnlineTrainer(run_config.as_plan(config), workdir, on_metrics=on_metrics, on_eval=on_eval, log=log).run()


class OnlineLog(RunLog):
    """The trainer's logs with env steps: every row gets 'env_steps' (per run) and 'epoch' = updates done.

    Evaluation rows arrive with the loop's clock, env steps, as 'epoch' (training.evaluation is shared) and are
    rewritten in place, so the on_eval callbacks (wandb) see the same columns. Resuming truncates by env steps.
    """

    def __init__(self, workdir: str, online: OnlinePlan, write: bool = True):
        super().__init__(workdir, write)
        self.online = online

    def evals(self, rows):
        for r in rows:
            r["env_steps"] = r["epoch"]
            r["epoch"] = self.online.updates_at(r["env_steps"])
        super().evals(rows)

    def resume_at(self, env_steps: int, last_eval_env_steps: int) -> None:
        if not self.write:
            return
        truncate_jsonl(self.metrics_path, lambda r: r["env_steps"] <= env_steps)
        truncate_jsonl(self.eval_path, lambda r: r["env_steps"] <= last_eval_env_steps)
        truncate_jsonl(self.diag_path, lambda r: r["env_steps"] <= env_steps)


def episode_rows(plan: RunPlan, episode: int, returns: np.ndarray, metrics: dict, elapsed: float) -> list[dict]:
    """One metrics row per run for episode `episode` (0-based): its training return and the means of its metrics."""
    o, spec = plan.online, plan.spec
    env_steps = (episode + 1) * o.episode_length
    rows = []
    for r in range(spec.num_runs):
        row = {"epoch": o.updates_at(env_steps), "env_steps": env_steps, "episode": episode,
               "task": MT30_TASKS[spec.run_task_ids[r]], "seed": spec.run_seeds[r], "total_time": round(elapsed, 3),
               "train_return": float(returns[r])}
        row.update({k: float(v[r]) for k, v in metrics.items()})
        rows.append(row)
    return rows


def reduce_metrics(calls: list[dict]) -> dict:
    """Metrics of an episode's update calls ({name: [n, R]} each) -> {name: [R]}: NaN-skip counts summed, rest averaged."""
    if not calls:
        return {}
    stacked = {k: np.concatenate([np.asarray(c[k]) for c in calls]) for k in calls[0]}
    return {k: v.sum(0) if "nan_skip" in k else v.mean(0) for k, v in stacked.items()}


class OnlineTrainer:
    """One online job: set up in the constructor, `run()` collects, trains, checkpoints, evaluates, returns results.

    State between episodes: `state` (RunState [R], donated to each update call), `buffer` (replay.WindowData
    [R, ...]), `episode` (episodes done), `elapsed`, `evaluation` (best params, evaluation history).
    """

    def __init__(self, plan: RunPlan, workdir: str, *, on_metrics: Callable | None = None,
                 on_eval: Callable | None = None, log: Callable[[str], None] = print):
        if plan.online is None:
            raise ValueError("OnlineTrainer needs a plan of mode 'online'")
        plan, pretrained = load_pretrained_wm(plan)
        self.plan, self.o, self.workdir, self.on_metrics, self.log = plan, plan.online, workdir, on_metrics, log
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(plan.config_json)
        late = run_config.set_deterministic_xla(plan.deterministic)
        if late:
            self.log(f"warning: {late}")
        spec = plan.spec
        self.axis = RunAxis(make_mesh(1), spec.num_runs)  # online runs live on one device
        self.runlog = OnlineLog(workdir, self.o)
        self.checkpointer = Checkpointer(workdir)
        keys = program.run_keys(spec)
        state = init_program(plan.pwm)(keys, pretrained)
        self.evaluation = Evaluation(plan, self.axis, state, None, self.runlog, on_eval, self.log)
        self.evaluation.clock = "env step"  # its `epoch` arguments are env steps here
        self.state = self.axis.place_unpadded(state)
        self.buffer = self.axis.place_unpadded(replay.empty(spec.run_task_ids, self.o.episodes, self.o.episode_length))
        self.episode, self.elapsed = 0, 0.0
        self._restore()
        self.run_pos = jnp.arange(spec.num_runs, dtype=jnp.int32)
        self.run_task = jnp.asarray(spec.run_task_ids, jnp.int32)
        self.act_keys = acting.act_keys(keys)
        self.act = act_program(plan.pwm, self.o.action_noise)
        self.learn = learn_program(plan.pwm, self.o.updates_per_call, plan.batch_size, plan.wm_batch_size, plan.task_chunk)
        self.probe = probe_program(plan.pwm, plan.batch_size)
        self.diagnose = None
        if self.o.diagnostics_freq:
            d = plan.diagnostics
            self.diagnose = diagnostics_program(plan.pwm, plan.batch_size, d.num_groups, d.num_probes, d.jac_samples)
        self.pool = EnvPool(spec.run_task_ids, num_workers=workers_from_flag(self.o.env_workers),
                            max_steps=self.o.episode_length)
        self.evaluation.start()

    def _restore(self) -> None:
        if self.checkpointer.latest_step() is None:
            return
        target = self.axis.restore_target({"state": self.state, "best": self.evaluation.best, "buffer": self.buffer})
        tree, meta = self.checkpointer.restore(target)
        self.state, self.buffer = tree["state"], tree["buffer"]
        self.evaluation.restore(tree["best"], meta)
        self.episode, self.elapsed = int(meta["episode"]), float(meta["elapsed"])
        self.runlog.resume_at(int(meta["env_steps"]), meta["last_eval_epoch"])
        self.log(f"resumed from {self.workdir} at env step {meta['env_steps']} (episode {self.episode})")

    # ------------------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Collect and train to online.env_steps; returns {'results', 'env_steps', 'updates'}; Preempted after SIGTERM."""
        o = self.o
        self.t_start = time.time() - self.elapsed
        should_save = lambda ep: (ep * o.episode_length) % o.checkpoint_freq == 0  # noqa: E731
        try:
            with SigtermFlag() as self.sigterm, jax.default_matmul_precision(self.plan.matmul_precision):
                steps = self.episode * o.episode_length
                if self.evaluation.due(steps) and self.evaluation.last_epoch < steps:
                    self.evaluation.submit(steps, self.state)
                self.episode, stopped = run_chunks(self.episode, o.episodes, 1, self.train_episode, self.save,
                                                   should_save, self.should_stop)
        finally:
            self.pool.close()
        if stopped:
            self.evaluation.close()
            self.checkpointer.close()
            raise Preempted(f"SIGTERM: checkpointed at env step {self.episode * o.episode_length} in {self.workdir}; "
                            "rerun the same command to resume")
        self.evaluation.wait()
        results = self.evaluation.final(self.state, self.workdir)
        self.evaluation.close()
        self.checkpointer.close()
        return {"results": results, "env_steps": o.env_steps, "updates": o.total_updates}

    def collect(self, episode: int) -> tuple[dict, np.ndarray, list[dict]]:
        """One episode of every run, updating on the way: (episode arrays [R, L+1, ...], returns [R], update metrics)."""
        o, spec = self.o, self.plan.spec
        L = o.episode_length
        data = replay.episode_arrays(spec.num_runs, L)
        obs = self.pool.reset([acting.episode_env_seed(s, t, episode) for s, t in zip(spec.run_seeds, spec.run_task_ids)])
        data["obs"][:, 0] = obs
        seeding = episode < o.seed_episodes
        if seeding:
            random = np.stack([acting.seed_actions(s, t, episode, L, o.ou_theta, o.ou_sigma)
                               for s, t in zip(spec.run_seeds, spec.run_task_ids)])
        returns = np.zeros(spec.num_runs, np.float64)
        calls = []
        for t in range(L):
            if seeding:
                action = random[:, t]
            else:
                action = np.asarray(self.act(self.state.train, obs, self.run_task, self.act_keys, episode * L + t))
            obs, reward, _, _ = self.pool.step(action)
            data["obs"][:, t + 1], data["action"][:, t + 1], data["reward"][:, t + 1] = obs, action, reward
            returns += reward
            if not seeding and (t + 1) % o.update_every == 0:
                self.state, m = self.learn(self.state, None, self.buffer, self.run_pos, self.run_task)
                calls.append(m)
        return data, returns, calls

    def train_episode(self, episode: int, n: int) -> None:
        """Episode `episode` (n = 1): collect and update, probe the WM on it, add it to the buffer, log, evaluate."""
        assert n == 1, n
        o = self.o
        t0 = time.time()
        data, returns, calls = self.collect(episode)
        metrics = reduce_metrics(calls)
        env_steps = (episode + 1) * o.episode_length
        if episode > 0:  # the WM on this fresh episode vs on the buffer it trained on
            fresh = replay.single_episode(self.plan.spec.run_task_ids, data)
            metrics.update({k: np.asarray(v) for k, v in self.probe(self.state.train, fresh, self.buffer, self.run_task,
                                                                      env_steps).items()})
        self.buffer = replay.add_episode(self.buffer, data["obs"], data["action"], data["reward"], episode)
        elapsed = time.time() - self.t_start
        if env_steps % o.log_freq == 0:
            rows = episode_rows(self.plan, episode, returns, metrics, elapsed)
            self.runlog.metrics(rows)
            if self.on_metrics:
                self.on_metrics(rows)
        if self.diagnose is not None and env_steps % o.diagnostics_freq == 0 and episode >= o.seed_episodes:
            self.write_diagnostics(episode, elapsed)
        self.check_nan(metrics)
        self.log_progress(episode, returns, metrics, time.time() - t0)
        self.evaluation.collect()
        if self.evaluation.due(env_steps) and env_steps < o.env_steps:
            self.evaluation.submit(env_steps, self.state)
        self.episode, self.elapsed = episode + 1, time.time() - self.t_start

    def write_diagnostics(self, episode: int, elapsed: float) -> None:
        """Actor-gradient ESNR and WM Jacobian proxies on the buffer (fmbpo_jax.diagnostics), one row per run."""
        diag = self.diagnose(self.state, None, self.buffer, self.run_pos, self.run_task)
        diag = {k: np.asarray(v) for k, v in diag.items()}
        rows = episode_rows(self.plan, episode, np.full(self.plan.spec.num_runs, np.nan), diag, elapsed)
        self.runlog.diagnostics([{k: v for k, v in r.items() if k != "train_return"} for r in rows])

    def check_nan(self, metrics: dict) -> None:
        """TrainingStopped when a run skipped max_nan_skips updates in a row for non-finite values."""
        streak = np.asarray(self.state.nan_streak)
        if streak.max() < self.plan.max_nan_skips:
            return
        r = int(streak.argmax())
        what = "world-model loss/gradients" if float(np.max(metrics.get("wm_nan_skips", 0))) > 0 else "actor loss/gradients"
        raise TrainingStopped(f"run {self.plan.spec.run_name(r)}: {int(streak[r])} consecutive updates skipped for "
                              f"non-finite {what} (--config.max_nan_skips={self.plan.max_nan_skips})")

    def log_progress(self, episode: int, returns: np.ndarray, metrics: dict, seconds: float) -> None:
        o = self.o
        done = (episode + 1) * o.episode_length
        sps = o.episode_length / max(seconds, 1e-9)
        extra = "".join(f", {k} {float(np.mean(metrics[k])):.4g}" for k in ("wm_loss_fresh", "wm_loss", "value_loss")
                        if k in metrics)
        self.log(f"[env step {done}/{o.env_steps}] episode {episode + 1}/{o.episodes}, updates {o.updates_at(done)}, "
                 f"{sps:.1f} env-steps/s, ETA {eta_string((o.env_steps - done) / sps)}, "
                 f"train return {returns.mean():.1f}{extra}")

    def should_stop(self) -> bool:
        return bool(self.sigterm.flag)

    def save(self, episode: int) -> None:
        """Checkpoint state, best params and buffer after `episode` episodes (waits for an earlier evaluation)."""
        steps = episode * self.o.episode_length
        self.evaluation.collect()
        if self.evaluation.recorded_epoch < self.evaluation.last_epoch < steps:
            self.evaluation.wait()
        ev = self.evaluation.meta()
        meta = {"episode": episode, "env_steps": steps, "updates": self.o.updates_at(steps),
                "last_eval_epoch": ev["last_eval_epoch"], "elapsed": self.elapsed, "evals": ev["evals"]}
        self.checkpointer.save(steps, {"state": self.axis.unpad(self.state), "best": self.evaluation.best,
                                       "buffer": self.buffer}, meta)
