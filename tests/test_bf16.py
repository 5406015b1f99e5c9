"""bf16 compute (--config.precision=bf16): bfloat16 matmul operands, float32 accumulation, params and optimizer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_TASKS
from fmbpo_jax import actors, critic, nets
from fmbpo_jax import world_model as wm


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("lead", [(), (3,)])
def test_bf16_matmul_value_and_grads_close_to_f32(lead):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, lead + (64, 48))
    w = jax.random.normal(kw, (48, 32)) / 7.0
    g = jax.random.normal(kg, lead + (64, 32))
    y, vjp = jax.vjp(nets.bf16_matmul, x, w)
    y32, vjp32 = jax.vjp(lambda a, b: a @ b, x, w)
    assert y.dtype == jnp.float32 and y.shape == y32.shape
    assert _rel(y, y32) < 1e-2
    for got, want in zip(vjp(g), vjp32(g)):
        assert got.dtype == jnp.float32 and got.shape == want.shape
        assert _rel(got, want) < 1e-2  # bf16 operands: ~3 significant digits
    # the float32 path is exactly the plain matmul (parity with the reference is untouched)
    np.testing.assert_array_equal(nets.matmul(x, w), x @ w)


@pytest.mark.parametrize("k", [48, 47])
def test_bf16_input_grad_split_is_the_plain_transposed_product(k):
    """The halves-of-K batched dot (XLA:CPU keeps it in bf16) sums the same bf16 products as g @ W^T in f32;
    an odd K takes the plain dot. Under vmap (critic ensemble) too."""
    kg, kw = jax.random.split(jax.random.PRNGKey(2))
    g = jax.random.normal(kg, (3, 5, 64, 32)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (3, k, 32)).astype(jnp.bfloat16)
    want = jnp.einsum("eabn,ekn->eabk", g.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    got = jax.vmap(nets._input_grad_bf16)(g, w)
    assert got.dtype == jnp.float32 and got.shape == (3, 5, 64, k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_models_match_f32_params_and_grads():
    """Same params, both dtypes: outputs and parameter gradients of WM, actor and critic agree to bf16 accuracy."""
    wcfg = wm.WMConfig(latent_dim=64, encoder_units=(96,), units=(96, 96), task_dim=8, num_tasks=3)
    acfg = actors.ActorConfig(latent_dim=64, units=(32, 32))
    ccfg = critic.CriticConfig(latent_dim=64, units=(32, 32))
    k = jax.random.split(jax.random.PRNGKey(1), 5)
    pw, pa, pc = wm.init(wcfg, k[0]), actors.init(acfg, k[1]), critic.init(ccfg, k[2])
    obs, act = jax.random.normal(k[3], (16, 24)), jnp.tanh(jax.random.normal(k[4], (16, 6)))

    def total(cfgs, p):
        w_, a_, c_ = cfgs
        z = wm.encode(w_, p["wm"], obs, 1)
        z1, logits = wm.step(w_, p["wm"], z, act, 1)
        a = actors.action(a_, p["actor"], z, None, deterministic=True)
        return jnp.sum(z1) + jnp.mean(logits) + jnp.sum(a) + jnp.sum(critic.min_value(c_, p["critic"], z1))

    p = {"wm": pw, "actor": pa, "critic": pc}
    import dataclasses

    bf = tuple(dataclasses.replace(c, compute_dtype="bfloat16") for c in (wcfg, acfg, ccfg))
    v32, g32 = jax.value_and_grad(lambda q: total((wcfg, acfg, ccfg), q))(p)
    v16, g16 = jax.jit(jax.value_and_grad(lambda q: total(bf, q)))(p)
    assert abs(float(v16 - v32)) < 2e-2 * abs(float(v32)) + 1e-3
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(g32)):
        assert a.dtype == jnp.float32
        if float(jnp.linalg.norm(b)) > 1e-6:
            assert _rel(a, b) < 5e-2, jax.tree_util.keystr(path[0])


def test_bad_compute_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="compute_dtype"):
        critic.CriticConfig(compute_dtype="float16")


@pytest.mark.parametrize("finetune", [False, True])
def test_bf16_training_curves_stay_close_to_f32(tiny_store, finetune):
    """30 epochs of the tiny config, 3 tasks: bf16 loss curves follow the float32 ones (measured: mean relative
    difference ~1%, max ~7%)."""
    from test_train import _train

    curves = {}
    for prec in ("float32", "bf16"):
        _, _, m = _train({"precision": prec, "finetune_wm": finetune}, tiny_store, TINY_TASKS, [1], epochs=30)
        curves[prec] = m
    for k in ("actor_loss", "value_loss") + (("wm_loss",) if finetune else ()):
        a, b = np.asarray(curves["float32"][k]), np.asarray(curves["bf16"][k])
        assert np.all(np.isfinite(b)), k
        rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-3)
        assert rel.mean() < 0.03 and rel.max() < 0.15, (k, rel.mean(), rel.max())
