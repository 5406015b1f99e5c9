"""Unit tests of the training core: TD(lambda), discounting, ret_rms, LR schedule, preset switches, NaN guard, retrace."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmbpo_jax import actors, critic, mathops, presets, pwm
from fmbpo_jax import world_model as wm
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.world_model import WMConfig

H, B, O, A, L = 4, 8, 5, 3, 16

# Jitted entry points (cfg static): eager op-by-op execution of a whole epoch is far slower than compiling it.
jit_update = jax.jit(pwm.update, static_argnums=0)
jit_actor_loss = jax.jit(pwm.actor_loss, static_argnums=0)


def tiny_cfg(preset="fixed", **kw) -> pwm.PWMConfig:
    beh = presets.preset_values(preset)
    wcfg = WMConfig(kind=kw.pop("kind", "mlp"), obs_dim=O, action_dim=A, latent_dim=L, task_dim=4, num_tasks=2,
                    encoder_units=(32,), units=(32,), substeps=2, velocity_head=beh["velocity_head"])
    fields = {k: v for k, v in beh.items() if k in {f.name for f in dataclasses.fields(pwm.PWMConfig)}}
    fields.update(kw)
    return pwm.PWMConfig(wm=wcfg, actor=ActorConfig(latent_dim=L, action_dim=A, units=(16, 16)),
                         critic=CriticConfig(latent_dim=L, units=(16, 16)), horizon=H, critic_iterations=2,
                         critic_batches=2, wm_iterations=2, max_epochs=100, action_dims=(2, 3), **fields)


def random_batch(key, task=0, n_wm=None):
    k1, k2, k3 = jax.random.split(key, 3)
    batch = {"obs": jax.random.normal(k1, (H + 1, B, O)), "action": jax.random.uniform(k2, (H, B, A), minval=-1, maxval=1),
             "reward": jax.random.uniform(k3, (H, B)), "task": jnp.asarray(task, jnp.int32)}
    if n_wm:
        batch["wm"] = {"obs": jnp.tile(batch["obs"][None], (n_wm, 1, 1, 1)), "action": jnp.tile(batch["action"][None], (n_wm, 1, 1, 1)),
                       "reward": jnp.tile(batch["reward"][None], (n_wm, 1, 1))}
    return batch


def test_td_lambda_hand_example_and_lambda_zero():
    r = jnp.array([[1.0], [2.0]])
    v = jnp.array([[10.0], [20.0]])
    d = jnp.array([[0.0], [1.0]])
    out = pwm.td_targets(r, v, d, gamma=0.5, lam=0.5)
    # G1 = r0 + g V0 = 6; G2 = r0 + g r1 + g^2 V1 = 7; lambda-return 0.5*6 + 0.5*7; last step r1 + g V1 = 12
    np.testing.assert_allclose(out[:, 0], [6.5, 12.0], rtol=1e-6)
    np.testing.assert_allclose(pwm.td_targets(r, v, d, 0.5, 0.0), r + 0.5 * v, rtol=1e-6)
    ones = jnp.ones_like(d)
    np.testing.assert_allclose(pwm.td_targets(r, v, ones, 0.5, 0.95), r + 0.5 * v, rtol=1e-6)  # B6 collapse


def test_lr_schedule_endpoints():
    assert float(pwm.learning_rate(5e-4, 0, 1000)) == pytest.approx(5e-4)
    assert float(pwm.learning_rate(5e-4, 1000, 1000)) == pytest.approx(1e-5, rel=1e-4)
    assert float(pwm.learning_rate(5e-4, 500, 1000)) == pytest.approx((5e-4 + 1e-5) / 2)
    assert float(pwm.learning_rate(3e-4, 700, 1000, "constant")) == pytest.approx(3e-4)
    assert float(pwm.learning_rate(5e-4, 5000, 1000)) == pytest.approx(1e-5, rel=1e-4)  # never below the final lr


def constant_critic(cfg: CriticConfig, value: float):
    p = critic.init(cfg, jax.random.key(0))
    last = str(3 * len(cfg.units))
    p["critic"][last]["kernel"] = jnp.zeros_like(p["critic"][last]["kernel"])
    p["critic"][last]["bias"] = jnp.full_like(p["critic"][last]["bias"], value)
    return p


@pytest.mark.parametrize("mode,power", [("gamma_h", H), ("gamma_h_plus_1", H + 1)])
def test_terminal_discount(mode, power):
    cfg = tiny_cfg("reference", terminal_discount=mode, ret_rms=False)
    w = wm.init(cfg.wm, jax.random.key(1))  # zero reward head: predicted rewards ~0
    a = actors.init(cfg.actor, jax.random.key(2))
    c = constant_critic(cfg.critic, 3.0)
    loss, aux = jit_actor_loss(cfg, a, w, c, mathops.rms_init(), jnp.ones((B, O)), 0, jax.random.key(3))
    assert float(loss) == pytest.approx(-(cfg.gamma**power) * 3.0 / H, abs=1e-5)
    assert aux["states"].shape == (H, B, L) and aux["next_values"].shape == (H, B)
    np.testing.assert_allclose(aux["next_values"], 3.0, atol=1e-6)


def test_ret_rms_normalisation():
    cfg = tiny_cfg("reference", ret_rms=True)
    w, a = wm.init(cfg.wm, jax.random.key(1)), actors.init(cfg.actor, jax.random.key(2))
    c = critic.init(cfg.critic, jax.random.key(4))
    rms0 = mathops.rms_init()
    loss, aux = jit_actor_loss(cfg, a, w, c, rms0, jax.random.normal(jax.random.key(5), (B, O)), 1, jax.random.key(3))
    unnorm_cfg = dataclasses.replace(cfg, ret_rms=False)
    loss_h, _ = jit_actor_loss(unnorm_cfg, a, w, c, rms0, jax.random.normal(jax.random.key(5), (B, O)), 1, jax.random.key(3))
    loss_b_mean = float(loss_h) * H  # mean of the raw per-sample losses
    assert float(aux["rms"].count) == pytest.approx(1e-4 + B)
    assert float(loss) == pytest.approx(loss_b_mean / np.sqrt(float(aux["rms"].var[0]) + 1e-5), rel=1e-5)


def test_reward_loss_switch_changes_only_reward_part():
    ref = tiny_cfg("reference")
    p = wm.init(ref.wm, jax.random.key(0))
    b = random_batch(jax.random.key(1))
    t_ref, parts_ref = pwm.wm_loss(ref.wm, p, b["obs"], b["action"], b["reward"], 0, reward_loss="mse_bins")
    t_fix, parts_fix = pwm.wm_loss(ref.wm, p, b["obs"], b["action"], b["reward"], 0, reward_loss="two_hot_ce")
    assert float(parts_ref["dynamics_loss"]) == float(parts_fix["dynamics_loss"])
    assert float(parts_ref["reward_loss"]) != pytest.approx(float(parts_fix["reward_loss"]))


def test_reward_symexp_switch():
    w_cfg = tiny_cfg().wm
    logits = jax.random.normal(jax.random.key(0), (4, w_cfg.num_bins)) * 3
    plain = wm.reward_value(w_cfg, logits, False)
    np.testing.assert_allclose(wm.reward_value(w_cfg, logits, True), mathops.symexp(plain), rtol=1e-6)


def test_action_mask_switch_zeroes_padded_dims():
    seen = {}
    for masks in (False, True):
        cfg = tiny_cfg("fixed", action_masks=masks)
        w, a, c = wm.init(cfg.wm, jax.random.key(1)), actors.init(cfg.actor, jax.random.key(2)), critic.init(cfg.critic, jax.random.key(3))
        # gradient of the loss w.r.t. the last action-dim bias tells whether dim 2 reaches the WM
        g = jax.grad(lambda p: jit_actor_loss(cfg, p, w, c, mathops.rms_init(), jnp.ones((B, O)), 0, jax.random.key(4))[0])(a)
        seen[masks] = np.asarray(g["mu_net"]["6"]["bias"])
    assert seen[False][2] != 0.0
    assert seen[True][2] == 0.0 and seen[True][0] != 0.0  # task 0 has 2 action dims


def test_task_embedding_training_switch_and_wm_iterations():
    for train_emb in (False, True):
        cfg = tiny_cfg("fixed", finetune_wm=True, train_task_emb=train_emb, wm_updates="iterations")
        st = pwm.init_state(cfg, jax.random.key(0))
        new, m = jit_update(cfg, st, random_batch(jax.random.key(1), n_wm=cfg.wm_iterations), jax.random.key(2))
        changed = not np.allclose(new.wm["_task_emb"]["weight"], st.wm["_task_emb"]["weight"])
        assert changed == train_emb
        assert int(new.wm_opt.count) == cfg.wm_iterations  # wm_iterations Adam steps
    cfg = tiny_cfg("reference", finetune_wm=True)
    st = pwm.init_state(cfg, jax.random.key(0))
    new, _ = jit_update(cfg, st, random_batch(jax.random.key(1)), jax.random.key(2))
    assert int(new.wm_opt.count) == 1  # B9: one step on the policy batch


def test_critic_target_and_minibatch_switches():
    ref, fix = tiny_cfg("reference"), tiny_cfg("fixed")
    contiguous, in_slice = pwm.critic_minibatch_indices(ref, H * B, jax.random.key(0))
    np.testing.assert_array_equal(contiguous[0], np.arange(H * B // 2))
    assert bool(np.all(in_slice))
    shuffled = np.asarray(pwm.critic_minibatch_indices(fix, H * B, jax.random.key(0))[0])
    assert shuffled.shape == (fix.critic_iterations * fix.critic_batches, H * B // 2)
    assert sorted(shuffled[:2].ravel().tolist()) == list(range(H * B))  # one pass covers every row once
    w = wm.init(ref.wm, jax.random.key(1))
    outs = {}
    for cfg in (ref, fix):
        st = pwm.init_state(cfg, jax.random.key(0))
        _, m = jit_update(cfg, st, random_batch(jax.random.key(1)), jax.random.key(2), frozen_wm=w)
        outs[cfg.critic_target] = float(m["value_loss"])
    assert outs["one_step"] != outs["td_lambda"]


def test_contiguous_critic_slices_keep_the_short_last_one():
    """The reference's CriticDataset: slices of rows // critic_batches, plus a shorter last one (15 rows, 2 batches:
    7, 7 and 1), every row used once per pass; padding rows of the last slice are marked invalid."""
    ref = dataclasses.replace(tiny_cfg("reference"), critic_iterations=2)
    idx, in_slice = map(np.asarray, pwm.critic_minibatch_indices(ref, 15, jax.random.key(0)))
    assert idx.shape == (2 * 3, 7)
    assert in_slice[:3].sum(axis=1).tolist() == [7, 7, 1]
    np.testing.assert_array_equal(np.sort(idx[:3][in_slice[:3]]), np.arange(15))
    np.testing.assert_array_equal(idx[3:], idx[:3])  # the same slices on every pass
    with pytest.raises(ValueError, match="critic_batches"):
        pwm.critic_minibatch_indices(dataclasses.replace(ref, critic_batches=20), 15, jax.random.key(0))


def test_nan_batch_skips_actor_update_and_counts():
    cfg = tiny_cfg("fixed")
    w = wm.init(cfg.wm, jax.random.key(1))
    st = pwm.init_state(cfg, jax.random.key(0))
    b = random_batch(jax.random.key(1))
    b["obs"] = b["obs"].at[0, 0, 0].set(jnp.nan)
    new, m = jit_update(cfg, st, b, jax.random.key(2), frozen_wm=w)
    assert int(m["actor_nan_skip"]) == 1 and int(new.nan_skips) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, new.actor, st.actor)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(new.critic))


def test_update_is_pure_jittable_and_compiles_once():
    cfg = tiny_cfg("fixed", finetune_wm=True, kind="flow")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch, key):
        return jit_update(cfg, state, batch, key)

    st = pwm.init_state(cfg, jax.random.key(0))
    for i in range(3):
        st, m = step(st, random_batch(jax.random.key(i), n_wm=cfg.wm_iterations), jax.random.key(10 + i))
    assert int(st.epoch) == 3
    for k in ("actor_loss", "value_loss", "actor_grad_norm", "critic_grad_norm", "actor_stddev", "wm_loss", "dynamics_loss",
              "reward_loss", "wm_grad_norm", "lr_actor", "lr_critic", "lr_wm"):
        assert np.isfinite(float(m[k])), k
    assert float(m["lr_actor"]) < cfg.actor_lr


def test_presets_cover_every_behaviour_field():
    ref, fix = presets.preset_values("reference"), presets.preset_values("fixed")
    assert set(ref) == set(fix) and all(ref[k] != fix[k] for k in ref)
    with pytest.raises(ValueError, match="unknown preset"):
        presets.preset_values("nope")
    with pytest.raises(ValueError, match="critic_target"):
        tiny_cfg("fixed", critic_target="three_step")


def test_remat_same_update_less_activation_memory():
    """--config.remat recomputes the rollout steps in the backward pass: the epoch's numbers are unchanged, and the
    compiled program of a flow-WM fine-tuning epoch (H=8, Heun K=4) needs less temporary memory."""
    def cfg_of(remat):
        c = tiny_cfg(kind="flow", finetune_wm=True, remat=remat)
        wcfg = dataclasses.replace(c.wm, units=(64, 64), substeps=4)
        return dataclasses.replace(c, wm=wcfg, horizon=8)

    Hl, Bl = 8, 64
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    batch = {"obs": jax.random.normal(k[0], (Hl + 1, Bl, O)), "action": jax.random.uniform(k[1], (Hl, Bl, A), minval=-1, maxval=1),
             "reward": jax.random.uniform(k[2], (Hl, Bl)), "task": jnp.asarray(1, jnp.int32)}
    outs, temp = {}, {}
    for remat in (False, True):
        cfg = cfg_of(remat)
        state = pwm.init_state(cfg, jax.random.PRNGKey(0))
        fn = jax.jit(lambda s, b, kk: pwm.update(cfg, s, b, kk))
        compiled = fn.lower(state, batch, k[3]).compile()
        mem = compiled.memory_analysis()
        temp[remat] = mem.temp_size_in_bytes if mem is not None else None
        outs[remat] = compiled(state, batch, k[3])
    for a, b in zip(jax.tree_util.tree_leaves(outs[False]), jax.tree_util.tree_leaves(outs[True])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    if temp[False] is not None:
        assert temp[True] < 0.7 * temp[False], temp
