"""Parity of the model code with the PyTorch reference goldens (tests/fixtures/golden_small.npz).

float32, full-precision matmuls, max abs error <= 1e-5 (fixtures README's suggested tolerance).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmbpo_jax import actors, critic, nets, world_model as wm
from convert_ckpt.torch_mapping import actor_params_from_state_dict, critic_params_from_state_dict, wm_params_from_state_dict

ATOL = 1e-5


def close(name, got, golden):
    want = golden[name]
    got = np.asarray(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= ATOL, f"{name}: max abs error {err:.3g} > {ATOL}"


@pytest.fixture(scope="module")
def mlp(native_ckpt, small_models):
    return small_models[0], wm_params_from_state_dict(native_ckpt["world_model"], small_models[0])


@pytest.fixture(scope="module")
def flow(native_flow_ckpt, small_models):
    return small_models[1], wm_params_from_state_dict(native_flow_ckpt["world_model"], small_models[1])


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_mlp_world_model(mlp, golden):
    cfg, p = mlp
    task = golden["task_ids"]
    z = wm.encode(cfg, p, golden["obs"], task)
    close("enc_z", z, golden)
    close("enc_z_int_task", wm.encode(cfg, p, golden["obs_task1"], 1), golden)
    z = golden["enc_z"]
    close("mlp_next_z", wm.next_latent(cfg, p, z, golden["act"], task), golden)
    logits = wm.reward_logits(cfg, p, z, golden["act"], task)
    close("mlp_reward_logits", logits, golden)
    close("mlp_reward_almost_two_hot_inv", wm.reward_value(cfg, logits, apply_symexp=False), golden)
    close("mlp_reward_two_hot_inv", wm.reward_value(cfg, logits, apply_symexp=True), golden)
    nxt, lg = wm.step(cfg, p, z, golden["act"], task)
    close("mlp_next_z", nxt, golden)
    close("mlp_reward_logits", lg, golden)
    close("task_emb_weight_after_renorm", nets.renormed_table(p["_task_emb"]["weight"], np.unique(task)), golden)


def test_flow_world_model(flow, golden):
    cfg, p = flow
    task = golden["task_ids"]
    close("flow_enc_z", wm.encode(cfg, p, golden["obs"], task), golden)
    close("flow_enc_z2", wm.encode(cfg, p, golden["obs2"], task), golden)
    z, a = golden["flow_enc_z"], golden["act"]
    close("flow_velocity", wm.velocity(cfg, p, z, a, golden["tau"], task), golden)
    close("flow_next_heun4", wm.next_latent(cfg, p, z, a, task), golden)
    close("flow_next_euler2", wm.next_latent(wm.WMConfig(**{**cfg.__dict__, "integrator": "euler", "substeps": 2}), p, z, a, task), golden)
    close("flow_next_default", wm.next_latent(wm.WMConfig(**{**cfg.__dict__, "integrator": "heun", "substeps": 1}), p, z, a, task), golden)
    logits = wm.reward_logits(cfg, p, z, a, task)
    close("flow_reward_logits", logits, golden)
    close("flow_reward_almost_two_hot_inv", wm.reward_value(cfg, logits, False), golden)
    close("flow_reward_two_hot_inv", wm.reward_value(cfg, logits, True), golden)


def test_flow_matching_loss(flow, golden, small_cfg):
    cfg, p = flow
    z0, z1, a, task = golden["flow_enc_z"], golden["flow_enc_z2"], golden["act"], golden["task_ids"]
    gamma = small_cfg["gamma"]
    close("fm_loss_uniform", wm.flow_matching_loss(cfg, p, z0, z1, a, golden["fm_tau_uniform"], task, gamma**2), golden)
    close("fm_loss_midpoint", wm.flow_matching_loss(cfg, p, z0, z1, a, jnp.full((z0.shape[0], 1), 0.5), task, 1.0), golden)


def test_gaussian_actor(native_ckpt, small_models, golden):
    cfg = small_models[2]
    p = actor_params_from_state_dict(native_ckpt["actor"], cfg)
    np.testing.assert_array_equal(p["logstd"], golden["actor_logstd_raw"])
    z = golden["enc_z"]
    mu = actors.action(cfg, p, z, None, deterministic=True)
    close("actor_mu", mu, golden)
    close("actor_det_action_tanh", jnp.tanh(mu), golden)
    close("actor_logstd_clamped", actors.clamped_logstd(cfg, p), golden)
    close("actor_logstd_clamped", actors.project_logstd(cfg, p)["logstd"], golden)
    close("actor_std", jnp.exp(actors.clamped_logstd(cfg, p)), golden)
    std = jnp.exp(actors.clamped_logstd(cfg, p))
    close("actor_sample", mu + golden["actor_sample_eps"] * std, golden)
    lp = actors.gaussian_log_prob(cfg, actors.project_logstd(cfg, p), z, golden["actor_sample"])
    close("actor_log_probs_of_sample", lp, golden)


def test_flow_actor(flow_actor_ckpt, small_models, golden):
    cfg = small_models[3]
    p = actor_params_from_state_dict(flow_actor_ckpt["actor"], cfg)
    np.testing.assert_array_equal(p["init_logstd"], golden["flow_actor_init_logstd_raw"])
    z = golden["enc_z"]
    close("flow_actor_det_action", actors.action(cfg, p, z, None, deterministic=True), golden)
    close("flow_actor_init_logstd_clamped", actors.clamped_logstd(cfg, p), golden)
    z0 = golden["flow_actor_noise"] * jnp.exp(actors.clamped_logstd(cfg, p))
    close("flow_actor_z0", z0, golden)
    close("flow_actor_action_from_z0", actors.flow_integrate(cfg, p, golden["flow_actor_z0"], z), golden)
    close("flow_actor_action_from_z0_substeps4", actors.flow_integrate(cfg, p, golden["flow_actor_z0"], z, substeps=4), golden)


def test_flow_actor_stochastic_path_uses_scaled_noise(flow_actor_ckpt, small_models):
    """action(key) integrates from exp(init_logstd) * eps with eps ~ N(0, I) drawn from the key."""
    cfg = small_models[3]
    p = actor_params_from_state_dict(flow_actor_ckpt["actor"], cfg)
    z = jnp.ones((5, cfg.latent_dim)) / cfg.latent_dim
    key = jax.random.key(3)
    eps = jax.random.normal(key, (5, cfg.action_dim))
    want = actors.flow_integrate(cfg, p, eps * jnp.exp(actors.clamped_logstd(cfg, p)), z)
    np.testing.assert_allclose(actors.action(cfg, p, z, key), want, atol=1e-6)


def test_critic(native_ckpt, small_models, golden):
    cfg = small_models[4]
    p = critic_params_from_state_dict(native_ckpt["critic"], cfg)
    z = golden["enc_z"]
    close("critic_values", critic.values(cfg, p, z), golden)
    close("critic_min", critic.min_value(cfg, p, z), golden)
