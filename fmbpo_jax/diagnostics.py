"""Training diagnostics as pure, jittable functions: gradient ESNR, per-module gradient norms, world-model
Jacobian smoothness proxies and an analytic count of velocity evaluations (spec/ALGORITHM.md section 9).

Nothing here is called by default. The trainer calls `epoch_diagnostics` every N epochs behind a config
switch (see the README section "Reports and diagnostics"); every function also works on its own.

- `esnr(per_sample_grads)`: for M gradient samples g_i (a pytree whose leaves have a leading M axis),
  mu = mean_i g_i, Var = mean_i ||g_i||^2 - ||mu||^2, ESNR = ||mu||^2 / max(Var, 1e-10),
  dB = 10 log10(ESNR + 1e-12). Var is computed as mean_i ||g_i - mu||^2, the same quantity in exact
  arithmetic without the cancellation of the difference form.
- `actor_grad_esnr`: the ESNR of the actor gradient over M groups of start states (per-sample when M = B).
- `module_grad_norms`: global L2 norm per top-level module of a gradient pytree.
- `jacobian_fro_estimates` / `wm_jacobian_proxies`: ||dF/dz||_F and ||dF/da||_F of the macro step
  F = world_model.next_latent (for the flow WM through the whole K-substep integration) by the
  Hutchinson-type estimator E_u ||J^T u||^2 = ||J||_F^2 with Rademacher probes u (E[u u^T] = I), one
  reverse-mode VJP per probe. Reported as the root mean square over samples of the per-sample Frobenius norm.
- `velocity_evals_per_epoch`: how many WM dynamics/velocity and actor network evaluations one
  `pwm.update` performs (Heun = 2K, Euler = K per macro step).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fmbpo_jax import actors, mathops, nets, pwm
from fmbpo_jax import world_model as wm

Params = dict[str, Any]
VAR_FLOOR = 1e-10
DB_EPS = 1e-12


# ============================================================================================== ESNR


def esnr(per_sample_grads) -> tuple[jax.Array, jax.Array]:
    """(ESNR, ESNR in dB) of M gradient samples: a pytree whose every leaf has a leading axis M.

    mu = mean_i g_i; Var = mean_i ||g_i||^2 - ||mu||^2 (= mean_i ||g_i - mu||^2, computed that way);
    ESNR = ||mu||^2 / max(Var, 1e-10); dB = 10 log10(ESNR + 1e-12). Norms are over all leaves flattened.
    """
    leaves = jax.tree_util.tree_leaves(per_sample_grads)
    if not leaves:
        raise ValueError("esnr: empty gradient pytree")
    m = leaves[0].shape[0]
    if any(x.shape[:1] != (m,) for x in leaves):
        raise ValueError(f"esnr: every leaf needs the same leading sample axis M={m}: {[x.shape for x in leaves]}")
    flat = [x.reshape(m, -1).astype(jnp.float32) for x in leaves]
    mus = [jnp.mean(x, axis=0) for x in flat]
    mu_sq = sum(jnp.sum(jnp.square(mu)) for mu in mus)
    var = sum(jnp.sum(jnp.mean(jnp.square(x - mu), axis=0)) for x, mu in zip(flat, mus))
    ratio = mu_sq / jnp.maximum(var, VAR_FLOOR)
    return ratio, 10.0 * jnp.log10(ratio + DB_EPS)


def _split_groups(x: jax.Array, num_groups: int) -> jax.Array:
    b = x.shape[0]
    if num_groups < 2 or b % num_groups:
        raise ValueError(f"num_groups={num_groups} must be >= 2 and divide the batch {b}")
    return x.reshape((num_groups, b // num_groups) + x.shape[1:])


def actor_group_grads(cfg: pwm.PWMConfig, actor_params: Params, wm_params: Params, critic_params: Params,
                      rms, obs0: jax.Array, task, key: jax.Array, num_groups: int):
    """Actor gradients of `pwm.actor_loss` on M = num_groups equal sub-batches of obs0 [B, O]: leaves [M, ...].

    Each group gets its own PRNG key. The ret_rms normaliser is a stop-gradient scalar that the update
    recomputes from the whole batch; it is dropped here (ret_rms=False) so that every group's gradient has
    the same scale (1/H). ESNR is invariant to a common scale, so this is the ESNR of the training gradient.
    """
    cfg = dataclasses.replace(cfg, ret_rms=False)
    groups = _split_groups(obs0, num_groups)
    keys = jax.random.split(key, num_groups)

    def one(o, k):
        return jax.grad(lambda p: pwm.actor_loss(cfg, p, wm_params, critic_params, rms, o, task, k)[0])(actor_params)

    return jax.vmap(one)(groups, keys)


def actor_grad_esnr(cfg: pwm.PWMConfig, actor_params: Params, wm_params: Params, critic_params: Params, rms,
                    obs0: jax.Array, task, key: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """(ESNR, dB) of the actor gradient over num_groups sub-batches of obs0 (num_groups = B: per sample)."""
    return esnr(actor_group_grads(cfg, actor_params, wm_params, critic_params, rms, obs0, task, key, num_groups))


# ========================================================================================= grad norms


def module_grad_norms(grads, prefix: str = "") -> dict[str, jax.Array]:
    """{prefix + top-level key: global L2 norm of that subtree} for a dict-like gradient pytree."""
    if not isinstance(grads, dict) and not hasattr(grads, "items"):
        return {prefix + "all": pwm.global_norm(grads)}
    return {f"{prefix}{k}": pwm.global_norm(v) for k, v in grads.items()}


# =================================================================================== Jacobian proxies


def _rademacher(key: jax.Array, shape) -> jax.Array:
    return jax.random.rademacher(key, shape, jnp.float32)


def jacobian_fro_estimates(f: Callable[..., jax.Array], primals: tuple[jax.Array, ...], key: jax.Array,
                           num_probes: int) -> tuple[jax.Array, ...]:
    """Per-input RMS Frobenius norms of the per-sample Jacobians of a row-wise map f.

    f(*primals) -> [N, D_out], every primal [N, D_in_j], row i of the output depending on row i of the
    inputs only (a batch of independent samples). For Rademacher probes u [N, D_out], the VJP gives
    u_i^T J_ij for every sample i and input j at once, and E_u ||J_ij^T u_i||^2 = ||J_ij||_F^2.
    Returns, per input j, sqrt(mean over samples and probes of ||J_ij^T u_i||^2).
    """
    out, vjp = jax.vjp(f, *primals)
    if out.ndim != 2:
        raise ValueError(f"jacobian_fro_estimates: f must return [N, D_out], got shape {out.shape}")

    def probe(k):
        cots = vjp(_rademacher(k, out.shape))
        return tuple(jnp.mean(jnp.sum(jnp.square(c.reshape(c.shape[0], -1)), axis=-1)) for c in cots)

    sq = jax.lax.map(probe, jax.random.split(key, num_probes))  # tuple of [P]
    return tuple(jnp.sqrt(jnp.mean(s)) for s in sq)


def jacobian_fro_exact(f: Callable[..., jax.Array], primals: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """The exact counterpart of `jacobian_fro_estimates` by full per-sample Jacobians (small dims; tests)."""
    def single(*rows):
        return f(*(r[None] for r in rows))[0]

    jacs = jax.vmap(jax.jacrev(single, argnums=tuple(range(len(primals)))))(*primals)
    return tuple(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(j.reshape(j.shape[0], -1)), axis=-1))) for j in jacs)


def wm_jacobian_proxies(cfg: pwm.PWMConfig | wm.WMConfig, wm_params: Params, z: jax.Array, a: jax.Array, task,
                        key: jax.Array, num_probes: int) -> dict[str, jax.Array]:
    """{'wm_jac_z': ||dF/dz||_F, 'wm_jac_a': ||dF/da||_F} (RMS over the N samples) of F = next_latent.

    z [N, L], a [N, A], task scalar. For the flow WM, F is the full K-substep integration (plus the
    SimNorm of the 'linear' velocity head), so the proxy measures the macro step the actor differentiates.
    """
    wcfg = cfg.wm if isinstance(cfg, pwm.PWMConfig) else cfg
    jz, ja = jacobian_fro_estimates(lambda zz, aa: wm.next_latent(wcfg, wm_params, zz, aa, task), (z, a), key, num_probes)
    return {"wm_jac_z": jz, "wm_jac_a": ja}


# ============================================================================ velocity evaluation counts


def _evals_per_macro_step(integrator: str, substeps: int) -> int:
    return 2 * substeps if integrator == "heun" else substeps


def velocity_evals_per_epoch(pcfg: pwm.PWMConfig, batch_size: int | None = None,
                             wm_batch_size: int | None = None) -> dict[str, int]:
    """Network evaluations (each over a whole batch) that one `pwm.update` performs, as a compute proxy.

    WM: a flow macro step costs 2K velocity evaluations (Heun) or K (Euler); an MLP macro step one dynamics
    evaluation. Actor: the flow actor 2K_pol (Heun) or K_pol (Euler) per action, the Gaussian actor one.
    Counted: the WM loss (if finetune_wm: wm_iterations steps, or one on the policy batch for
    wm_updates='policy_batch'; per step H flow-matching velocity evaluations plus the H-step rollout, or
    only the H flow-matching evaluations with teacher forcing) and the actor loss's H-step rollout. The
    encoder, reward head and critic are not velocity evaluations (see fmbpo_jax.tools.flops for FLOPs).
    With batch sizes given, '*_samples' keys count evaluations x rows.
    """
    H = pcfg.horizon
    w_step = 1 if pcfg.wm.kind == "mlp" else _evals_per_macro_step(pcfg.wm.integrator, pcfg.wm.substeps)
    a_step = 1 if pcfg.actor.kind == "gaussian" else _evals_per_macro_step(pcfg.actor.integrator, pcfg.actor.substeps)
    wm_steps = 0
    if pcfg.finetune_wm:
        wm_steps = pcfg.wm_iterations if pcfg.wm_updates == "iterations" else 1
    if pcfg.wm.kind == "flow":
        per_loss = H * (1 if pcfg.teacher_forcing else 1 + w_step)
    else:
        per_loss = H  # one dynamics evaluation per step (rollout or teacher forcing)
    out = {
        "wm_loss": wm_steps * per_loss,
        "wm_actor_rollout": H * w_step,
        "actor_rollout": H * a_step,
    }
    out["wm_total"] = out["wm_loss"] + out["wm_actor_rollout"]
    out["actor_total"] = out["actor_rollout"]
    out["total"] = out["wm_total"] + out["actor_total"]
    if batch_size is not None:
        wm_rows = (wm_batch_size if pcfg.wm_updates == "iterations" else batch_size) or batch_size
        out["wm_loss_samples"] = out["wm_loss"] * wm_rows
        out["wm_actor_rollout_samples"] = out["wm_actor_rollout"] * batch_size
        out["actor_rollout_samples"] = out["actor_rollout"] * batch_size
        out["total_samples"] = out["wm_loss_samples"] + out["wm_actor_rollout_samples"] + out["actor_rollout_samples"]
    return out


# ============================================================================ one call for the trainer


def epoch_diagnostics(cfg: pwm.PWMConfig, state: dict, batch: dict, key: jax.Array, frozen_wm: Params | None = None,
                      *, num_groups: int = 8, num_probes: int = 4, max_jac_samples: int = 64) -> dict[str, jax.Array]:
    """All diagnostics for ONE run (vmap it over runs like `pwm.update`); pure and jittable, changes no state.

    state: the per-run training state of pwm.init_state; batch: as for pwm.update (obs [H+1, B, O], task).
    Returns scalars: actor_esnr, actor_esnr_db (num_groups groups of start states), actor_grad_norm/<module>
    (full-batch actor gradient, ret_rms dropped as in actor_group_grads), wm_jac_z, wm_jac_a (on up to
    max_jac_samples start latents with the deterministic on-policy action) and, when fine-tuning,
    wm_grad_norm/<module> of the WM loss gradient.
    """
    k_esnr, k_jac, k_wm = jax.random.split(key, 3)
    wm_params = state.wm if cfg.finetune_wm else frozen_wm
    if wm_params is None:
        raise ValueError("epoch_diagnostics: finetune_wm=False needs frozen_wm")
    task = batch["task"]
    obs0 = batch["obs"][0]
    g = actor_group_grads(cfg, state.actor, wm_params, state.critic, state.ret_rms, obs0, task, k_esnr, num_groups)
    ratio, db = esnr(g)
    out = {"actor_esnr": ratio, "actor_esnr_db": db}
    mean_grad = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), g)
    out.update(module_grad_norms(mean_grad, "actor_grad_norm/"))

    n = min(max_jac_samples, obs0.shape[0])
    z = wm.encode(cfg.wm, wm_params, obs0[:n], task)
    a = mathops.tanh(actors.action(cfg.actor, state.actor, z, None, deterministic=True))
    if cfg.action_masks and cfg.action_dims:
        a = a * nets.action_mask_table(cfg.action_dims, cfg.wm.action_dim)[task]
    out.update(wm_jacobian_proxies(cfg, wm_params, z, a, task, k_jac, num_probes))

    if cfg.finetune_wm:
        def loss_fn(p):
            return pwm.wm_objective(cfg, p, batch["obs"], batch["action"], batch["reward"], task, k_wm)[0]

        out.update(module_grad_norms(jax.grad(loss_fn)(wm_params), "wm_grad_norm/"))
    return out
