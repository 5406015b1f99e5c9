"""Contracts of the layers and models: shapes, SimNorm, max-norm, integrator order, head variants, jit, bad input."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmbpo_jax import actors, critic, mathops, nets, world_model as wm
from fmbpo_jax.integrators import integrate
from convert_ckpt.torch_mapping import (StateDictError, critic_params_from_state_dict,
                                     state_dict_from_params, wm_params_from_state_dict)

SMALL = dict(obs_dim=12, action_dim=4, latent_dim=32, task_dim=16, num_tasks=3, encoder_units=(64, 64), units=(48, 48))


def test_simnorm_groups_sum_to_one():
    x = jax.random.normal(jax.random.key(0), (5, 7, 32)) * 3
    y = nets.simnorm(x, 8)
    assert y.shape == x.shape
    np.testing.assert_allclose(y.reshape(5, 7, 4, 8).sum(-1), 1.0, atol=1e-6)
    assert bool(jnp.all(y > 0))
    with pytest.raises(ValueError, match="simnorm_dim"):
        nets.simnorm(jnp.ones((2, 30)), 8)


def test_mish():
    x = jnp.linspace(-5, 5, 11)
    np.testing.assert_allclose(nets.mish(x), x * np.tanh(np.log1p(np.exp(x))), rtol=1e-6, atol=1e-7)


def test_mish_closed_form_matches_textbook_value_and_gradient():
    """The closed form (and its hand-written derivative) against x * tanh(softplus(x)) in float64, including
    the saturated tails where the clamp and the underflow of exp act."""
    x = np.concatenate([np.linspace(-30, 30, 601), [-100.0, -20.5, 19.9, 20.1, 50.0, 1e4]]).astype(np.float32)
    x64 = x.astype(np.float64)
    sp = np.logaddexp(0.0, x64)
    want = x64 * np.tanh(sp)
    want_grad = np.tanh(sp) + x64 * (1 - np.tanh(sp) ** 2) / (1 + np.exp(-x64))
    np.testing.assert_allclose(nets.mish(jnp.asarray(x)), want, rtol=2e-6, atol=1e-7)
    grad = jax.vmap(jax.grad(nets.mish))(jnp.asarray(x))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_max_norm_embedding():
    table = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0]])
    out = nets.task_embedding(table, jnp.array([0, 1, 2, 0]))
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), [1 / (1 + 2e-8 * 10), 0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(out[1], table[1])  # rows inside the ball are untouched
    # only looked-up rows are renormalised in the reference's in-place table
    after = nets.renormed_table(table, [1, 2])
    np.testing.assert_allclose(after[0], table[0])
    np.testing.assert_allclose(jnp.linalg.norm(after[2]), 1.0, atol=1e-6)


def test_max_norm_embedding_gradient_is_the_output_gradient():
    """PyTorch renormalises the stored row in place (no_grad) and looks it up, so the stored row receives the plain
    output gradient: no renormalisation factor, no Jacobian of the renormalisation."""
    table = jnp.array([[3.0, 4.0], [0.3, 0.4]])
    g = jax.grad(lambda t: jnp.sum(nets.task_embedding(t, jnp.array([0, 1, 0])) * jnp.array([1.0, 2.0])))(table)
    np.testing.assert_allclose(g, [[2.0, 4.0], [1.0, 2.0]])


def test_action_masks():
    m = nets.action_mask_table([1, 2, 4], 4)
    np.testing.assert_array_equal(m, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def test_heun_exact_on_linear_field_and_euler_first_order():
    # dx/dt = A x + b t  with a linear-in-(x,t) field: Heun (trapezoid) is exact for v(t) linear in t and x' = b t.
    b = jnp.array([1.0, -2.0])
    x0 = jnp.array([0.5, 0.25])
    exact = x0 + b / 2  # integral of b t from 0 to 1
    for k in (1, 2, 4):
        np.testing.assert_allclose(integrate(lambda x, t: b * t, x0, k, "heun"), exact, atol=1e-6)
    # Euler on dx/dt = x: error ~ C / K (first order): doubling K halves the error.
    errs = [abs(float(integrate(lambda x, t: x, jnp.array(1.0), k, "euler")) - np.e) for k in (8, 16, 32)]
    assert 1.8 < errs[0] / errs[1] < 2.2 and 1.8 < errs[1] / errs[2] < 2.2
    errs_h = [abs(float(integrate(lambda x, t: x, jnp.array(1.0), k, "heun")) - np.e) for k in (8, 16)]
    assert 3.5 < errs_h[0] / errs_h[1] < 4.5  # Heun is second order
    with pytest.raises(ValueError, match="unknown integrator"):
        integrate(lambda x, t: x, x0, 2, "rk4")
    with pytest.raises(ValueError, match="substeps"):
        integrate(lambda x, t: x, x0, 0, "heun")


def test_two_hot_round_trip():
    x = jnp.array([-50.0, -3.3, -0.2, 0.0, 0.7, 4.0, 1e6])  # symlog(1e6) = 13.8 > vmax: clipped
    th = mathops.two_hot(x, 101, -10.0, 10.0)
    np.testing.assert_allclose(th.sum(-1), 1.0, atol=1e-6)
    logits = jnp.log(th + 1e-30)
    back = mathops.two_hot_inv(logits, 101, -10.0, 10.0, apply_symexp=True)[..., 0]
    np.testing.assert_allclose(back[1:-1], x[1:-1], rtol=1e-4, atol=1e-5)
    assert float(back[-1]) == pytest.approx(float(mathops.symexp(jnp.array(10.0))), rel=1e-4)  # clipped
    np.testing.assert_allclose(mathops.symexp(mathops.symlog(x)), x, rtol=1e-5)
    no_symexp = mathops.two_hot_inv(logits, 101, -10.0, 10.0, apply_symexp=False)[..., 0]
    np.testing.assert_allclose(no_symexp[1:-1], mathops.symlog(x[1:-1]), atol=1e-5)


def test_running_mean_std_matches_numpy():
    rms = mathops.rms_init((1,))
    rng = np.random.default_rng(0)
    data = [rng.normal(3.0, 2.0, size=(64, 1)).astype(np.float32) for _ in range(5)]
    for d in data:
        rms = mathops.rms_update(rms, jnp.asarray(d))
    allx = np.concatenate(data)
    # the 1e-4 prior count with var 1, mean 0 is negligible here
    np.testing.assert_allclose(rms.mean, allx.mean(0), rtol=1e-4)
    np.testing.assert_allclose(rms.var, allx.var(0), rtol=1e-3)
    assert float(rms.count) == pytest.approx(320 + 1e-4)


@pytest.mark.parametrize("kind", ["mlp", "flow"])
def test_world_model_shapes_and_simplex(kind):
    cfg = wm.WMConfig(kind=kind, substeps=2, **SMALL)
    p = wm.init(cfg, jax.random.key(0))
    obs = jax.random.normal(jax.random.key(1), (3, 5, 12))
    task = jnp.array([0, 1, 2, 0, 1])
    z = wm.encode(cfg, p, obs, task)
    assert z.shape == (3, 5, 32)
    np.testing.assert_allclose(z.reshape(3, 5, 4, 8).sum(-1), 1.0, atol=1e-5)
    a = jnp.zeros((3, 5, 4))
    z1, logits = wm.step(cfg, p, z, a, task)
    assert z1.shape == (3, 5, 32) and logits.shape == (3, 5, 101)
    # reference init: zero reward head => all logits equal => expectation 0 (up to float summation order)
    np.testing.assert_array_equal(logits, logits[..., :1] * jnp.ones_like(logits))
    np.testing.assert_allclose(wm.reward_value(cfg, logits, False), 0.0, atol=1e-6)


def test_velocity_head_variants():
    """reference 'simnorm': v on the simplex, z' group sums grow by 1; fixed 'linear': signed v, z' on the simplex."""
    ref = wm.WMConfig(kind="flow", velocity_head="simnorm", substeps=2, **SMALL)
    fix = wm.WMConfig(kind="flow", velocity_head="linear", substeps=2, **SMALL)
    obs = jax.random.normal(jax.random.key(1), (6, 12))
    task = jnp.array([0, 1, 2, 0, 1, 2])
    a = jax.random.uniform(jax.random.key(2), (6, 4), minval=-1, maxval=1)
    tau = jnp.full((6, 1), 0.3)
    p_ref = wm.init(ref, jax.random.key(0))
    z = wm.encode(ref, p_ref, obs, task)
    v = wm.velocity(ref, p_ref, z, a, tau, task)
    np.testing.assert_allclose(v.reshape(6, 4, 8).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(wm.next_latent(ref, p_ref, z, a, task).reshape(6, 4, 8).sum(-1), 2.0, atol=1e-5)
    p_fix = wm.init(fix, jax.random.key(0))
    assert "ln" not in p_fix["_velocity"]["2"]  # plain linear last layer
    p_fix["_velocity"]["2"]["kernel"] = jax.random.normal(jax.random.key(5), p_fix["_velocity"]["2"]["kernel"].shape)
    v = wm.velocity(fix, p_fix, z, a, tau, task)
    assert float(v.min()) < 0 < float(v.max())
    np.testing.assert_allclose(wm.next_latent(fix, p_fix, z, a, task).reshape(6, 4, 8).sum(-1), 1.0, atol=1e-5)


def test_jit_equals_nojit_and_no_retrace():
    cfg = wm.WMConfig(kind="flow", substeps=3, **SMALL)
    p = wm.init(cfg, jax.random.key(0))
    obs = jax.random.normal(jax.random.key(1), (4, 12))
    task = jnp.array([0, 1, 2, 1])
    a = jnp.ones((4, 4)) * 0.5

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(p, obs, a, task):
        z = wm.encode(cfg, p, obs, task)
        return wm.step(cfg, p, z, a, task)

    eager = wm.step(cfg, p, wm.encode(cfg, p, obs, task), a, task)
    for i in range(3):
        out = f(p, obs + i * 0.0, a, task)
    for x, y in zip(out, eager):
        np.testing.assert_allclose(x, y, atol=1e-6)
    acfg = actors.ActorConfig(kind="flow", latent_dim=32, action_dim=4, units=(16, 16))
    ap = actors.init(acfg, jax.random.key(3))
    g = jax.jit(lambda p, z, k: actors.action(acfg, p, z, k))
    z = wm.encode(cfg, p, obs, task)
    np.testing.assert_allclose(g(ap, z, jax.random.key(0)), actors.action(acfg, ap, z, jax.random.key(0)), atol=1e-6)


def test_deterministic_actions():
    for kind in ("gaussian", "flow"):
        cfg = actors.ActorConfig(kind=kind, latent_dim=32, action_dim=4, units=(16, 16))
        p = actors.init(cfg, jax.random.key(0))
        z = jax.random.normal(jax.random.key(1), (5, 32))
        d1 = actors.action(cfg, p, z, jax.random.key(1), deterministic=True)
        d2 = actors.action(cfg, p, z, jax.random.key(2), deterministic=True)
        np.testing.assert_array_equal(d1, d2)
        s = actors.action(cfg, p, z, jax.random.key(1))
        assert not np.allclose(s, d1)
        with pytest.raises(ValueError, match="PRNG key"):
            actors.action(cfg, p, z, None)


def test_logstd_clamp_is_straight_through():
    cfg = actors.ActorConfig(kind="gaussian", latent_dim=8, action_dim=2, units=(4,))
    p = actors.init(cfg, jax.random.key(0))
    p["logstd"] = jnp.array([-3.0, 0.0])
    np.testing.assert_allclose(actors.clamped_logstd(cfg, p), [cfg.min_logstd, 0.0])
    g = jax.grad(lambda p: actors.clamped_logstd(cfg, p).sum())(p)["logstd"]
    np.testing.assert_array_equal(g, [1.0, 1.0])  # gradient reaches the clamped entry, as in the reference
    np.testing.assert_allclose(actors.project_logstd(cfg, p)["logstd"], [cfg.min_logstd, 0.0])


def test_48m_parameter_counts():
    count = lambda f: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(jax.eval_shape(f)))
    k = jax.random.key(0)
    assert count(lambda: wm.init(wm.WMConfig(kind="mlp"), k)) == 18_983_909
    assert count(lambda: wm.init(wm.WMConfig(kind="flow", units=(1788, 1788)), k)) == 18_946_829
    assert count(lambda: actors.init(actors.ActorConfig(kind="gaussian"), k)) == 409_912
    assert count(lambda: actors.init(actors.ActorConfig(kind="flow"), k)) == 412_712
    assert count(lambda: critic.init(critic.CriticConfig(), k)) == 1_167_603


def test_init_matches_reference_statistics():
    cfg = wm.WMConfig(kind="mlp", **SMALL)
    p = wm.init(cfg, jax.random.key(0))
    np.testing.assert_array_equal(p["_reward"]["2"]["kernel"], 0.0)
    assert abs(float(jnp.std(p["_encoder"]["1"]["kernel"])) - 0.02) < 0.002
    np.testing.assert_array_equal(p["_encoder"]["0"]["ln"]["scale"], 1.0)
    assert float(jnp.abs(p["_task_emb"]["weight"]).max()) <= 0.02
    cp = critic.init(critic.CriticConfig(latent_dim=32, units=(16, 8)), jax.random.key(0))
    w = cp["critic"]["0"]["kernel"][0]  # [32, 16]: orthogonal columns with gain sqrt(2)
    np.testing.assert_allclose(w.T @ w, 2.0 * np.eye(16), atol=1e-5)
    assert not np.allclose(cp["critic"]["0"]["kernel"][0], cp["critic"]["0"]["kernel"][1])  # members differ


def test_bad_inputs_are_named():
    cfg = wm.WMConfig(kind="mlp", **SMALL)
    p = wm.init(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="obs_dim=12"):
        wm.encode(cfg, p, jnp.zeros((2, 11)), jnp.array([0, 1]))
    z = jnp.zeros((2, 32))
    with pytest.raises(ValueError, match="action_dim=4"):
        wm.next_latent(cfg, p, z, jnp.zeros((2, 6)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="task id out of range"):
        wm.encode(cfg, p, jnp.zeros((2, 12)), jnp.array([0, 3]))
    with pytest.raises(ValueError, match="task id out of range"):
        wm.encode(cfg, p, jnp.zeros((2, 12)), -1)
    with pytest.raises(ValueError, match="do not match the batch shape"):
        wm.encode(cfg, p, jnp.zeros((2, 12)), jnp.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integers"):
        wm.encode(cfg, p, jnp.zeros((2, 12)), jnp.array([0.0, 1.0]))


def test_state_dict_round_trip_and_errors(native_ckpt, small_models):
    cfg = small_models[0]
    sd = {k: v.numpy() for k, v in native_ckpt["world_model"].items()}
    p = wm_params_from_state_dict(sd, cfg)
    back = state_dict_from_params(p)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    missing = dict(sd)
    del missing["_reward.2.bias"]
    with pytest.raises(StateDictError, match=r"missing keys: \['_reward.2.bias'\]"):
        wm_params_from_state_dict(missing, cfg)
    extra = dict(sd, **{"_foo.weight": np.zeros(3, np.float32)})
    with pytest.raises(StateDictError, match=r"unexpected keys: \['_foo.weight'\]"):
        wm_params_from_state_dict(extra, cfg)
    bad = dict(sd, **{"_encoder.1.weight": np.zeros((64, 63), np.float32)})
    with pytest.raises(StateDictError, match=r"'_encoder.1.weight': expected \(64, 64\), found \(64, 63\)"):
        wm_params_from_state_dict(bad, cfg)
    csd = {k: v.numpy() for k, v in native_ckpt["critic"].items()}
    cp = critic_params_from_state_dict(csd, small_models[4])
    cback = state_dict_from_params(cp, ensemble=True)
    for k in csd:
        np.testing.assert_array_equal(cback[k], csd[k])
