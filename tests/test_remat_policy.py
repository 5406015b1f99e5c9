"""What the rollout scans keep for the backward pass (PWMConfig.remat, --config.remat_policy): 'all', 'step' and
'matmul_inputs' give the same update, 'matmul_inputs' needs less temporary memory than 'all', the matmul-input
name costs nothing outside a checkpoint, and the config errors name the flag."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmbpo_jax import nets, presets, pwm
from fmbpo_jax import world_model as wm
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.run_config import ConfigError, RunPlan, remat_setting
from fmbpo_jax.world_model import WMConfig

O, A = 5, 3
POLICIES = ("all", "step", "matmul_inputs")


def small_cfg(kind: str, actor: str, dtype: str, remat, *, latent=16, units=(32,), horizon=4, finetune=True,
              wm_dtype: str | None = None):
    """A fixed-preset PWMConfig; kind: the WM ('mlp' | 'flow'), actor: 'gaussian' | 'flow', dtype: matmul operands
    (wm_dtype: the WM's, if different)."""
    beh = presets.preset_values("fixed")
    wcfg = WMConfig(kind=kind, obs_dim=O, action_dim=A, latent_dim=latent, task_dim=4, num_tasks=2, encoder_units=units,
                    units=units, substeps=2, velocity_head=beh["velocity_head"], compute_dtype=wm_dtype or dtype)
    fields = {k: v for k, v in beh.items() if k in {f.name for f in dataclasses.fields(pwm.PWMConfig)}}
    return pwm.PWMConfig(
        wm=wcfg, actor=ActorConfig(kind=actor, latent_dim=latent, action_dim=A, units=(16, 16), substeps=2, compute_dtype=dtype),
        critic=CriticConfig(latent_dim=latent, units=(16, 16), compute_dtype=dtype), horizon=horizon, critic_iterations=1,
        critic_batches=2, wm_iterations=1, max_epochs=100, action_dims=(2, 3), finetune_wm=finetune, remat=remat, **fields)


def random_batch(key, horizon: int, batch: int) -> dict:
    """obs [H+1, B, O], action [H, B, A], reward [H, B], task 1."""
    k = jax.random.split(key, 3)
    return {"obs": jax.random.normal(k[0], (horizon + 1, batch, O)),
            "action": jax.random.uniform(k[1], (horizon, batch, A), minval=-1, maxval=1),
            "reward": jax.random.uniform(k[2], (horizon, batch)), "task": jnp.asarray(1, jnp.int32)}


def rollout_grads(cfg: pwm.PWMConfig, state, batch, key):
    """(actor loss, its grads wrt actor and WM params), (WM loss, its grads): the two scans remat acts on."""
    def actor(ap, wp):
        return pwm.actor_loss(cfg, ap, wp, state.critic, state.ret_rms, batch["obs"][0], batch["task"], key)[0]

    def world(wp):
        return pwm.wm_loss(cfg.wm, wp, batch["obs"], batch["action"], batch["reward"], batch["task"], key,
                           reward_loss=cfg.reward_loss, remat=cfg.remat)[0]

    return jax.value_and_grad(actor, argnums=(0, 1))(state.actor, state.wm), jax.value_and_grad(world)(state.wm)


def per_policy(fn, cfgs: dict, *args):
    """fn(cfg, *args) for every policy, jitted as ONE program (one compile instead of three), run once."""
    return jax.device_get(jax.jit(lambda *a: {p: fn(cfgs[p], *a) for p in POLICIES})(*args))


def assert_same_as_all(outs: dict, atol: float) -> None:
    ref = jax.tree_util.tree_leaves(outs["all"])
    for policy in ("step", "matmul_inputs"):
        got = jax.tree_util.tree_leaves(outs[policy])
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol, err_msg=policy)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind,actor", [("mlp", "gaussian"), ("flow", "flow")])
def test_same_rollout_gradients_under_every_policy(kind, actor, dtype):
    """Losses and gradients of both rollout scans (wm_loss, actor_loss) under 'step' and 'matmul_inputs' equal those
    of 'all' within 1e-6 absolute (gradients up to ~100). Recomputation repeats the same ops on the same inputs (the
    saved bf16 operands are the very values the forward multiplied): measured BITWISE equal for the MLP WM; the flow
    WM differs by a few float32 ulps (<= 7.5e-9) where XLA fuses the recomputed integrator steps differently."""
    cfgs = {p: small_cfg(kind, actor, dtype, p) for p in POLICIES}
    state = pwm.init_state(cfgs["all"], jax.random.PRNGKey(0))
    outs = per_policy(rollout_grads, cfgs, state, random_batch(jax.random.PRNGKey(3), 4, 8), jax.random.PRNGKey(4))
    assert_same_as_all(outs, atol=1e-6)


