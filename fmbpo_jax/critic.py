"""Critic ensemble: `num_critics` CriticMLPs (Linear -> Mish -> LayerNorm, last Linear -> 1) with stacked params.

params = {'critic': {'0': {'kernel': [K, L, 400], 'bias': [K, 400]}, '2': {'scale', 'bias'}, ...}} where
K = num_critics. The value used anywhere is the min over members. No target network (reference).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmbpo_jax import nets

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    latent_dim: int = 768
    units: tuple[int, ...] = (400, 200)
    num_critics: int = 3

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))


class _CriticMLP(nn.Module):
    units: tuple[int, ...]

    @nn.compact
    def __call__(self, z):
        return nets.ActMLP(self.units, 1, "orthogonal", name="critic")(z)


def _ensemble(cfg: CriticConfig) -> nn.Module:
    return nets.ensemble(_CriticMLP, cfg.num_critics)(cfg.units)


def init(cfg: CriticConfig, key: jax.Array) -> Params:
    """Orthogonal(gain sqrt 2) kernels and zero biases for every member (independent draws)."""
    return _ensemble(cfg).init(key, jnp.zeros((1, cfg.latent_dim)))["params"]


def values(cfg: CriticConfig, params: Params, z: jax.Array) -> jax.Array:
    """All members: z [..., L] -> [K, ..., 1]."""
    if z.shape[-1] != cfg.latent_dim:
        raise ValueError(f"critic input z has shape {tuple(z.shape)}: last dim != latent_dim={cfg.latent_dim}")
    return _ensemble(cfg).apply({"params": params}, z)


def min_value(cfg: CriticConfig, params: Params, z: jax.Array) -> jax.Array:
    """min over members: z [..., L] -> [...]."""
    return jnp.min(values(cfg, params, z), axis=0)[..., 0]
