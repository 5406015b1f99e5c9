"""Actors: the Gaussian MLP actor and the flow ODE actor, as pure functions of params.

Both take the latent z [..., L] only and return PRE-tanh actions [..., A]; PWM applies tanh outside.
Gaussian params: {'logstd': [A], 'mu_net': {...}}. Flow params: {'init_logstd': [A], 'velocity_net': {...}}.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fmbpo_jax import nets
from fmbpo_jax.integrators import check_integrator, integrate

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    """kind: 'gaussian' (ActorStochasticMLP) or 'flow' (ActorFlowODE). Reference 48M: units (400, 200, 100)."""

    kind: str = "gaussian"
    latent_dim: int = 768
    action_dim: int = 6
    units: tuple[int, ...] = (400, 200, 100)
    init_logstd: float = -1.0
    min_logstd: float = -1.427  # gaussian; the flow actor clamps at -10 (reference)
    init_gain: float = 1.0
    integrator: str = "heun"
    substeps: int = 2
    compute_dtype: str = "float32"  # matmul operands: 'float32' | 'bfloat16' (params stay float32; nets.matmul)

    def __post_init__(self):
        if self.kind not in ("gaussian", "flow"):
            raise ValueError(f"ActorConfig.kind must be 'gaussian' or 'flow', got {self.kind!r}")
        check_integrator(self.integrator, self.substeps)
        nets.check_compute_dtype(self.compute_dtype, "ActorConfig")
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))

    @property
    def logstd_name(self) -> str:
        return "logstd" if self.kind == "gaussian" else "init_logstd"

    @property
    def logstd_min(self) -> float:
        return self.min_logstd if self.kind == "gaussian" else -10.0


def _net(cfg: ActorConfig) -> nets.ActMLP:
    return nets.ActMLP(cfg.units, cfg.action_dim, "torch", cfg.compute_dtype)


def init(cfg: ActorConfig, key: jax.Array) -> Params:
    """PyTorch default Linear init; every parameter times init_gain (Gaussian: logstd too; flow: not, B18)."""
    in_width = cfg.latent_dim + (cfg.action_dim + 1 if cfg.kind == "flow" else 0)
    net = _net(cfg).init(key, jnp.zeros((1, in_width)))["params"]
    logstd = jnp.full((cfg.action_dim,), cfg.init_logstd, jnp.float32)  # params are float32 (casts are the caller's)
    if cfg.kind == "gaussian":
        params = {"mu_net": net, "logstd": logstd}
        return jax.tree_util.tree_map(lambda p: p * cfg.init_gain, params)
    net = jax.tree_util.tree_map(lambda p: p * cfg.init_gain, net)
    return {"velocity_net": net, "init_logstd": logstd}


def clamped_logstd(cfg: ActorConfig, params: Params) -> jax.Array:
    """max(logstd, min) in value, identity in gradient.

    The reference clamps the stored parameter in place under no_grad before every forward, so the
    gradient still reaches the stored value; `project_logstd` applies the same clamp to stored params.
    """
    raw = params[cfg.logstd_name]
    return raw + jax.lax.stop_gradient(jnp.maximum(raw, cfg.logstd_min) - raw)


def project_logstd(cfg: ActorConfig, params: Params) -> Params:
    """The in-place clamp of the reference as a pure function on params (applied after optimizer steps)."""
    out = dict(params)
    out[cfg.logstd_name] = jnp.maximum(params[cfg.logstd_name], cfg.logstd_min)
    return out


def gaussian_mean(cfg: ActorConfig, params: Params, z: jax.Array) -> jax.Array:
    """mu_net(z): z [..., L] -> [..., A] (pre-tanh)."""
    return _net(cfg).apply({"params": params["mu_net"]}, z)


def flow_velocity(cfg: ActorConfig, params: Params, z: jax.Array, a_tau: jax.Array, tau: jax.Array) -> jax.Array:
    """Flow actor velocity on [z, a_tau, tau]: [..., L], [..., A], [..., 1] -> [..., A]."""
    return _net(cfg).apply({"params": params["velocity_net"]}, jnp.concatenate([z, a_tau, tau], axis=-1))


def flow_integrate(cfg: ActorConfig, params: Params, a0: jax.Array, z: jax.Array, substeps: int | None = None) -> jax.Array:
    """Integrate the flow actor from base point a0 [..., A] conditioned on z [..., L] -> a1 [..., A] (pre-tanh)."""
    k = cfg.substeps if substeps is None else substeps

    def v(a, t):
        return flow_velocity(cfg, params, z, a, jnp.full(a.shape[:-1] + (1,), t, a.dtype))

    return integrate(v, a0, k, cfg.integrator)


def action(cfg: ActorConfig, params: Params, z: jax.Array, key: jax.Array | None, deterministic: bool = False,
           eps: jax.Array | None = None) -> jax.Array:
    """Pre-tanh action [..., A] for latents z [..., L].

    Gaussian: mu (deterministic) or mu + exp(logstd) * eps (reparameterised).
    Flow: integrate from a0 = 0 (deterministic) or a0 = exp(init_logstd) * eps.
    eps [..., A]: standard-normal draws to use instead of drawing from `key` (recorded runs, parity checks).
    """
    if z.shape[-1] != cfg.latent_dim:
        raise ValueError(f"actor input z has shape {tuple(z.shape)}: last dim != latent_dim={cfg.latent_dim}")
    std = jnp.exp(clamped_logstd(cfg, params))
    shape = z.shape[:-1] + (cfg.action_dim,)
    if deterministic:
        eps = jnp.zeros(shape, z.dtype)
    elif eps is None:
        if key is None:
            raise ValueError("a PRNG key or eps draws are needed for a stochastic action (or pass deterministic=True)")
        eps = jax.random.normal(key, shape, z.dtype)
    elif tuple(eps.shape) != shape:
        raise ValueError(f"actor eps draws have shape {tuple(eps.shape)}, expected {shape}")
    if cfg.kind == "gaussian":
        mu = gaussian_mean(cfg, params, z)
        return mu if deterministic else mu + std * eps
    return flow_integrate(cfg, params, std * eps, z)


def stddev(cfg: ActorConfig, params: Params, clamped: bool = True) -> jax.Array:
    """The `actor_stddev` metric: mean exp(logstd), of the clamped value or (clamped=False) of the stored one.

    The reference's Gaussian actor reports the stored value, which its Adam step can leave below the minimum;
    its flow actor reports the clamped one (`get_logstd` clamps there).
    """
    logstd = params[cfg.logstd_name]
    return jnp.mean(jnp.exp(jnp.maximum(logstd, cfg.logstd_min) if clamped else logstd))


def gaussian_log_prob(cfg: ActorConfig, params: Params, z: jax.Array, a: jax.Array) -> jax.Array:
    """Per-dimension Normal(mu, exp(logstd)).log_prob(a) [..., A] (the reference's log_probs, no clamp)."""
    mu = gaussian_mean(cfg, params, z)
    logstd = params["logstd"]
    return -0.5 * jnp.square((a - mu) / jnp.exp(logstd)) - logstd - 0.5 * jnp.log(2 * jnp.pi)
