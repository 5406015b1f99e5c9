"""``--breakdown``: seconds per part of one epoch of ONE run, each part jitted alone on random inputs.

Parts: 'wm' (the WM step(s), fine-tuning only), 'actor_step' (actor loss value+grad through the H-step
rollout, and the Adam step), 'critic_steps' (the critic_iterations x critic_batches steps). Shows where an
epoch's time goes; the sum can differ from the row's epoch time (no vmap, no scan over epochs, no cross-part
fusion, no sampling).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from fmbpo_jax import pwm
from fmbpo_jax.tools.bench.catalog import PRECISIONS
from fmbpo_jax.tools.bench.plan import Row, init_state


def _wm_program(cfg, state, obs, act, rew, task, key, lr, batch: int):
    """(jitted WM step(s), args): wm_iterations steps on min(B, 256) windows, or one on the policy batch."""
    if cfg.wm_updates == "iterations":
        Bw = min(batch, 256)
        fn = jax.jit(lambda p, o, ob, ac, rw, kk: jax.lax.scan(
            lambda c, _: (pwm.wm_update(cfg, c[0], c[1], ob[:, :Bw], ac[:, :Bw], rw[:, :Bw], task, kk, lr)[:2], None),
            (p, o), None, length=cfg.wm_iterations)[0])
    else:
        fn = jax.jit(lambda p, o, ob, ac, rw, kk: pwm.wm_update(cfg, p, o, ob, ac, rw, task, kk, lr)[:2])
    return fn, (state.wm, state.wm_opt, obs, act, rew, key)


def part_programs(cfg, batch: int) -> dict:
    """{part: (jitted fn, args)}; every array is an argument (closed-over constants would be constant-folded)."""
    H, O, A, L = cfg.horizon, cfg.wm.obs_dim, cfg.wm.action_dim, cfg.wm.latent_dim
    k = jax.random.split(jax.random.PRNGKey(3), 6)
    state = init_state(dataclasses.replace(cfg, finetune_wm=True), k[0])
    obs = jax.random.uniform(k[1], (H + 1, batch, O), minval=-1, maxval=1)
    act = jax.random.uniform(k[2], (H, batch, A), minval=-1, maxval=1)
    rew = jax.random.uniform(k[3], (H, batch))
    task = jnp.asarray(0, jnp.int32)
    lr = jnp.asarray(1e-4, jnp.float32)
    z = jax.random.uniform(k[4], (H, batch, L))
    y = jax.random.uniform(k[5], (H, batch))
    fns = {}
    if cfg.finetune_wm:
        fns["wm"] = _wm_program(cfg, state, obs, act, rew, task, k[1], lr, batch)

    def actor_step(ap, ao, wp, cp, rms, ob0, kk):
        (_, aux), g = jax.value_and_grad(lambda p: pwm.actor_loss(cfg, p, wp, cp, rms, ob0, task, kk), has_aux=True)(ap)
        ap, ao, _ = pwm.adam_step(ap, ao, g, lr, pwm.ACTOR_ADAM, cfg.actor_grad_clip)
        return ap, ao, aux["states"], aux["rewards"], aux["next_values"]

    fns["actor_step"] = (jax.jit(actor_step), (state.actor, state.actor_opt, state.wm, state.critic, state.ret_rms,
                                               obs[0], k[2]))
    fns["critic_steps"] = (jax.jit(lambda cp, co, zz, yy, kk: pwm.critic_update(cfg, cp, co, zz, yy, lr, kk)[:2]),
                           (state.critic, state.critic_opt, z, y, k[3]))
    return fns


def breakdown(r: Row, args) -> dict:
    """{part: {'s', 'gflop', 'gflops'}}: median seconds of max(2, --timed-calls) calls after a warm-up, per run."""
    if r.mode != "policy":
        return {}
    parts = r.flops["parts"]
    programs = part_programs(r.pcfg, r.row["batch_size"])
    out = {}
    with jax.default_matmul_precision(PRECISIONS[r.precision]):  # traced and compiled at the first call, in here
        for name, (fn, a) in programs.items():
            jax.block_until_ready(fn(*a))  # compile + warm-up
            ts = []
            for _ in range(max(2, args.timed_calls)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*a))
                ts.append(time.perf_counter() - t0)
            s = statistics.median(ts)
            gf = parts.get(name, {}).get("needed", 0.0) / 1e9
            out[name] = {"s": s, "gflop": gf, "gflops": gf / s if s else 0.0}
    return out
