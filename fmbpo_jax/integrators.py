"""Fixed-step ODE integrators over tau in [0, 1], written as one `lax.scan` over K substeps.

Grid t_k = k / K, k = 0..K-1 (the reference's). Euler: x += dt v(x, t_k) (K evaluations).
Heun (explicit trapezoid): k1 = v(x, t_k); k2 = v(x + dt k1, t_k + dt); x += dt/2 (k1 + k2) (2K evaluations).
Gradients flow through every substep.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

INTEGRATORS = ("euler", "heun")


def check_integrator(method: str | None, substeps: int) -> str:
    """Validate (method, K); None means Heun as in the reference."""
    method = "heun" if method is None else method
    if method not in INTEGRATORS:
        raise ValueError(f"unknown integrator {method!r}; known: {', '.join(INTEGRATORS)}")
    if int(substeps) < 1:
        raise ValueError(f"integrator substeps must be >= 1, got {substeps}")
    return method


def integrate(velocity: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, substeps: int, method: str | None = "heun") -> jax.Array:
    """Integrate dx/dtau = velocity(x, tau) from tau=0 to 1 starting at x0 [..., D]; returns x(1) [..., D].

    velocity(x [..., D], tau scalar of x0's dtype) -> [..., D]. `substeps` and `method` are static.
    """
    method = check_integrator(method, substeps)
    dt = 1.0 / substeps
    # Times computed in float64 like Python floats in the reference, then cast once to the state's dtype.
    t0 = jnp.asarray(np.arange(substeps) * dt, x0.dtype)
    t1 = jnp.asarray(np.arange(substeps) * dt + dt, x0.dtype)

    def euler_step(x, ts):
        return x + dt * velocity(x, ts[0]), None

    def heun_step(x, ts):
        k1 = velocity(x, ts[0])
        k2 = velocity(x + dt * k1, ts[1])
        return x + (dt / 2) * (k1 + k2), None

    body = euler_step if method == "euler" else heun_step
    x1, _ = jax.lax.scan(body, x0, (t0, t1))
    return x1