def test_same_update_under_every_policy():
    """The whole epoch (flow WM fine-tuned + flow actor, bf16, the issue's setting): metrics and new params within
    1e-6 absolute (measured <= 1e-9: Adam turns the gradients' ulp differences into parameter differences of the
    same order, and more only where a gradient is ~0)."""
    cfgs = {p: small_cfg("flow", "flow", "bfloat16", p) for p in POLICIES}
    state = pwm.init_state(cfgs["all"], jax.random.PRNGKey(0))
    outs = per_policy(lambda c, s, b, k: pwm.update(c, s, b, k), cfgs, state, random_batch(jax.random.PRNGKey(3), 4, 8),
                      jax.random.PRNGKey(4))
    assert_same_as_all(outs, atol=1e-6)


def test_matmul_inputs_need_less_temporary_memory_than_all():
    """The actor-loss gradient through a frozen bf16 WM at small-but-not-tiny widths (latent 64, 256-wide layers,
    H=8, batch 256): keeping only the bf16 matmul operands needs less temporary memory than keeping every f32
    activation, and 'step' (only the carries) less still."""
    batch, key = random_batch(jax.random.PRNGKey(3), 8, 256), jax.random.PRNGKey(4)
    temp = {}
    for p in POLICIES:
        cfg = small_cfg("mlp", "gaussian", "bfloat16", p, latent=64, units=(256, 256), horizon=8, finetune=False)
        frozen = jax.eval_shape(lambda k, c=cfg: wm.init(c.wm, k), key)
        state = jax.eval_shape(lambda k, c=cfg: pwm.init_state(c, k), key)

        def grad(s, w, c=cfg):
            loss = lambda ap: pwm.actor_loss(c, ap, w, s.critic, s.ret_rms, batch["obs"][0], batch["task"], key)[0]
            return jax.grad(loss)(s.actor)

        mem = jax.jit(grad).lower(state, frozen).compile().memory_analysis()
        assert mem is not None, f"no XLA memory analysis on {jax.default_backend()} (the trainer's task_chunk=-1 needs it)"
        temp[p] = mem.temp_size_in_bytes
    assert temp["matmul_inputs"] < 0.8 * temp["all"], temp
    assert temp["step"] <= temp["matmul_inputs"], temp


def _hlo(compiled) -> str:
    """Optimised HLO, computations only: without the header's source tables and the ops' metadata (file lines and
    op names differ with the tracing, not the program)."""
    text = compiled.as_text()
    text = text[re.search(r"^(%|ENTRY)", text, re.M).start():]
    return re.sub(r",? metadata=\{[^}]*\}", "", text)


def test_matmul_name_costs_nothing_outside_a_checkpoint(monkeypatch):
    """Under 'all' the compiled rollout gradients are the same program with the matmul-input names as without them
    (bf16 WM: the name inside bf16_matmul's forward rule; float32 actor and critic: the one in nn.Dense's dot)."""
    cfg = small_cfg("flow", "gaussian", "float32", "all", wm_dtype="bfloat16")
    batch, key = random_batch(jax.random.PRNGKey(3), 4, 8), jax.random.PRNGKey(4)
    state = pwm.init_state(cfg, jax.random.PRNGKey(0))

    def compiled():
        return _hlo(jax.jit(lambda s, b, k: rollout_grads(cfg, s, b, k)).lower(state, batch, key).compile())

    tagged = compiled()
    monkeypatch.setattr(nets, "checkpoint_name", lambda x, name: x)
    assert tagged == compiled()


def test_settings_and_errors_name_the_flag():
    assert [pwm.PWMConfig.__dataclass_fields__["remat"].default, nets.remat_policy(False), nets.remat_policy(True)] == \
        ["all", "all", "step"]
    assert small_cfg("mlp", "gaussian", "float32", True).remat == "step"
    with pytest.raises(ValueError, match="remat='most'"):
        small_cfg("mlp", "gaussian", "float32", "most")
    assert RunPlan.from_config(tiny_config("STORE")).pwm.remat == "all"
    assert RunPlan.from_config(tiny_config("STORE", remat=True)).pwm.remat == "step"
    assert remat_setting(tiny_config("STORE", remat_policy="matmul_inputs")) == "matmul_inputs"
    assert RunPlan.from_config(tiny_config("STORE", remat_policy="matmul_inputs")).pwm.remat == "matmul_inputs"
    with pytest.raises(ConfigError, match=r"--config\.remat_policy='most': use all \| step \| matmul_inputs"):
        RunPlan.from_config(tiny_config("STORE", remat_policy="most"))
    with pytest.raises(ConfigError, match=r"--config\.remat=True contradicts --config\.remat_policy='all'"):
        RunPlan.from_config(tiny_config("STORE", remat=True, remat_policy="all"))
