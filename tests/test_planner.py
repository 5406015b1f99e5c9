"""MPPI planner (fmbpo_jax.envs.planner): the update on analytic values, the WM scorer, the batched planner
(shapes, bounds, masks, determinism, per-task rows) and the planning evaluation end to end on real envs."""

import os

os.environ.setdefault("MUJOCO_GL", "disable")

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmbpo_jax import actors, critic, pwm
from fmbpo_jax import world_model as wm
from fmbpo_jax.envs.evaluate import EvalResult, episode_seed
from fmbpo_jax.envs.planner import (
    MPPIConfig,
    PlanningEvaluator,
    jitted_planner,
    mask_table,
    mppi,
    plan,
    evaluate_planning,
    policy_prior,
    shift_mean,
    trajectory_values,
)
from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, MT30_TASKS
from fmbpo_jax.run_config import RunSpec

L, A, H = 16, 6, 3
TASKS = (10, 24)  # cartpole-swingup (1 action dim: masks visible), cheetah-jump (6): cheap, dense rewards
SMALL = MPPIConfig(num_samples=64, num_elites=8, num_pi_trajs=8, iterations=3)
E_SLOTS = 3  # episodes per task everywhere below, so every batched call has N = 6 slots (one compile)

# jitted once per static config and reused across tests (compiles dominate the run time on CPU)
plan_j = jax.jit(plan, static_argnums=(0, 1))
values_j = jax.jit(trajectory_values, static_argnums=0)
prior_j = jax.jit(policy_prior, static_argnums=(0, 6, 7))


def tiny_pcfg(**kw) -> pwm.PWMConfig:
    w = wm.WMConfig(obs_dim=24, action_dim=A, latent_dim=L, task_dim=8, num_tasks=30, encoder_units=(32,), units=(32,))
    return pwm.PWMConfig(wm=w, actor=actors.ActorConfig(latent_dim=L, action_dim=A, units=(32,)),
                         critic=critic.CriticConfig(latent_dim=L, units=(32,), num_critics=2),
                         action_dims=tuple(ACTION_DIMS_BY_ID), **kw)


@pytest.fixture(scope="module")
def models():
    pc = tiny_pcfg()
    T = len(TASKS)

    def stacked(init, cfg, seed, n=None):
        """Random params with init's structure: eval_shape only traces, so no init op is compiled (that took ~8 s
        on busy CPUs). Kernels ~ N(0, 1/fan_in), LayerNorm scales ~ 1 + N(0, 0.1^2), other vectors ~ N(0, 0.1^2)."""
        rng = np.random.default_rng(seed)
        shapes = jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(0)))

        def leaf(path, sd):
            shape = sd.shape if n is None else (n,) + sd.shape
            if len(sd.shape) >= 2:
                return jnp.asarray(rng.normal(size=shape) / np.sqrt(sd.shape[-2]), jnp.float32)
            base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
            return jnp.asarray(base + 0.1 * rng.normal(size=shape), jnp.float32)

        return jax.tree_util.tree_map_with_path(leaf, shapes)

    out = {"wm": stacked(wm.init, pc.wm, 0), "wm_stacked": stacked(wm.init, pc.wm, 1, T),
           "actor": stacked(actors.init, pc.actor, 2, 2 * T), "critic": stacked(critic.init, pc.critic, 3, 2 * T)}
    # rows [0, T): the task rows of one seed; all 2T rows: the per-run stack of a 2-seed run (end-to-end test)
    out["actor_runs"], out["critic_runs"] = out["actor"], out["critic"]
    out["actor"] = jax.tree_util.tree_map(lambda x: x[:T], out["actor"])
    out["critic"] = jax.tree_util.tree_map(lambda x: x[:T], out["critic"])
    out["pcfg"] = pc
    return out


def quad_score(target):
    """Analytic value: -sum_t ||a_t - target||^2 (optimum: target at every step)."""
    return lambda actions: -jnp.sum(jnp.square(actions - target), axis=(0, 2))


# ============================================================================================ the update


def test_config_validation_and_from_config():
    import ml_collections

    with pytest.raises(ValueError):
        MPPIConfig(num_samples=16, num_elites=32)
    with pytest.raises(ValueError):
        MPPIConfig(num_samples=16, num_pi_trajs=16)
    with pytest.raises(ValueError):
        MPPIConfig(min_std=0.5, max_std=0.1)
    ev = ml_collections.ConfigDict(dict(mppi_horizon=3, mppi_iterations=6, mppi_samples=512, mppi_elites=64,
                                        mppi_policy_trajs=24, mppi_temperature=0.5, mppi_min_std=0.05, mppi_max_std=2.0))
    assert MPPIConfig.from_config(ev) == MPPIConfig()
    assert MPPIConfig.from_config(ev, deterministic=True).deterministic


