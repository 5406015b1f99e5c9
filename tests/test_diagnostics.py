"""fmbpo_jax.diagnostics: ESNR on constructed gradient sets, Jacobian proxies against closed forms,
velocity-evaluation counts, and the trainer entry point on a tiny model."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmbpo_jax import diagnostics as dg
from fmbpo_jax import pwm
from fmbpo_jax import world_model as wm
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.world_model import WMConfig

# Tiny graphs: skip XLA's expensive CPU optimisations, compile time dominates these tests.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fjit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


# ------------------------------------------------------------------------------------------------ ESNR


def test_esnr_identical_samples_is_huge():
    v = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.25, -1.0])}
    g = jax.tree_util.tree_map(lambda x: jnp.stack([x] * 4), v)
    ratio, db = dg.esnr(g)
    mu_sq = 1 + 4 + 0.25 + 9 + 0.0625 + 1
    assert float(ratio) == pytest.approx(mu_sq / dg.VAR_FLOOR, rel=1e-5)
    assert float(db) == pytest.approx(10 * np.log10(mu_sq / dg.VAR_FLOOR), rel=1e-5)


def test_esnr_opposite_samples_is_zero():
    v = jnp.array([1.0, -2.0, 3.0])
    ratio, db = dg.esnr({"a": jnp.stack([v, -v, v, -v])})
    assert float(ratio) == 0.0
    assert float(db) == pytest.approx(-120.0)


def test_esnr_hand_computed():
    # g1 = (1, 0), g2 = (3, 0): mu = (2, 0), ||mu||^2 = 4, mean ||g||^2 = 5, Var = 1 -> ESNR 4, 6.02 dB
    g = {"x": jnp.array([[1.0], [3.0]]), "y": jnp.array([[0.0], [0.0]])}
    ratio, db = dg.esnr(g)
    assert float(ratio) == pytest.approx(4.0, rel=1e-6)
    assert float(db) == pytest.approx(10 * np.log10(4.0), rel=1e-6)


def test_esnr_matches_the_literal_formula_on_random_pytrees():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3, 2)) + 0.7, rng.normal(size=(5, 4)) - 0.3
    flat = np.concatenate([a.reshape(5, -1), b], axis=1)
    mu = flat.mean(0)
    var = np.mean(np.sum(flat**2, axis=1)) - np.sum(mu**2)
    expect = np.sum(mu**2) / max(var, 1e-10)
    ratio, db = fjit(dg.esnr)({"a": jnp.asarray(a, jnp.float32), "b": {"c": jnp.asarray(b, jnp.float32)}})
    assert float(ratio) == pytest.approx(expect, rel=1e-4)
    assert float(db) == pytest.approx(10 * np.log10(expect + 1e-12), rel=1e-4)


def test_esnr_rejects_mismatched_sample_axes():
    with pytest.raises(ValueError, match="leading sample axis"):
        dg.esnr({"a": jnp.zeros((3, 2)), "b": jnp.zeros((4,))})


def test_module_grad_norms():
    g = {"_encoder": {"k": jnp.array([3.0, 4.0])}, "_reward": {"k": jnp.array([[1.0, 2.0], [2.0, 4.0]])}}
    out = dg.module_grad_norms(g, "wm/")
    assert float(out["wm/_encoder"]) == pytest.approx(5.0)
    assert float(out["wm/_reward"]) == pytest.approx(5.0)


# ------------------------------------------------------------------------------------ Jacobian proxies


def _linear(A, B):
    return lambda z, a: z @ A.T + a @ B.T


def test_jacobian_estimator_exact_for_diagonal_maps():
    # Rademacher probes: ||diag(d)^T u||^2 = sum d_i^2 for every u, so one probe is exact
    A, B = jnp.diag(jnp.array([1.0, -2.0, 3.0])), jnp.array([[0.5, 0.0], [0.0, -1.5], [0.0, 0.0]])
    z, a = jnp.ones((4, 3)), jnp.ones((4, 2))
    jz, ja = dg.jacobian_fro_estimates(_linear(A, B), (z, a), jax.random.PRNGKey(0), num_probes=1)
    assert float(jz) == pytest.approx(float(jnp.linalg.norm(A)), rel=1e-6)
    assert float(ja) == pytest.approx(float(jnp.linalg.norm(B)), rel=1e-6)


def test_jacobian_estimator_unbiased_on_a_dense_linear_map():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    A, B = jax.random.normal(k1, (6, 6)), jax.random.normal(k2, (6, 3))
    z, a = jax.random.normal(k3, (16, 6)), jnp.zeros((16, 3))
    f = _linear(A, B)
    ez, ea = dg.jacobian_fro_exact(f, (z, a))
    assert float(ez) == pytest.approx(float(jnp.linalg.norm(A)), rel=1e-5)
    assert float(ea) == pytest.approx(float(jnp.linalg.norm(B)), rel=1e-5)
    jz, ja = fjit(lambda k: dg.jacobian_fro_estimates(f, (z, a), k, num_probes=256))(jax.random.PRNGKey(2))
    assert float(jz) == pytest.approx(float(ez), rel=0.05)
    assert float(ja) == pytest.approx(float(ea), rel=0.05)


def _tiny_wm(kind: str, integrator: str = "heun", substeps: int = 3) -> WMConfig:
    return WMConfig(kind=kind, obs_dim=5, action_dim=2, latent_dim=8, task_dim=4, num_tasks=3, encoder_units=(16,),
                    units=(16,), simnorm_dim=4, num_bins=11, velocity_head="simnorm", integrator=integrator, substeps=substeps)


@pytest.mark.parametrize("integrator", ["heun", "euler"])
def test_wm_jacobian_proxies_through_the_whole_flow_integration(monkeypatch, integrator):
    """A linear velocity v = M z + N a: the K-substep macro step has closed-form Jacobians."""
    K, L, Ad = 3, 8, 2
    cfg = _tiny_wm("flow", integrator, K)
    M = jax.random.normal(jax.random.PRNGKey(3), (L, L)) * 0.5
    N = jax.random.normal(jax.random.PRNGKey(4), (L, Ad))
    monkeypatch.setattr(wm, "velocity", lambda cfg_, params, z, a, tau, task: z @ M.T + a @ N.T)
    dt = 1.0 / K
    Mn, Nn, I = np.asarray(M, np.float64), np.asarray(N, np.float64), np.eye(L)
    P = I + dt * Mn + (dt**2 / 2) * Mn @ Mn if integrator == "heun" else I + dt * Mn
    Q = dt * Nn + (dt**2 / 2) * Mn @ Nn if integrator == "heun" else dt * Nn
    Jz = np.linalg.matrix_power(P, K)
    Ja = sum(np.linalg.matrix_power(P, k) @ Q for k in range(K))
    z, a = jnp.ones((8, L)) / L, jnp.full((8, Ad), 0.3)
    out = dg.wm_jacobian_proxies(cfg, {}, z, a, 0, jax.random.PRNGKey(5), num_probes=400)
    assert float(out["wm_jac_z"]) == pytest.approx(np.linalg.norm(Jz), rel=0.06)
    assert float(out["wm_jac_a"]) == pytest.approx(np.linalg.norm(Ja), rel=0.06)
    ez, ea = dg.jacobian_fro_exact(lambda zz, aa: wm.next_latent(cfg, {}, zz, aa, 0), (z, a))
    assert float(ez) == pytest.approx(np.linalg.norm(Jz), rel=1e-4)
    assert float(ea) == pytest.approx(np.linalg.norm(Ja), rel=1e-4)


# ---------------------------------------------------------------------------------- velocity counts


def _pcfg(wm_kind="flow", actor_kind="flow", integrator="heun", wm_k=4, actor_k=2, **kw) -> pwm.PWMConfig:
    w = dataclasses.replace(_tiny_wm(wm_kind, integrator, wm_k))
    a = ActorConfig(kind=actor_kind, latent_dim=8, action_dim=2, units=(16,), integrator=integrator, substeps=actor_k)
    c = CriticConfig(latent_dim=8, units=(16,), num_critics=2)
    return pwm.PWMConfig(wm=w, actor=a, critic=c, **kw)


def test_velocity_counts_heun_and_euler():
    H = 16
    heun = dg.velocity_evals_per_epoch(_pcfg(horizon=H, finetune_wm=True, wm_iterations=8), batch_size=512, wm_batch_size=256)
    # WM loss: 8 steps x 16 x (1 flow-matching + 2*4 rollout); actor rollout: 16 x 2*4 WM, 16 x 2*2 actor
    assert heun["wm_loss"] == 8 * 16 * 9 and heun["wm_actor_rollout"] == 128 and heun["actor_rollout"] == 64
    assert heun["total"] == 1152 + 128 + 64
    assert heun["wm_loss_samples"] == 1152 * 256 and heun["actor_rollout_samples"] == 64 * 512
    euler = dg.velocity_evals_per_epoch(_pcfg(integrator="euler", horizon=H, finetune_wm=True, wm_iterations=8))
    assert (euler["wm_loss"], euler["wm_actor_rollout"], euler["actor_rollout"]) == (8 * 16 * 5, 64, 32)
    ref = dg.velocity_evals_per_epoch(_pcfg(horizon=H, finetune_wm=True, wm_updates="policy_batch"))
    assert ref["wm_loss"] == 16 * 9  # B9: one WM step per epoch
    tf = dg.velocity_evals_per_epoch(_pcfg(horizon=H, finetune_wm=True, wm_iterations=2, teacher_forcing=True))
    assert tf["wm_loss"] == 2 * 16
    frozen = dg.velocity_evals_per_epoch(_pcfg("mlp", "gaussian", horizon=H))
    assert frozen == {"wm_loss": 0, "wm_actor_rollout": 16, "actor_rollout": 16, "wm_total": 16, "actor_total": 16, "total": 32}


# ----------------------------------------------------------------------- actor ESNR / trainer entry


@pytest.fixture(scope="module")
def tiny():
    """Flow WM (Heun K=2, fine-tuned) + Gaussian actor whose noise can be switched off (min_logstd -100)."""
    cfg = _pcfg("flow", "gaussian", wm_k=2, horizon=3, finetune_wm=True, wm_iterations=1, critic_iterations=1,
                critic_batches=1, action_dims=(1, 2, 2))
    cfg = dataclasses.replace(cfg, actor=dataclasses.replace(cfg.actor, min_logstd=-100.0))
    state = fjit(pwm.init_state, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    batch = {"obs": jax.random.normal(k1, (4, 8, 5)), "action": jnp.tanh(jax.random.normal(k2, (3, 8, 2))),
             "reward": jax.random.uniform(k3, (3, 8)), "task": jnp.asarray(1, jnp.int32)}
    return cfg, state, batch


def test_wm_jacobian_proxies_on_a_real_flow_world_model(tiny):
    cfg, state, batch = tiny
    params = state.wm

    @fjit
    def both(k):
        z = wm.encode(cfg.wm, params, batch["obs"][0, :6], 1)
        a = batch["action"][0, :6]
        est = dg.wm_jacobian_proxies(cfg, params, z, a, 1, k, 300)
        exact = dg.jacobian_fro_exact(lambda zz, aa: wm.next_latent(cfg.wm, params, zz, aa, 1), (z, a))
        return est, exact

    out, (ez, ea) = both(jax.random.PRNGKey(3))
    assert float(ez) > 0 and float(ea) > 0
    assert float(out["wm_jac_z"]) == pytest.approx(float(ez), rel=0.1)
    assert float(out["wm_jac_a"]) == pytest.approx(float(ea), rel=0.1)


def test_actor_grad_esnr_and_group_gradients_average_to_the_batch_gradient(tiny):
    cfg, state, batch = tiny
    obs0, wm_params = batch["obs"][0], state.wm
    # a deterministic actor (noise scale e^-60): the group gradients must average to the full-batch gradient
    det = dict(state.actor, logstd=jnp.full_like(state.actor["logstd"], -60.0))

    @fjit
    def run(key):
        esnr = dg.actor_grad_esnr(cfg, state.actor, wm_params, state.critic, state.ret_rms, obs0, 1, key, 8)
        g = dg.actor_group_grads(cfg, det, wm_params, state.critic, state.ret_rms, obs0, 1, key, 4)
        full = jax.grad(lambda p: pwm.actor_loss(dataclasses.replace(cfg, ret_rms=False), p, wm_params, state.critic,
                                                  state.ret_rms, obs0, 1, key)[0])(det)
        return esnr, jax.tree_util.tree_map(lambda x: x.mean(0), g), full

    (ratio, db), mean_g, full = run(jax.random.PRNGKey(2))
    assert np.isfinite(float(ratio)) and float(ratio) >= 0 and np.isfinite(float(db))
    for x, y in zip(jax.tree_util.tree_leaves(mean_g), jax.tree_util.tree_leaves(full)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_epoch_diagnostics_vmapped_over_runs(tiny):
    cfg, state, batch = tiny
    states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state)
    batches = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), batch)
    fn = fjit(jax.vmap(lambda st, b, k: dg.epoch_diagnostics(cfg, st, b, k, None, num_groups=4, num_probes=2)))
    out = fn(states, batches, jax.random.split(jax.random.PRNGKey(3), 2))
    for k in ("actor_esnr", "actor_esnr_db", "wm_jac_z", "wm_jac_a", "actor_grad_norm/mu_net", "actor_grad_norm/logstd",
              "wm_grad_norm/_velocity", "wm_grad_norm/_encoder", "wm_grad_norm/_reward"):
        assert out[k].shape == (2,) and np.all(np.isfinite(np.asarray(out[k]))), k
    with pytest.raises(ValueError, match="frozen_wm"):
        jax.eval_shape(lambda: dg.epoch_diagnostics(dataclasses.replace(cfg, finetune_wm=False), state, batch,
                                                     jax.random.PRNGKey(0), None))
