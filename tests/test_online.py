"""Online MBPO (mode 'online'): the device buffer, the plan's checks, the loop with evaluation and an exact resume
(in process, 2 vmapped runs, tiny nets, 20-step episodes), the main job's dispatch with the final evaluations, the
flow variant's exploration policy, the report's env-steps axis."""
from __future__ import annotations

import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.online import get_config as online_config
from fmbpo_jax import main
from fmbpo_jax.run_config import ConfigError, RunPlan
from fmbpo_jax.training import acting, replay
from fmbpo_jax.training.lifecycle import Preempted
from fmbpo_jax.training.online import OnlineTrainer, init_program
from fmbpo_jax.training.program import run_keys, sample_run
from fmbpo_jax.textio import read_jsonl, read_results_csv

# 2 runs (1 task x 2 seeds), 20-step episodes: 1 seed episode + 3 acting ones, 2 updates per 5 env steps
TINY = {"tasks": "pendulum-spin", "seeds": "1,2", "model.size": "tiny", "model.task_dim": 8,
        "model.actor_units": (16, 16), "model.critic_units": (16, 16), "alg.batch_size": 8, "alg.wm_batch_size": 8,
        "alg.horizon": 3, "alg.critic_iterations": 2, "alg.critic_batches": 2, "online.episode_length": 20,
        "online.env_steps": 80, "online.seed_steps": 20, "online.update_every": 5, "online.utd": 0.4,
        "online.env_workers": -1, "eval.freq": 40, "checkpoint_freq": 40, "log_freq": 20, "eval.episodes": 1,
        "eval.max_steps": 20, "eval.workers": -1, "eval.background": False, "eval.final": False,
        "eval.mppi_samples": 16, "eval.mppi_elites": 4, "eval.mppi_policy_trajs": 2, "eval.mppi_iterations": 1}


def tiny_online(variant: str = "mlp_small", **over):
    c = online_config(variant)
    for k, v in {**TINY, **over}.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