def test_shift_mean():
    pm = jnp.arange(H * 2, dtype=jnp.float32).reshape(H, 2) + 1
    np.testing.assert_array_equal(shift_mean(pm), np.array([[3, 4], [5, 6], [0, 0]], np.float32))


def test_mppi_moves_to_optimum_and_beats_prior():
    target = jnp.array([0.6, -0.3, 0.2])
    score = quad_score(target)
    pi = jnp.full((H, 24, 3), -0.9)  # a bad prior
    a, mean, info = mppi(MPPIConfig(), score, jnp.zeros((H, 3)), pi, None, jax.random.PRNGKey(1))
    assert a.shape == (3,) and mean.shape == (H, 3)
    np.testing.assert_allclose(mean, np.broadcast_to(target, (H, 3)), atol=0.1)
    np.testing.assert_allclose(a, target, atol=0.25)
    assert float(score(mean[:, None])[0]) > float(score(pi).max())
    assert np.all(np.asarray(info["std"]) < 2.0) and np.all(np.asarray(info["std"]) >= 0.05 - 1e-7)
    np.testing.assert_allclose(float(info["score"].sum()), 1.0, rtol=1e-5)
    # an optimum outside the box: actions stay in [-1, 1], the mean goes to the boundary
    a2, mean2, _ = mppi(MPPIConfig(), quad_score(jnp.array([3.0, -3.0, 0.0])), jnp.zeros((H, 3)), pi, None,
                        jax.random.PRNGKey(2))
    assert np.all(np.abs(np.asarray(a2)) <= 1.0)
    np.testing.assert_allclose(mean2[:, :2], np.broadcast_to([1.0, -1.0], (H, 2)), atol=0.05)


def test_mppi_good_prior_is_kept():
    """An optimal policy prior fills the elite set (elites = num_pi_trajs here): the executed action is the prior's."""
    target = jnp.array([0.37, -0.81])
    pi = jnp.broadcast_to(target, (H, 24, 2))
    a, mean, _ = mppi(dataclasses.replace(MPPIConfig(), iterations=1, num_elites=24), quad_score(target), jnp.zeros((H, 2)), pi,
                      None, jax.random.PRNGKey(3))
    np.testing.assert_allclose(a, target, atol=1e-6)


def test_warm_start_shift():
    """With std pinned near zero every sample equals the warm-started mean: the output is prev_mean shifted."""
    mc = MPPIConfig(num_samples=16, num_elites=4, num_pi_trajs=0, iterations=2, min_std=1e-7, max_std=1e-7,
                    deterministic=True)
    pm = jnp.array([[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6]])
    a, mean, _ = mppi(mc, quad_score(jnp.zeros(2)), pm, None, None, jax.random.PRNGKey(0))
    np.testing.assert_allclose(mean, shift_mean(pm), atol=1e-5)
    np.testing.assert_allclose(a, pm[1], atol=1e-5)


