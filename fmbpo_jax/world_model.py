"""MLP and flow world models as pure functions of a params pytree.

params = {'_task_emb': {'weight': [num_tasks, task_dim]}, '_encoder': ..., '_dynamics' (MLP) or
'_velocity' (flow): ..., '_reward': ...}. Shapes below: B = any leading batch dims, O = obs_dim,
A = action_dim, L = latent_dim, E = task_dim.

Concatenation orders follow the reference exactly (spec 1.2/1.3): encoder [obs, emb]; MLP WM
dynamics/reward [z, emb, a]; flow WM velocity [z, a, tau, emb] and reward [z, a, emb].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import mathops, nets
from fmbpo_jax.integrators import check_integrator, integrate

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class WMConfig:
    """Static world-model architecture (hashable: safe as a jit static argument).

    kind: 'mlp' (TD-MPC2 dynamics MLP) or 'flow' (velocity field integrated over K substeps).
    velocity_head: 'simnorm' (reference: NormedLinear+SimNorm on the velocity, B3) or 'linear'
      (fixed: plain linear velocity, SimNorm applied to the integrated latent).
    """

    kind: str = "mlp"
    obs_dim: int = 24
    action_dim: int = 6
    latent_dim: int = 768
    task_dim: int = 64
    num_tasks: int = 30
    encoder_units: tuple[int, ...] = (1792, 1792, 1792)
    units: tuple[int, ...] = (1792, 1792)
    simnorm_dim: int = 8
    num_bins: int = 101
    vmin: float = -10.0
    vmax: float = 10.0
    velocity_head: str = "simnorm"
    integrator: str = "heun"
    substeps: int = 4
    compute_dtype: str = "float32"  # matmul operands: 'float32' | 'bfloat16' (params stay float32; nets.matmul)

    def __post_init__(self):
        if self.kind not in ("mlp", "flow"):
            raise ValueError(f"WMConfig.kind must be 'mlp' or 'flow', got {self.kind!r}")
        if self.velocity_head not in ("simnorm", "linear"):
            raise ValueError(f"WMConfig.velocity_head must be 'simnorm' or 'linear', got {self.velocity_head!r}")
        if self.latent_dim % self.simnorm_dim:
            raise ValueError(f"latent_dim={self.latent_dim} is not a multiple of simnorm_dim={self.simnorm_dim}")
        check_integrator(self.integrator, self.substeps)
        nets.check_compute_dtype(self.compute_dtype, "WMConfig")
        object.__setattr__(self, "encoder_units", tuple(int(u) for u in self.encoder_units))
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))

    @property
    def dyn_name(self) -> str:
        return "_dynamics" if self.kind == "mlp" else "_velocity"


def _encoder(cfg: WMConfig) -> nets.WMMLP:
    return nets.WMMLP(cfg.encoder_units, cfg.latent_dim, "simnorm", cfg.simnorm_dim, compute_dtype=cfg.compute_dtype)


def _dynamics(cfg: WMConfig) -> nets.WMMLP:
    last = "simnorm" if (cfg.kind == "mlp" or cfg.velocity_head == "simnorm") else "linear"
    return nets.WMMLP(cfg.units, cfg.latent_dim, last, cfg.simnorm_dim, compute_dtype=cfg.compute_dtype)


def _reward(cfg: WMConfig) -> nets.WMMLP:
    return nets.WMMLP(cfg.units, cfg.num_bins, "linear", cfg.simnorm_dim, zero_last=True, compute_dtype=cfg.compute_dtype)


def init(cfg: WMConfig, key: jax.Array) -> Params:
    """Reference init: trunc-normal(0.02) Linears, LN (1, 0), zero reward-head weight, emb U(+-0.02)."""
    k_emb, k_enc, k_dyn, k_rew = jax.random.split(key, 4)
    za_width = cfg.latent_dim + cfg.action_dim + cfg.task_dim + (1 if cfg.kind == "flow" else 0)
    params: Params = {
        "_encoder": _encoder(cfg).init(k_enc, jnp.zeros((1, cfg.obs_dim + cfg.task_dim)))["params"],
        cfg.dyn_name: _dynamics(cfg).init(k_dyn, jnp.zeros((1, za_width)))["params"],
        "_reward": _reward(cfg).init(k_rew, jnp.zeros((1, cfg.latent_dim + cfg.action_dim + cfg.task_dim)))["params"],
    }
    if cfg.task_dim > 0:
        params["_task_emb"] = {"weight": jax.random.uniform(k_emb, (cfg.num_tasks, cfg.task_dim), jnp.float32, -0.02, 0.02)}
    return params


def num_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------------- inputs


def _check_width(x: jax.Array, width: int, what: str, flag: str) -> None:
    if x.shape[-1] != width:
        raise ValueError(f"{what} has shape {tuple(x.shape)}: last dim {x.shape[-1]} != {flag}={width}")


def _check_task(cfg: WMConfig, task) -> None:
    """Range-check task ids when they are concrete (inside jit they are tracers and cannot be checked)."""
    if cfg.task_dim == 0 or isinstance(task, jax.core.Tracer):
        return
    t = np.asarray(task)  # numpy, so no tracer is created inside a trace
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"task ids must be integers, got dtype {t.dtype}")
    if t.size and (int(t.min()) < 0 or int(t.max()) >= cfg.num_tasks):
        raise ValueError(f"task id out of range [0, {cfg.num_tasks}): got min {int(t.min())}, max {int(t.max())}")


def task_emb(cfg: WMConfig, params: Params, task, batch_shape: tuple[int, ...]) -> jax.Array:
    """Embedding rows for task ids broadcast to batch_shape + (E,).

    task: int scalar (one task for the whole batch), or ids whose shape is a suffix of batch_shape
    (e.g. [B] for inputs [T, B, .], as the reference tiles over T).
    """
    _check_task(cfg, task)
    emb = nets.task_embedding(params["_task_emb"]["weight"], jnp.asarray(task))
    try:
        return jnp.broadcast_to(emb, tuple(batch_shape) + (cfg.task_dim,))
    except ValueError:
        raise ValueError(f"task ids of shape {jnp.shape(task)} do not match the batch shape {tuple(batch_shape)}") from None


def _cat(cfg: WMConfig, params: Params, task, *parts: jax.Array, emb_at: int) -> jax.Array:
    """Concatenate parts with the task embedding inserted at position emb_at (skipped when task_dim == 0)."""
    parts = list(parts)
    if cfg.task_dim > 0:
        parts.insert(emb_at, task_emb(cfg, params, task, parts[0].shape[:-1]))
    return jnp.concatenate(parts, axis=-1)


# ----------------------------------------------------------------------------------------------- heads


def encode(cfg: WMConfig, params: Params, obs: jax.Array, task) -> jax.Array:
    """obs [..., O] (zero-padded), task ids -> latent z [..., L] (SimNorm groups each sum to 1)."""
    _check_width(obs, cfg.obs_dim, "obs", "obs_dim")
    x = _cat(cfg, params, task, obs, emb_at=1)
    return _encoder(cfg).apply({"params": params["_encoder"]}, x)


def velocity(cfg: WMConfig, params: Params, z: jax.Array, a: jax.Array, tau: jax.Array, task) -> jax.Array:
    """Flow WM velocity v(z, a, tau): z [..., L], a [..., A], tau [..., 1] -> [..., L]; input [z, a, tau, emb]."""
    _check_width(z, cfg.latent_dim, "latent z", "latent_dim")
    _check_width(a, cfg.action_dim, "action", "action_dim")
    x = _cat(cfg, params, task, z, a, tau, emb_at=3)
    return _dynamics(cfg).apply({"params": params["_velocity"]}, x)


def next_latent(cfg: WMConfig, params: Params, z: jax.Array, a: jax.Array, task) -> jax.Array:
    """Latent transition z [..., L], a [..., A] -> z' [..., L].

    MLP: dynamics([z, emb, a]). Flow: z + integral_0^1 v dtau with cfg.integrator over cfg.substeps
    (a residual displacement, not noise -> sample); with the fixed 'linear' head, SimNorm(z') afterwards.
    """
    _check_width(z, cfg.latent_dim, "latent z", "latent_dim")
    _check_width(a, cfg.action_dim, "action", "action_dim")
    if cfg.kind == "mlp":
        x = _cat(cfg, params, task, z, a, emb_at=1)
        return _dynamics(cfg).apply({"params": params["_dynamics"]}, x)

    def v(x, t):
        tau = jnp.full(x.shape[:-1] + (1,), t, x.dtype)
        return velocity(cfg, params, x, a, tau, task)

    z1 = integrate(v, z, cfg.substeps, cfg.integrator)
    if cfg.velocity_head == "linear":
        z1 = nets.simnorm(z1, cfg.simnorm_dim)
    return z1


def reward_logits(cfg: WMConfig, params: Params, z: jax.Array, a: jax.Array, task) -> jax.Array:
    """Reward logits [..., num_bins] from the CURRENT z and a; input [z, emb, a] (MLP) or [z, a, emb] (flow)."""
    _check_width(z, cfg.latent_dim, "latent z", "latent_dim")
    _check_width(a, cfg.action_dim, "action", "action_dim")
    x = _cat(cfg, params, task, z, a, emb_at=1 if cfg.kind == "mlp" else 2)
    return _reward(cfg).apply({"params": params["_reward"]}, x)


def reward_value(cfg: WMConfig, logits: jax.Array, apply_symexp: bool) -> jax.Array:
    """Scalar reward [..., 1] from logits: softmax expectation, with symexp (fixed) or without (reference B1)."""
    return mathops.two_hot_inv(logits, cfg.num_bins, cfg.vmin, cfg.vmax, apply_symexp)


def step(cfg: WMConfig, params: Params, z: jax.Array, a: jax.Array, task) -> tuple[jax.Array, jax.Array]:
    """(next_latent(z, a), reward_logits(z, a)): the reward is predicted from the current z and a."""
    return next_latent(cfg, params, z, a, task), reward_logits(cfg, params, z, a, task)


def flow_matching_loss(cfg: WMConfig, params: Params, z0: jax.Array, z1: jax.Array, a: jax.Array, tau: jax.Array, task, gamma_t=1.0) -> jax.Array:
    """Conditional flow-matching loss for one step: z_tau = (1-tau) z0 + tau z1, v* = z1 - z0.

    z0, z1 [B, L], a [B, A], tau [B, 1] -> scalar mean((v(z_tau, a, tau) - v*)^2) * gamma_t (mean over batch
    and latent dims). The caller decides what is stopped (the reference detaches z1 only).
    """
    z_tau = (1.0 - tau) * z0 + tau * z1
    v = velocity(cfg, params, z_tau, a, tau, task)
    return jnp.mean(jnp.square(v - (z1 - z0))) * gamma_t