def test_buffer_windows_follow_the_chunk_layout():
    """Entry t of an episode holds the obs after step t and that step's action/reward; a window of H+1 obs pairs
    obs[k] with the action taken there; only complete episodes are sampled; slots wrap once full."""
    R, T, H = 2, 6, 2
    buf = replay.empty([0, 1], capacity_episodes=2, episode_length=T)

    def episode(e):  # value = 1000 r + 100 e + entry index, in every obs / action dim and the reward
        v = 1000 * np.arange(R)[:, None] + 100 * e + np.arange(T + 1)[None, :]
        act, rew = np.repeat(v[..., None], 6, -1).astype(np.float32), v.astype(np.float32)
        act[:, 0], rew[:, 0] = 0, 0
        return np.repeat(v[..., None], 24, -1).astype(np.float32), act, rew

    buf = replay.add_episode(buf, *episode(0), 0)
    assert np.asarray(buf.num_entries).tolist() == [1, 1]
    for r in range(R):
        b = sample_run(buf, r, jax.random.PRNGKey(r), 64, H)
        obs, act, rew = np.asarray(b["obs"][..., 0]), np.asarray(b["action"][..., 0]), np.asarray(b["reward"])
        assert np.all(obs // 100 == 10 * r)  # run r's row, episode 0 only
        np.testing.assert_array_equal(act, obs[1:])  # the action taken at obs[k] is stored with obs[k+1]
        np.testing.assert_array_equal(rew, obs[1:])
        np.testing.assert_array_equal(np.diff(obs, axis=0), 1)
    for e in (1, 2):
        buf = replay.add_episode(buf, *episode(e), e)
    assert np.asarray(buf.num_entries).tolist() == [2, 2]
    obs = np.asarray(sample_run(buf, 1, jax.random.PRNGKey(5), 256, H)["obs"][..., 0])
    assert set(np.unique((obs - 1000) // 100).tolist()) == {1, 2}  # episode 2 overwrote slot 0 (episode 0)


@pytest.mark.parametrize("flag,value", [("online.env_steps", 90), ("online.seed_steps", 0), ("online.update_every", 3),
                                        ("online.utd", 0.3), ("eval.freq", 30), ("checkpoint_freq", 10),
                                        ("finetune_wm", False), ("online.episode_length", 3)])
def test_plan_checks_name_the_flag(flag, value):
    with pytest.raises(ConfigError, match=f"--config.{flag}"):
        RunPlan.from_config(tiny_online(**{flag: value}))


def test_plan_counts_updates():
    o = RunPlan.from_config(tiny_online()).online
    assert (o.episodes, o.seed_episodes, o.updates_per_call) == (4, 1, 2)
    assert [o.updates_at(s) for s in (0, 20, 25, 40, 80)] == [0, 0, 2, 8, 24] and o.total_updates == 24


def test_reference_preset_plan():
    """--config.preset=reference: the WM step on the policy batch (B9) and a plain 'planning' evaluation (B8)."""
    plan = RunPlan.from_config(tiny_online(preset="reference"))
    assert plan.pwm.wm_updates == "policy_batch" and plan.eval.planning == "plain" and plan.pwm.finetune_wm


def _final(workdir, stop_after: int | None = None):
    tr = OnlineTrainer(RunPlan.from_config(tiny_online()), str(workdir), log=lambda _: None)
    if stop_after is not None:
        tr.should_stop = lambda: tr.episode >= stop_after
    out = tr.run()
    return tr, out


def _rows(path):
    return [{k: v for k, v in r.items() if k != "total_time"} for r in read_jsonl(path)]


def test_loop_evaluates_logs_and_resumes_exactly(tmp_path):
    """4 episodes straight vs stopped (as by SIGTERM) after 2 and resumed: same state, buffer, logs, evaluations."""
    full, out = _final(tmp_path / "full")
    assert out["env_steps"] == 80 and out["updates"] == 24 and int(full.state.train.epoch[0]) == 24
    buf = full.buffer
    assert np.asarray(buf.num_entries).tolist() == [4, 4]
    assert np.all(np.abs(np.asarray(buf.obs)).reshape(2, 4, -1).sum(-1) > 0)  # every episode of both runs stored
    assert not np.array_equal(np.asarray(buf.obs[0]), np.asarray(buf.obs[1]))  # the seeds' envs differ
    metrics = _rows(tmp_path / "full" / "metrics.jsonl")
    assert [r["env_steps"] for r in metrics] == [20, 20, 40, 40, 60, 60, 80, 80]
    assert [r["epoch"] for r in metrics[::2]] == [0, 8, 16, 24]
    assert {"wm_loss", "value_loss", "wm_loss_fresh", "wm_loss_buffer", "train_return"} <= set(metrics[-1])
    evals = _rows(tmp_path / "full" / "eval.jsonl")
    assert [(r["env_steps"], r["epoch"]) for r in evals] == [(0, 0), (0, 0), (40, 8), (40, 8)]
    assert len(read_results_csv(tmp_path / "full" / "results.csv")) == 2

    with pytest.raises(Preempted):
        _final(tmp_path / "cut", stop_after=2)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # as if killed (-9) after logging past the checkpoint
        f.write(json.dumps({**metrics[-1], "env_steps": 60, "train_return": -1.0}) + "\n")
    resumed, _ = _final(tmp_path / "cut")
    for a, b in zip(jax.tree_util.tree_leaves((full.state, full.buffer, full.evaluation.best)),
                    jax.tree_util.tree_leaves((resumed.state, resumed.buffer, resumed.evaluation.best))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert _rows(tmp_path / "cut" / name) == _rows(tmp_path / "full" / name), name


def test_main_runs_online_mode(tmp_path):
    """The main job's dispatch (main.run) on mode 'online' with the final plain, MPPI planning and best-params
    evaluations: results.csv (the programs are the loop test's, compiled once per process)."""
    config = tiny_online(**{"eval.final": True})
    plan = RunPlan.from_config(config)
    main.run(config, plan, str(tmp_path), main.WandbSink(plan, "disabled", str(tmp_path)))
    rows = read_results_csv(tmp_path / "results.csv")
    assert [(r["task"], int(r["seed"])) for r in rows] == [("pendulum-spin", 1), ("pendulum-spin", 2)]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("final_return", "planning_return", "best_params_return"))
    assert json.loads((tmp_path / "config.json").read_text())["mode"] == "online"


def test_flow_variant_acts():
    """configs/online.py:flow_small: the exploration policy of a flow actor on a flow WM, every run at once: actions in
    [-1, 1], zero past the task's action dims, different per step and per run, the same for the same step."""
    plan = RunPlan.from_config(tiny_online("flow_small", tasks="pendulum-spin,cartpole-swingup", seeds="1",
                                           **{"model.wm_substeps": 2, "model.actor_substeps": 1}))
    assert plan.pwm.wm.kind == "flow" and plan.pwm.actor.kind == "flow"
    spec = plan.spec
    state = init_program(plan.pwm)(run_keys(spec), None)
    act = acting.make_act_fn(plan.pwm, 0.1)
    obs = jnp.ones((spec.num_runs, 24), jnp.float32)
    args = (state.train, obs, jnp.asarray(spec.run_task_ids), acting.act_keys(run_keys(spec)))
    a0, a0_again, a1 = (np.asarray(act(*args, s)) for s in (0, 0, 1))
    assert a0.shape == (2, 6) and np.all(np.abs(a0) <= 1) and np.all(a0[:, 1:] == 0)  # both tasks have 1 action dim
    np.testing.assert_array_equal(a0, a0_again)
    assert not np.array_equal(a0, a1) and a0[0, 0] != a0[1, 0]


def test_report_curves_on_env_steps():
    """The report's curves take an env_steps column as their x when rows have one (online runs), else the epoch."""
    from fmbpo_jax.tools.report.aggregate import curves

    ev = {"task": "pendulum-spin", "seed": 1, "epoch": 8, "episode_reward": 5.0}
    met = {"task": "pendulum-spin", "seed": 1, "epoch": 8, "wm_loss": 1.0}
    online = curves([{"evals": [{**ev, "env_steps": 40}], "metrics": [{**met, "env_steps": 40}]}])
    assert online["x"] == "env steps" and online["eval"]["pendulum-spin"] == {40: [5.0]} and online["loss"]["wm_loss"] == {40: [1.0]}
    offline = curves([{"evals": [ev], "metrics": [met]}])
    assert offline["x"] == "epoch" and offline["eval"]["pendulum-spin"] == {8: [5.0]}