def test_mppi_masks_and_determinism():
    mask = jnp.array([1.0, 1.0, 0.0, 0.0])
    pi = jax.random.uniform(jax.random.PRNGKey(5), (H, 24, 4), minval=-1, maxval=1)
    pm = jnp.full((H, 4), 0.5)  # also nonzero in the masked dims: they must still come out 0
    f = jax.jit(lambda k: mppi(MPPIConfig(), quad_score(jnp.array([0.2, 0.2, 0.9, 0.9])), pm, pi, mask, k))
    a, mean, info = f(jax.random.PRNGKey(0))
    assert np.all(np.asarray(a)[2:] == 0.0) and np.all(np.asarray(mean)[:, 2:] == 0.0)
    assert np.all(np.asarray(info["std"])[:, 2:] == 0.0) and np.all(np.asarray(info["elite_actions"])[..., 2:] == 0.0)
    a2, mean2, _ = f(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(mean, mean2)
    a3, _, _ = f(jax.random.PRNGKey(1))
    assert not np.array_equal(np.asarray(a), np.asarray(a3))


# ============================================================================================ WM pieces


def test_trajectory_values_match_a_python_loop(models):
    pc = models["pcfg"]
    wp = models["wm"]
    cp = jax.tree_util.tree_map(lambda x: x[0], models["critic"])
    obs = jax.random.normal(jax.random.PRNGKey(1), (24,))
    z0 = wm.encode(pc.wm, wp, obs, 4)
    acts = jax.random.uniform(jax.random.PRNGKey(2), (H, 5, A), minval=-1, maxval=1)
    # a nonzero reward head, so the reward term is not trivially 0
    wp = jax.tree_util.tree_map(lambda x: x, wp)
    wp["_reward"]["1"]["kernel"] = 0.3 * jax.random.normal(jax.random.PRNGKey(3), wp["_reward"]["1"]["kernel"].shape)
    got = values_j(pc, wp, cp, z0, acts, 4)

    @jax.jit
    def python_loop(wp, cp, z0, acts):  # the definition, unrolled
        z, want = jnp.broadcast_to(z0, (5, L)), jnp.zeros(5)
        for t in range(H):
            r = wm.reward_value(pc.wm, wm.reward_logits(pc.wm, wp, z, acts[t], 4), True)[..., 0]
            want = want + pc.gamma ** t * r
            z = wm.next_latent(pc.wm, wp, z, acts[t], 4)
        return want + pc.gamma ** H * critic.min_value(pc.critic, cp, z)

    want = python_loop(wp, cp, z0, acts)
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_policy_prior_is_the_stochastic_actor_rolled_in_the_wm(models):
    pc = models["pcfg"]
    ap = jax.tree_util.tree_map(lambda x: x[0], models["actor"])
    z0 = wm.encode(pc.wm, models["wm"], jnp.ones(24), 7)
    mask = jnp.array([1.0, 0, 0, 0, 0, 0])
    pi = prior_j(pc, ap, models["wm"], z0, 7, mask, 10, H, jax.random.PRNGKey(0))
    assert pi.shape == (H, 10, A)
    assert np.all(np.abs(np.asarray(pi)) <= 1.0) and np.all(np.asarray(pi)[..., 1:] == 0.0)
    assert float(jnp.std(pi[0, :, 0])) > 1e-3  # stochastic: the trajectories differ
    a0 = jnp.tanh(actors.action(pc.actor, ap, jnp.broadcast_to(z0, (10, L)), jax.random.split(jax.random.PRNGKey(0), H)[0]))
    np.testing.assert_allclose(pi[0], a0 * mask, rtol=1e-6, atol=1e-6)


def test_plan_on_a_toy_wm_where_reward_grows_with_a0(models):
    """Reward head = linear in a[0] (logits = c * a0 * bins), critic = 0: the optimum is a[0] = 1 everywhere."""
    pc = models["pcfg"]
    wp = jax.tree_util.tree_map(jnp.array, models["wm"])
    k = wp["_reward"]["1"]["kernel"]  # [32 hidden, bins]: replace the head by a linear one in the input
    hidden = wp["_reward"]["0"]
    # make the hidden layer pass a[0] through: input [z, emb, a] -> unit 0 = a0 (before LayerNorm/Mish)
    kin = jnp.zeros_like(hidden["kernel"]).at[L + 8 + 0, 0].set(1.0).at[L + 8 + 0, 1].set(-1.0)
    hidden["kernel"], hidden["bias"] = kin, jnp.zeros_like(hidden["bias"]).at[2].set(10.0)  # a constant unit keeps
    # LayerNorm from saturating to sign(a0): the normalised unit 0 is then monotone and near-linear in a0
    bins = jnp.linspace(pc.wm.vmin, pc.wm.vmax, pc.wm.num_bins)
    wp["_reward"]["1"]["kernel"] = jnp.zeros_like(k).at[0].set(0.05 * bins).at[1].set(-0.05 * bins)
    cp = jax.tree_util.tree_map(jnp.zeros_like, jax.tree_util.tree_map(lambda x: x[0], models["critic"]))
    ap = jax.tree_util.tree_map(lambda x: x[0], models["actor"])
    task = 4  # reacher-easy: 2 action dims
    mask = jnp.array([1.0, 1.0, 0, 0, 0, 0])
    obs = jax.random.normal(jax.random.PRNGKey(7), (24,))
    z0 = wm.encode(pc.wm, wp, obs, task)
    r = lambda a0: float(values_j(pc, wp, cp, z0, jnp.zeros((H, 1, A)).at[:, :, 0].set(a0), task)[0])
    assert r(1.0) > r(0.0) > r(-1.0)  # the toy is what it claims
    a, mean, info = plan_j(pc, SMALL, ap, wp, cp, obs, task, jnp.zeros((H, A)), jax.random.PRNGKey(0), mask)
    assert float(a[0]) > 0.8 and float(mean[:, 0].min()) > 0.8, (a, mean)
    assert np.all(np.asarray(a)[2:] == 0.0)
    pi = prior_j(pc, ap, wp, z0, task, mask, 24, H, jax.random.PRNGKey(0))
    v_pi = values_j(pc, wp, cp, z0, pi, task)
    v_plan = values_j(pc, wp, cp, z0, mean[:, None], task)[0]
    assert float(v_plan) > float(v_pi.max())


# ============================================================================================ batched planner


@pytest.fixture(scope="module")
def batched(models):
    pc = models["pcfg"]
    T, E = len(TASKS), E_SLOTS
    obs = jax.random.normal(jax.random.PRNGKey(11), (T * E, 24))
    tids = jnp.repeat(jnp.array(TASKS, jnp.int32), E)
    pm = jax.random.uniform(jax.random.PRNGKey(12), (T * E, H, A), minval=-1, maxval=1)
    bundle = {"actor": models["actor"], "wm": models["wm"], "critic": models["critic"]}
    f = jitted_planner(pc, SMALL, True)
    return {"T": T, "E": E, "obs": obs, "tids": tids, "pm": pm, "bundle": bundle, "f": f}


def test_planner_shapes_bounds_masks_determinism(batched):
    b = batched
    f, N = b["f"], b["T"] * b["E"]
    a, mean = f(b["bundle"], b["obs"], b["tids"], b["pm"], jax.random.PRNGKey(0))
    assert a.shape == (N, A) and mean.shape == (N, H, A)
    a, mean = np.asarray(a), np.asarray(mean)
    assert np.all(np.isfinite(a)) and np.all(np.abs(a) <= 1.0)
    for i, t in enumerate(np.asarray(b["tids"])):
        d = ACTION_DIMS_BY_ID[t]
        assert np.all(a[i, d:] == 0.0) and np.all(mean[i, :, d:] == 0.0), MT30_TASKS[t]
    a2, mean2 = f(b["bundle"], b["obs"], b["tids"], b["pm"], jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(mean, mean2)
    a3, _ = f(b["bundle"], b["obs"], b["tids"], b["pm"], jax.random.PRNGKey(1))
    assert not np.array_equal(a, np.asarray(a3))


def test_planner_uses_each_rows_params_and_matches_plan(models, batched):
    """Slot i uses bundle row i // E and equals the single-env `plan` with that row and its per-slot key."""
    b, pc = batched, models["pcfg"]
    key = jax.random.PRNGKey(4)
    a, mean = b["f"](b["bundle"], b["obs"], b["tids"], b["pm"], key)
    keys = jax.random.split(key, b["T"] * b["E"])
    masks = np.arange(A)[None, :] < np.array(ACTION_DIMS_BY_ID)[:, None]
    for i in (0, b["E"] + 1):
        row, t = i // b["E"], int(b["tids"][i])
        sel = lambda x: x[row]
        a_i, m_i, _ = plan_j(pc, SMALL, jax.tree_util.tree_map(sel, models["actor"]), models["wm"],
                             jax.tree_util.tree_map(sel, models["critic"]), b["obs"][i], t, b["pm"][i], keys[i],
                             jnp.asarray(masks[t], jnp.float32))
        np.testing.assert_allclose(a[i], a_i, atol=1e-5)
        np.testing.assert_allclose(mean[i], m_i, atol=1e-5)


def test_planner_per_task_wm_in_task_chunks(models, batched):
    """Per-task WM rows (fine-tuned WMs), lax.map over task rows: slot i equals `plan` with WM row i // E."""
    b, pc = batched, models["pcfg"]
    bundle = dict(b["bundle"], wm=models["wm_stacked"])
    key = jax.random.PRNGKey(2)
    a, mean = jitted_planner(pc, SMALL, False, 1)(bundle, b["obs"], b["tids"], b["pm"], key)
    keys = jax.random.split(key, b["T"] * b["E"])
    masks = np.arange(A)[None, :] < np.array(ACTION_DIMS_BY_ID)[:, None]
    a_shared, _ = b["f"](b["bundle"], b["obs"], b["tids"], b["pm"], key)
    assert not np.allclose(np.asarray(a), np.asarray(a_shared))  # another WM, other plans
    for i in (1, 2 * b["E"] - 1):
        row, t = i // b["E"], int(b["tids"][i])
        sel = lambda x: x[row]
        a_i, m_i, _ = plan_j(pc, SMALL, jax.tree_util.tree_map(sel, models["actor"]),
                             jax.tree_util.tree_map(sel, models["wm_stacked"]), jax.tree_util.tree_map(sel, models["critic"]),
                             b["obs"][i], t, b["pm"][i], keys[i], jnp.asarray(masks[t], jnp.float32))
        np.testing.assert_allclose(a[i], a_i, atol=1e-5)
        np.testing.assert_allclose(mean[i], m_i, atol=1e-5)


def test_mask_table_follows_the_behaviour(models):
    pc = models["pcfg"]
    np.testing.assert_array_equal(mask_table(pc)[7], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask_table(pc)[4], [1, 1, 0, 0, 0, 0])
    assert mask_table(dataclasses.replace(pc, action_masks=False)) is None  # B4 reference: padded dims planned too
    assert mask_table(dataclasses.replace(pc, action_dims=())) is None


# ============================================================================================ end to end


def eval_config(episodes=E_SLOTS, max_steps=5, seed=5):
    import ml_collections

    return ml_collections.ConfigDict({"task_chunk": 1, "eval": dict(
        episodes=episodes, max_steps=max_steps, seed=seed, workers=0, mppi_horizon=H, mppi_iterations=SMALL.iterations,
        mppi_samples=SMALL.num_samples, mppi_elites=SMALL.num_elites, mppi_policy_trajs=SMALL.num_pi_trajs,
        mppi_temperature=0.5, mppi_min_std=0.05, mppi_max_std=2.0)})


def test_planning_evaluation_end_to_end(models):
    """Per-task WMs (frozen_wm=None, as when the WM is fine-tuned), task rows in chunks of 1 (config.task_chunk)."""
    pc = models["pcfg"]
    spec = RunSpec(task_ids=TASKS, seeds=(0, 1))
    T = spec.num_tasks
    cfg = eval_config()
    # per-run actor/critic stacked [R, ...] seed-major, as the trainer holds them
    actor_r, critic_r = models["actor_runs"], models["critic_runs"]
    bundles = [{"actor": jax.tree_util.tree_map(lambda x: x[s * T:(s + 1) * T], actor_r), "wm": models["wm_stacked"]}
               for s in range(len(spec.seeds))]
    ev = cfg.eval
    res = evaluate_planning(pc, MPPIConfig.from_config(ev), spec, bundles, critic_r, False, episodes=ev.episodes,
                            max_steps=ev.max_steps, eval_seed=ev.seed, num_workers=0, task_chunk=cfg.task_chunk)
    assert isinstance(res, list) and len(res) == 2
    assert not np.array_equal(res[0].returns, res[1].returns)  # seed s plans with its own actor/critic rows
    for r in res:
        assert isinstance(r, EvalResult)
        assert r.returns.shape == (T, E_SLOTS) and r.successes.shape == (T, E_SLOTS)
        assert r.task_names == [MT30_TASKS[t] for t in TASKS]
        assert r.seed == 5 + 3 and r.seed_rule == "distinct" and r.max_steps == 5
        np.testing.assert_array_equal(r.env_seeds, [[episode_seed(8, e) for e in range(E_SLOTS)]] * T)
        assert np.all(np.isfinite(r.returns)) and np.all(r.returns >= 0.0)
        for t in range(T):  # what training.evaluation.Evaluation.final reads
            assert r.returns[t].shape == (E_SLOTS,) and np.isfinite(float(r.returns[t].mean()))
            assert 0.0 <= float(r.successes[t].mean()) <= 1.0


def test_planning_evaluator_shared_wm_deterministic_given_key(models):
    from fmbpo_jax.envs.pool import EnvPool

    pc = models["pcfg"]
    bundle = {"actor": models["actor"], "wm": models["wm"], "critic": models["critic"]}
    with EnvPool(np.repeat(TASKS, E_SLOTS), num_workers=0, max_steps=4) as pool:  # a pool reused, as the trainer's
        with PlanningEvaluator(pc, SMALL, TASKS, episodes=E_SLOTS, shared_wm=True, max_steps=4, pool=pool) as pev:
            r1 = pev.run(bundle, 3, jax.random.PRNGKey(0))
            r2 = pev.run(bundle, 3, jax.random.PRNGKey(0))
            r3 = pev.run(bundle, 4, jax.random.PRNGKey(0))
        assert not pool._closed  # not ours to close
        with pytest.raises(ValueError, match="slots"):
            PlanningEvaluator(pc, SMALL, TASKS, episodes=E_SLOTS, shared_wm=True, max_steps=5, pool=pool)
    np.testing.assert_array_equal(r1.returns, r2.returns)
    assert not np.array_equal(r1.returns, r3.returns)  # another env seed, other start states
    assert r1.returns.shape == (len(TASKS), E_SLOTS) and np.all(r1.returns > 0)  # dense rewards
