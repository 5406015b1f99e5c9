"""Batched MT30 evaluator: structure, determinism, equality with a direct single-env loop, background mode."""

import os

os.environ.setdefault("MUJOCO_GL", "disable")

import jax.numpy as jnp
import numpy as np
import pytest

from fmbpo_jax.envs import MT30_TASKS, make_env
from fmbpo_jax.tools.env_bench import linear_params, linear_policy
from fmbpo_jax.envs.evaluate import (
    BackgroundEvaluator,
    Evaluator,
    episode_seed,
    episode_seeds,
    evaluate,
)
from fmbpo_jax.envs.pool import EnvPool, assign_slots

TASKS = ["cartpole-swingup", "cheetah-jump"]  # dense rewards: nonzero returns even for a zero policy
EPISODES, STEPS = 2, 25


def zero_params():
    p = linear_params(0)
    return {"W": np.zeros_like(p["W"]), "b": np.zeros_like(p["b"])}  # tanh(0) = 0: the constant-zero policy


def direct_returns(task, seeds, steps, policy=None, reference=False):
    """Plain single-env loop: one fresh make_env per episode (or one env reset repeatedly when `reference`)."""
    out = []
    env = make_env(task, int(seeds[0]), max_episode_steps=steps) if reference else None
    for s in seeds:
        if not reference:
            env = make_env(task, int(s), max_episode_steps=steps)
        obs, ret, done = env.reset(), 0.0, False
        while not done:
            a = np.zeros(6, np.float32) if policy is None else policy(obs)
            obs, r, done, _ = env.step(a)
            ret += r
        out.append(ret)
    return np.array(out)


@pytest.fixture(scope="module")
def ev2():
    with Evaluator(linear_policy, TASKS, episodes=EPISODES, num_workers=2, max_steps=STEPS) as ev:
        yield ev


def test_structure(ev2):
    res = ev2.run(linear_params(0), seed=3)
    assert ev2.num_workers == 2 and ev2.num_envs == 4
    assert res.task_names == TASKS and list(res.task_ids) == [MT30_TASKS.index(t) for t in TASKS]
    assert res.returns.shape == (2, 2) and res.successes.shape == (2, 2) and res.episodes == 2
    np.testing.assert_array_equal(res.env_seeds, [[3000, 3001], [3000, 3001]])
    assert res.env_steps == 4 * STEPS
    assert set(res.return_mean) == set(TASKS) and set(res.per_task()["cheetah-jump"]) == {
        "return_mean", "return_std", "success_mean"}
    for t, r in zip(TASKS, res.returns):
        assert res.return_mean[t] == pytest.approx(r.mean()) and res.return_std[t] == pytest.approx(r.std())
        assert res.success_mean[t] == 0.0
    assert np.all(res.returns >= 0) and np.all(res.returns <= 2 * STEPS) and np.all(res.returns > 0)
    m = res.metrics("eval/")
    assert m["eval/episode_reward+cheetah-jump"] == pytest.approx(res.returns[1].mean())
    assert m["eval/episode_reward+avg"] == pytest.approx(res.returns.mean())
    assert "cartpole-swingup" in res.table()


def test_deterministic_and_seed_dependent(ev2):
    a = ev2.run(linear_params(0), seed=5)
    b = ev2.run(linear_params(0), seed=5)
    c = ev2.run(linear_params(0), seed=6)
    np.testing.assert_array_equal(a.returns, b.returns)
    assert not np.array_equal(a.returns, c.returns)
    assert a.returns[0, 0] != a.returns[0, 1]  # distinct env seeds per episode


def test_zero_policy_equals_direct_loop(ev2):
    res = ev2.run(zero_params(), seed=2)
    for t, row in zip(TASKS, res.returns):
        expected = direct_returns(t, [episode_seed(2, e) for e in range(EPISODES)], STEPS)
        np.testing.assert_allclose(row, expected, rtol=1e-12)


def test_linear_policy_equals_direct_loop_and_in_process_pool(ev2):
    params = linear_params(1)
    res = ev2.run(params, seed=4)
    tid = {t: MT30_TASKS.index(t) for t in TASKS}
    for t, row in zip(TASKS, res.returns):
        pol = lambda o, t=t: np.asarray(linear_policy(params, o[None], jnp.array([tid[t]])))[0]  # noqa: E731
        expected = direct_returns(t, [4000, 4001], STEPS, policy=pol)
        np.testing.assert_allclose(row, expected, rtol=1e-5)
    local = evaluate(linear_policy, params, TASKS, episodes=EPISODES, seed=4, num_workers=0, max_steps=STEPS)
    np.testing.assert_array_equal(local.returns, res.returns)


