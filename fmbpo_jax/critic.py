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
    compute_dtype: str = "float32"  # matmul operands: 'float32' | 'bfloat16' (params stay float32; nets.matmul)

    def __post_init__(self):
        nets.check_compute_dtype(self.compute_dtype, "CriticConfig")
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))


class _CriticMLP(nn.Module):
    units: tuple[int, ...]
    compute_dtype: str = "float32"

    @nn.compact
    def __call__(self, z):
        return nets.ActMLP(self.units, 1, "orthogonal", self.compute_dtype, name="critic")(z)


def _ensemble(cfg: CriticConfig, in_axes=None) -> nn.Module:
    return nets.ensemble(_CriticMLP, cfg.num_critics, in_axes)(cfg.units, cfg.compute_dtype)


def init(cfg: CriticConfig, key: jax.Array) -> Params:
    """Orthogonal(gain sqrt 2) kernels and zero biases for every member (independent draws)."""
    return _ensemble(cfg).init(key, jnp.zeros((1, cfg.latent_dim)))["params"]


def values(cfg: CriticConfig, params: Params, z: jax.Array) -> jax.Array:
    """All members: z [..., L] -> [K, ..., 1]."""
    if z.shape[-1] != cfg.latent_dim:
        raise ValueError(f"critic input z has shape {tuple(z.shape)}: last dim != latent_dim={cfg.latent_dim}")
    if cfg.compute_dtype == "bfloat16":
        # One copy of z per member: the weight gradient of a shared (unbatched) bf16 input against a
        # member-batched cotangent lowers to a dot XLA:CPU cannot run in bf16 x bf16 -> f32.
        z = jnp.broadcast_to(z, (cfg.num_critics,) + z.shape)
        return _ensemble(cfg, in_axes=0).apply({"params": params}, z)
    return _ensemble(cfg).apply({"params": params}, z)


def min_value(cfg: CriticConfig, params: Params, z: jax.Array) -> jax.Array:
    """min over members: z [..., L] -> [...]."""
    return jnp.min(values(cfg, params, z), axis=0)[..., 0]