def test_reference_seed_rule_is_successive_resets():
    seeds, skips = episode_seeds(7, 3, "reference")
    assert list(seeds) == [7, 7, 7] and list(skips) == [0, 1, 2]
    res = evaluate(linear_policy, zero_params(), ["pendulum-spin"], episodes=3, seed=7, num_workers=0,
                   max_steps=10, seed_rule="reference")
    np.testing.assert_allclose(res.returns[0], direct_returns("pendulum-spin", [7, 7, 7], 10, reference=True))
    assert len(set(res.returns[0].tolist())) == 3


def test_bad_policies_raise_and_evaluator_survives(ev2):
    base = ev2.run(linear_params(0), seed=1)
    with pytest.raises(ValueError, match="shape"):
        Evaluator(lambda p, o, t: jnp.zeros((o.shape[0], 5)), TASKS, episodes=1, num_workers=0, max_steps=3).run(
            None, 0)
    nan_params = linear_params(0)
    nan_params["b"][MT30_TASKS.index("cheetah-jump"), 0] = np.nan
    with pytest.raises(ValueError, match="cheetah-jump"):
        ev2.run(nan_params, seed=1)
    np.testing.assert_array_equal(ev2.run(linear_params(0), seed=1).returns, base.returns)
    with pytest.raises(ValueError, match="valid names"):
        Evaluator(linear_policy, ["walker-jog"], episodes=1, num_workers=0)
    with pytest.raises(ValueError):
        episode_seed(1, 1000)


def test_background_evaluator_uses_a_snapshot(ev2):
    params = linear_params(2)
    expected = ev2.run(params, seed=9).returns
    with BackgroundEvaluator(linear_policy, TASKS, episodes=EPISODES, num_workers=1, max_steps=STEPS) as bg:
        assert bg.result() is None
        assert bg.submit(params, seed=9, tag="epoch-1")
        params["W"][:] = 0.0  # training goes on and mutates its buffers: the evaluation must not see it
        params["b"][:] = 5.0
        tag, res = bg.result(timeout=120)
        assert tag == "epoch-1" and res.tag == "epoch-1"
        np.testing.assert_array_equal(res.returns, expected)
        assert bg.poll() == []
        # device arrays are snapshotted too; a non-blocking submit while busy is refused, not queued
        jparams = {k: jnp.asarray(v) for k, v in linear_params(2).items()}
        assert bg.submit(jparams, seed=9, tag=2)
        accepted = bg.submit(jparams, seed=10, tag=3, block=False)  # True only if tag 2 had already finished
        bg.wait(timeout=120)
        done = bg.poll()
        bg.wait(timeout=120)
        done += bg.poll()
        assert [t for t, _ in done] == ([2, 3] if accepted else [2])
        np.testing.assert_array_equal(done[0][1].returns, expected)
        assert bg.poll() == [] and not bg.busy
        # an evaluation that fails re-raises in the caller's thread
        nan_params = linear_params(2)
        nan_params["b"][:] = np.nan
        assert bg.submit(nan_params, seed=1, tag="bad")
        with pytest.raises(ValueError, match="non-finite"):
            bg.result(timeout=120)


def test_assign_slots_balances_and_covers():
    tasks = [MT30_TASKS.index(t) for t in MT30_TASKS for _ in range(3)]
    groups = assign_slots(tasks, 4)
    allslots = np.sort(np.concatenate(groups))
    np.testing.assert_array_equal(allslots, np.arange(len(tasks)))
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 6


def test_pool_step_validation_in_process():
    pool = EnvPool([0, 29], num_workers=0, max_steps=5)
    obs = pool.reset([1, 1])
    assert obs.shape == (2, 24) and obs.dtype == np.float32
    with pytest.raises(ValueError):
        pool.step(np.zeros((2, 5)))
    a = np.zeros((2, 6), np.float32)
    a[1, 3] = np.nan  # padding dim of pendulum-spin (A = 1): ignored
    o, r, d, s = pool.step(a)
    assert o.shape == (2, 24) and r.dtype == np.float32 and not d.any()
    pool.close()
