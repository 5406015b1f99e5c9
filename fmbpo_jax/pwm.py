"""The PWM training core for ONE task: losses, optimizers, LR schedule and one jitted epoch.

`update(cfg, state, batch, key, frozen_wm)` is pure and written once; the trainer vmaps it over tasks
(and seeds). Reference order per epoch (spec 4.4): WM step(s) if fine-tuning -> actor step through an
H-step `lax.scan` latent rollout -> critic targets -> critic_iterations x critic_batches critic steps.

Shapes: H = horizon, B = batch, O = obs_dim, A = action_dim, L = latent_dim. Time-major batches:
obs [H+1, B, O], action [H, B, A], reward [H, B]. `task` is a scalar int32 (one task per update).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fmbpo_jax import actors, critic, mathops, nets
from fmbpo_jax import world_model as wm
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.world_model import WMConfig

Params = dict[str, Any]
FINAL_LR = 1e-5
ACTOR_ADAM = (0.7, 0.95)  # torch Adam betas of the reference's optimizers (PWMConfig.*_betas defaults)
CRITIC_ADAM = (0.7, 0.95)
WM_ADAM = (0.9, 0.999)


@dataclasses.dataclass(frozen=True)
class PWMConfig:
    """Static algorithm configuration (hashable). Behaviour fields: see fmbpo_jax.presets."""

    wm: WMConfig = WMConfig()
    actor: ActorConfig = ActorConfig()
    critic: CriticConfig = CriticConfig()
    horizon: int = 16
    gamma: float = 0.99
    lam: float = 0.95
    actor_lr: float = 5e-4
    critic_lr: float = 5e-4
    model_lr: float = 3e-4
    max_epochs: int = 10_000
    lr_schedule: str = "linear"  # 'linear' to 1e-5 over max_epochs (reference) | 'constant'
    actor_grad_clip: float = 1.0
    critic_grad_clip: float = 100.0
    wm_grad_clip: float = 20.0
    critic_iterations: int = 8
    critic_batches: int = 4
    wm_iterations: int = 8
    ret_rms: bool = True
    finetune_wm: bool = False
    tau_sampling: str = "uniform"  # 'uniform' | 'midpoint'
    teacher_forcing: bool = False  # flow/MLP WM loss source point: model rollout (reference) or data latent
    action_dims: tuple[int, ...] = ()  # per task, for the action masks; () = no masking possible
    # behaviours (fixed-preset values as defaults; presets.preset_values('reference') gives the original)
    reward_loss: str = "two_hot_ce"
    reward_symexp: bool = True
    action_masks: bool = True
    train_task_emb: bool = True
    critic_target: str = "td_lambda"
    terminal_discount: str = "gamma_h"
    wm_updates: str = "iterations"
    critic_minibatches: str = "shuffled"
    logstd_clamp: str = "stored"
    wm_emb_grad: str = "fresh"
    # Adam (torch.optim.Adam semantics): betas per optimizer and eps; the reference's values by default
    actor_betas: tuple[float, float] = ACTOR_ADAM
    critic_betas: tuple[float, float] = CRITIC_ADAM
    wm_betas: tuple[float, float] = WM_ADAM
    adam_eps: float = 1e-8
    # what the rollout scans keep for the backward pass (memory/speed, not results): 'all' | 'step' (recompute each
    # step from its carry) | 'matmul_inputs' (keep the matmul operands, recompute the elementwise work); the old
    # booleans False / True are 'all' / 'step' (nets.remat_policy, normalised in __post_init__)
    remat: bool | str = "all"

    def __post_init__(self):
        object.__setattr__(self, "remat", nets.remat_policy(self.remat))
        checks = {
            "reward_loss": ("mse_bins", "two_hot_ce"), "critic_target": ("one_step", "td_lambda"),
            "terminal_discount": ("gamma_h_plus_1", "gamma_h"), "wm_updates": ("policy_batch", "iterations"),
            "critic_minibatches": ("contiguous", "shuffled"), "tau_sampling": ("uniform", "midpoint"),
            "lr_schedule": ("linear", "constant"), "logstd_clamp": ("forward", "stored"),
            "wm_emb_grad": ("accumulate", "fresh"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PWMConfig.{name}={getattr(self, name)!r}; allowed: {allowed}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if self.wm.latent_dim != self.actor.latent_dim or self.wm.latent_dim != self.critic.latent_dim:
            raise ValueError("latent_dim differs between the world model, actor and critic configs")
        if self.wm.action_dim != self.actor.action_dim:
            raise ValueError(f"action_dim differs: world model {self.wm.action_dim}, actor {self.actor.action_dim}")
        for name in ("actor_betas", "critic_betas", "wm_betas"):
            betas = tuple(float(b) for b in getattr(self, name))
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise ValueError(f"PWMConfig.{name}={getattr(self, name)!r}: two values in [0, 1) expected")
            object.__setattr__(self, name, betas)

    @property
    def accumulates_emb_grad(self) -> bool:
        """The reference's never-zeroed task-embedding gradient (B22) exists only when the WM is fine-tuned
        and the embedding is in no optimizer group (train_task_emb=False)."""
        return (self.wm_emb_grad == "accumulate" and self.finetune_wm and not self.train_task_emb
                and self.wm.task_dim > 0)


def bias_correction(beta: float, count: jax.Array, dtype) -> jax.Array:
    """1 - beta^count, accurate to float rounding: -expm1(count * log(beta)), log(beta) taken in float64 on the host.

    optax computes it as 1 - float32(beta)^count: float32(0.999) is 1.3e-8 off, so 1 - beta is 1.3e-5 (relative)
    off and every first Adam step of the WM is 6.4e-6 too short (about one float32 ulp of a typical WM parameter,
    the same sign for all). torch.optim.Adam takes it in float64.
    """
    return -jnp.expm1(count.astype(dtype) * jnp.asarray(math.log(beta), dtype))


def _adam(b1b2: tuple[float, float], eps: float = 1e-8) -> optax.GradientTransformation:
    """torch.optim.Adam's direction m / bc1 / (sqrt(v) / sqrt(bc2) + eps) (the lr is applied by `adam_step`).

    State: optax.ScaleByAdamState(count, mu, nu), as optax.scale_by_adam keeps it; the bias corrections bc1, bc2
    are `bias_correction`'s, in torch's order of operations.
    """
    b1, b2 = (float(b) for b in b1b2)

    def init(params):
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731 (two trees, never one buffer twice)
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())

    def update(grads, state, params=None):
        del params
        mu = jax.tree_util.tree_map(lambda m, g: m + (g - m) * (1.0 - b1), state.mu, grads)  # torch: lerp_
        nu = jax.tree_util.tree_map(lambda v, g: v * b2 + (1.0 - b2) * g * g, state.nu, grads)
        count = optax.safe_int32_increment(state.count)
        dtype = jax.tree_util.tree_leaves(grads)[0].dtype
        bc1, bc2_sqrt = bias_correction(b1, count, dtype), jnp.sqrt(bias_correction(b2, count, dtype))
        direction = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) / bc2_sqrt + eps) / bc1, mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def learning_rate(lr0: float, epoch: jax.Array, max_epochs: int, schedule: str = "linear") -> jax.Array:
    """Reference `update_lrs`: lr_i = lr0 + (1e-5 - lr0) * i / max_epochs at the start of epoch i."""
    dtype = mathops.default_float()
    if schedule == "constant":
        return jnp.asarray(lr0, dtype)
    # clipped at the end of the run so an epoch past max_epochs never gets a negative lr (the reference stops there)
    frac = jnp.clip(jnp.asarray(epoch).astype(dtype) / max(max_epochs, 1), 0.0, 1.0)
    return lr0 + (FINAL_LR - lr0) * frac


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def clip_by_norm(grads, max_norm: float) -> tuple[Any, jax.Array]:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)); returns (grads, pre-clip norm)."""
    norm = global_norm(grads)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree_util.tree_map(lambda g: g * scale, grads), norm


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def adam_step(params, opt_state, grads, lr, b1b2, clip: float, eps: float = 1e-8):
    """Clip (pre-clip norm returned), Adam, p -= lr * update. Returns (params, opt_state, grad_norm)."""
    grads, norm = clip_by_norm(grads, clip)
    updates, opt_state = _adam(b1b2, eps).update(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
    return params, opt_state, norm


def _keep_if(ok: jax.Array, new, old):
    """Select new (ok) or old (not ok) for every leaf: skips an update without a host round trip."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


# =============================================================================================== WM loss


def _flow_taus(cfg: WMConfig, shape: tuple[int, int], dtype, tau_sampling: str, key, taus):
    """Flow-matching times [H, B, 1]: given (recorded draws), 0.5 ('midpoint'), or U[0, 1) from `key`; zeros for MLP."""
    if cfg.kind != "flow":
        return jnp.zeros(shape + (1,), dtype)
    if taus is not None:
        return jnp.asarray(taus, dtype)
    if tau_sampling == "midpoint":
        return jnp.full(shape + (1,), 0.5, dtype)
    if key is None:
        raise ValueError("wm_loss: uniform tau sampling needs a PRNG key (or pass taus)")
    return jax.random.uniform(key, shape + (1,), dtype)


def wm_loss(cfg: WMConfig, params: Params, obs, action, reward, task, key=None, *, gamma: float = 0.99,
            reward_loss: str = "mse_bins", tau_sampling: str = "uniform", taus=None, teacher_forcing: bool = False,
            remat: bool | str = "all"):
    """World-model loss (spec 2.2): autoregressive latent rollout with stop-gradient encoder targets.

    obs [H+1, B, O], action [H, B, A], reward [H, B, 1] or [H, B], task: scalar or [B] ids.
    Flow: tau ~ U[0,1] per (step, sample) from `key`, 0.5 ('midpoint'), or given `taus` [H, B, 1].
    remat: what each step keeps for the backward pass (nets.remat_scan_body): 'step' keeps only its carry and
    recomputes the step (all its integrator substeps), activation memory of one step instead of H (a 48M flow WM
    at K=4 otherwise needs GBs); 'matmul_inputs' keeps the matmul operands; True / False = 'step' / 'all'.
    Returns (total, {'dynamics_loss', 'reward_loss'}) with total = (dyn + rew) / H and the parts / H.
    """
    horizon = action.shape[0]
    if obs.shape[0] != horizon + 1:
        raise ValueError(f"obs has {obs.shape[0]} steps, expected horizon+1={horizon + 1} (action has {horizon})")
    reward = reward if reward.ndim == 3 else reward[..., None]
    targets = jax.lax.stop_gradient(wm.encode(cfg, params, obs[1:], task))  # [H, B, L]
    z0 = wm.encode(cfg, params, obs[0], task)
    dtype = z0.dtype
    discounts = gamma ** jnp.arange(horizon, dtype=dtype)
    taus = _flow_taus(cfg, action.shape[:2], dtype, tau_sampling, key, taus)

    if teacher_forcing:
        # source points are the data latents: z0 (with grad) then the stop-gradient encoder targets
        sources = jnp.concatenate([z0[None], targets[:-1]], axis=0)
        if cfg.kind == "flow":
            dyn_t = jax.vmap(lambda z, tg, a, tau, d: wm.flow_matching_loss(cfg, params, z, tg, a, tau, task, d))(
                sources, targets, action, taus, discounts)
        else:
            pred = wm.next_latent(cfg, params, sources, action, task)
            dyn_t = jnp.mean(jnp.square(pred - targets), axis=(1, 2)) * discounts
        zs = sources
    else:
        def body(z, xs):
            a, target, tau, disc = xs
            if cfg.kind == "flow":
                loss_t = wm.flow_matching_loss(cfg, params, z, target, a, tau, task, disc)
                z_next = wm.next_latent(cfg, params, z, a, task)
            else:
                z_next = wm.next_latent(cfg, params, z, a, task)
                loss_t = jnp.mean(jnp.square(z_next - target)) * disc
            return z_next, (loss_t, z)

        step = nets.remat_scan_body(body, nets.remat_policy(remat))
        _, (dyn_t, zs) = jax.lax.scan(step, z0, (action, targets, taus, discounts))
    dyn = jnp.sum(dyn_t)
    logits = wm.reward_logits(cfg, params, zs, action, task)  # [H, B, bins], from the CURRENT z and a
    if reward_loss == "mse_bins":
        # B1: every logit regressed to the raw scalar reward; mean over H x B x bins
        rew = jnp.mean(jnp.square(logits - reward) * discounts[:, None, None])
    elif reward_loss == "two_hot_ce":
        ce = mathops.soft_ce(logits, reward, cfg.num_bins, cfg.vmin, cfg.vmax)[..., 0]  # [H, B]
        rew = jnp.sum(jnp.mean(ce, axis=1) * discounts)
    else:
        raise ValueError(f"unknown reward_loss {reward_loss!r}")
    return (dyn + rew) / horizon, {"dynamics_loss": dyn / horizon, "reward_loss": rew / horizon}


# ============================================================================================ TD targets


def td_targets(rewards, next_values, done_mask, gamma: float, lam: float, method: str = "td-lambda"):
    """Critic targets [H, B] from rewards r_t, V_{t+1} and done masks [H, B] (PWM.compute_target_values).

    'one-step': r + gamma V. 'td-lambda': the backward recursion of the reference; with done_mask = 1
    everywhere it collapses exactly to one-step (B6).
    """
    if method == "one-step":
        return rewards + gamma * next_values

    def body(carry, xs):
        a_i, b_i, lam_i = carry
        r, v, d = xs
        lam_i = lam_i * lam * (1.0 - d) + d
        a_i = (1.0 - d) * (lam * gamma * a_i + gamma * v + (1.0 - lam_i) / (1.0 - lam) * r)
        b_i = gamma * (v * d + b_i * (1.0 - d)) + r
        return (a_i, b_i, lam_i), (1.0 - lam) * a_i + lam_i * b_i

    zeros = jnp.zeros_like(rewards[0])
    _, out = jax.lax.scan(body, (zeros, zeros, jnp.ones_like(zeros)), (rewards, next_values, done_mask), reverse=True)
    return out


# ============================================================================================ actor loss


def actor_loss(cfg: PWMConfig, actor_params: Params, wm_params: Params, critic_params: Params, rms: mathops.RunningMeanStd,
               obs0, task, key, eps=None):
    """First-order actor loss through an H-step latent rollout (spec 4.2).

    obs0 [B, O]. eps: the standard-normal draws [H, B, A] to use instead of drawing from `key` (Gaussian:
    the rsample eps; flow: the base noise before its exp(init_logstd) scale), for parity with recorded runs.
    Returns (loss, aux) with aux = states [H, B, L], rewards [H, B], next_values [H, B] (all stop-gradient,
    for the critic), the updated ret_rms and the mean imagined return. Gradients reach the actor through the
    WM dynamics and the terminal value; the actor's own input is detached (the reference's `detach: True`).
    """
    H = cfg.horizon
    z0 = wm.encode(cfg.wm, wm_params, obs0, task)  # not detached (reference): the WM gets this loss's gradient too
    mask = None
    if cfg.action_masks and cfg.action_dims:
        mask = nets.action_mask_table(cfg.action_dims, cfg.wm.action_dim)[task]  # [A] or [B, A]

    def body(carry, draw):
        z, disc, ret = carry
        key_t, eps_t = draw
        a = mathops.tanh(actors.action(cfg.actor, actor_params, jax.lax.stop_gradient(z), key_t, eps=eps_t))
        if mask is not None:
            a = a * mask
        z_next, logits = wm.step(cfg.wm, wm_params, z, a, task)
        r = wm.reward_value(cfg.wm, logits, cfg.reward_symexp)[..., 0]
        r = jnp.where(jnp.isnan(r), 0.0, r)
        # values for the critic targets only: no gradient through these H critic evaluations
        v_next = critic.min_value(cfg.critic, critic_params, jax.lax.stop_gradient(z_next))
        out = (jax.lax.stop_gradient(z), jax.lax.stop_gradient(r), v_next)
        return (z_next, disc * cfg.gamma, ret + disc * r), out

    draws = (jax.random.split(key, H), None) if eps is None else (None, jnp.asarray(eps, z0.dtype))
    # The running discount is a float32 tensor in the reference, also when its model runs in float64.
    init = (z0, jnp.ones((), jnp.float32), jnp.zeros(obs0.shape[:-1], z0.dtype))
    step = nets.remat_scan_body(body, cfg.remat)  # remat: see wm_loss
    (z_h, disc, ret), (states, rewards, next_values) = jax.lax.scan(step, init, draws, length=H)
    v_h = critic.min_value(cfg.critic, critic_params, z_h)  # terminal value, gradient to the actor through z_H
    terminal = cfg.gamma * disc if cfg.terminal_discount == "gamma_h_plus_1" else disc  # B7
    loss_b = -ret - terminal * v_h
    if cfg.ret_rms:
        rms = mathops.rms_update(rms, jax.lax.stop_gradient(loss_b)[:, None])
        loss_b = loss_b / jnp.sqrt(rms.var[0] + 1e-5)
    else:
        loss_b = loss_b / H
    aux = {"states": states, "rewards": rewards, "next_values": next_values, "rms": rms,
           "imagined_return": jnp.mean(ret)}
    return jnp.mean(loss_b), aux


# ========================================================================================== critic steps


def critic_loss(cfg: CriticConfig, params: Params, z, y, w):
    """Weighted MSE over members and rows: z [N, L], targets y [N], row weights w [N] (0 for NaN rows)."""
    v = critic.values(cfg, params, z)[..., 0]  # [K, N]
    return jnp.sum(jnp.mean(jnp.square(v - y), axis=0) * w) / jnp.maximum(jnp.sum(w), 1.0)


def critic_minibatch_indices(cfg: PWMConfig, rows: int, key) -> tuple[jax.Array, jax.Array]:
    """Row indices [S, size] of the S = iterations x slices critic steps, and which are real rows [S, size].

    'contiguous' (reference CriticDataset): consecutive slices of size rows // critic_batches, the last one
    shorter when that does not divide rows (ceil(rows / size) slices; its padding rows are marked invalid).
    'shuffled': critic_batches slices of a fresh permutation per pass (a remainder is left out of that pass).
    """
    size = rows // cfg.critic_batches
    if size < 1:
        raise ValueError(f"{rows} critic rows (horizon x batch) cannot make critic_batches={cfg.critic_batches} minibatches")
    if cfg.critic_minibatches == "contiguous":
        slices = -(-rows // size)
        flat = jnp.arange(slices * size)
        one = jnp.minimum(flat, rows - 1).reshape(slices, size)
        valid = (flat < rows).reshape(slices, size)
        return jnp.tile(one, (cfg.critic_iterations, 1)), jnp.tile(valid, (cfg.critic_iterations, 1))
    perms = jax.vmap(lambda k: jax.random.permutation(k, rows)[: cfg.critic_batches * size])(
        jax.random.split(key, cfg.critic_iterations))
    idx = perms.reshape(cfg.critic_iterations * cfg.critic_batches, size)
    return idx, jnp.ones(idx.shape, bool)


def critic_update(cfg: PWMConfig, params: Params, opt_state, states, targets, lr, key):
    """critic_iterations x (critic minibatches) Adam steps on (states [H, B, L], targets [H, B]) flattened time-major.

    Rows with a NaN latent or target get weight 0 (the reference drops NaN-latent rows before slicing; see
    docs/differences.md); NaN gradients are zeroed (reference) and counted. Returns (params, opt_state, metrics).
    """
    z = states.reshape(-1, states.shape[-1])
    y = targets.reshape(-1)
    finite = jnp.isfinite(y) & jnp.all(jnp.isfinite(z), axis=-1)
    z = jnp.where(finite[:, None], z, 0.0)
    y = jnp.where(finite, y, 0.0)
    idx, in_slice = critic_minibatch_indices(cfg, y.shape[0], key)
    weights = (finite[idx] & in_slice).astype(y.dtype)

    def step(carry, xs):
        p, o, nan_count = carry
        rows, w = xs
        loss, grads = jax.value_and_grad(critic_loss, argnums=1)(cfg.critic, p, z[rows], y[rows], w)
        bad = ~all_finite(grads)
        grads = jax.tree_util.tree_map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grads)
        p, o, norm = adam_step(p, o, grads, lr, cfg.critic_betas, cfg.critic_grad_clip, cfg.adam_eps)
        return (p, o, nan_count + bad.astype(jnp.int32)), (loss, norm)

    init = (params, opt_state, jnp.zeros((), jnp.int32))
    (params, opt_state, nan_count), (losses, norms) = jax.lax.scan(step, init, (idx, weights))
    return params, opt_state, {"value_loss": jnp.mean(losses), "critic_grad_norm": norms[-1], "critic_nan_grads": nan_count}


# ============================================================================================ state, update


@struct.dataclass
class TrainState:
    """One run's training state (a pytree; the trainer stacks it on a leading run axis).

    actor / critic: params; actor_opt / critic_opt: their Adam states; ret_rms: the actor loss's return normaliser;
    epoch: updates done (drives the LR schedule); nan_skips: actor updates skipped for non-finite values.
    When the WM is fine-tuned: wm and wm_opt; with the reference's never-zeroed task-embedding gradient (B22) also
    wm_emb_grad [num_tasks, task_dim]. Fields a configuration does not use are None.
    """

    actor: Params
    critic: Params
    actor_opt: Any
    critic_opt: Any
    ret_rms: mathops.RunningMeanStd
    epoch: jax.Array
    nan_skips: jax.Array
    wm: Params | None = None
    wm_opt: Any = None
    wm_emb_grad: jax.Array | None = None


def init_state(cfg: PWMConfig, key, wm_params: Params | None = None) -> TrainState:
    """Fresh per-task training state; the WM and its Adam state too when fine-tuning.

    wm_params: the starting WM when fine-tuning (pretrained or fresh); ignored when the WM is frozen
    (then it is passed to `update` separately and shared across tasks).
    """
    k_actor, k_critic, k_wm = jax.random.split(key, 3)
    a = actors.init(cfg.actor, k_actor)
    c = critic.init(cfg.critic, k_critic)
    state = TrainState(actor=a, critic=c, actor_opt=_adam(cfg.actor_betas, cfg.adam_eps).init(a),
                       critic_opt=_adam(cfg.critic_betas, cfg.adam_eps).init(c), ret_rms=mathops.rms_init((1,)),
                       epoch=jnp.zeros((), jnp.int32), nan_skips=jnp.zeros((), jnp.int32))
    if not cfg.finetune_wm:
        return state
    w = wm.init(cfg.wm, k_wm) if wm_params is None else wm_params
    emb_grad = jnp.zeros_like(w["_task_emb"]["weight"]) if cfg.accumulates_emb_grad else None
    return state.replace(wm=w, wm_opt=_adam(cfg.wm_betas, cfg.adam_eps).init(w), wm_emb_grad=emb_grad)


def wm_objective(cfg: PWMConfig, params: Params, obs, action, reward, task, key, taus=None):
    """`wm_loss` with this config's settings (gamma, reward loss, tau sampling, teacher forcing, remat): the WM step's
    objective, also what the diagnostics differentiate and the online WM probe evaluates. Returns (total, parts)."""
    return wm_loss(cfg.wm, params, obs, action, reward, task, key, gamma=cfg.gamma, reward_loss=cfg.reward_loss,
                   tau_sampling=cfg.tau_sampling, taus=taus, teacher_forcing=cfg.teacher_forcing, remat=cfg.remat)


def wm_update(cfg: PWMConfig, params: Params, opt_state, obs, action, reward, task, key, lr, taus=None, emb_grad=None):
    """One WM Adam step (clip over all WM params; the task embedding is not stepped unless train_task_emb).

    taus [H, B, 1]: recorded flow-matching times instead of drawing from `key`. emb_grad [num_tasks, E]: the
    reference's accumulated task-embedding gradient (B22), added before the clip and scaled by it like the
    others. Returns (params, opt_state, metrics, emb_grad after the clip or None).
    """
    def loss_fn(p):
        return wm_objective(cfg, p, obs, action, reward, task, key, taus)

    (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if emb_grad is not None:
        grads = dict(grads, _task_emb={"weight": grads["_task_emb"]["weight"] + emb_grad})
    ok = all_finite(grads) & jnp.isfinite(total)
    new_params, new_opt, norm = adam_step(params, opt_state, grads, lr, cfg.wm_betas, cfg.wm_grad_clip, cfg.adam_eps)
    if emb_grad is not None:  # clip_grad_norm_ scales the stored .grad in place
        emb_grad = grads["_task_emb"]["weight"] * jnp.minimum(1.0, cfg.wm_grad_clip / (norm + 1e-6))
    if not cfg.train_task_emb and "_task_emb" in params:
        new_params = dict(new_params, _task_emb=params["_task_emb"])  # B5: never stepped in the reference
    params, opt_state = _keep_if(ok, (new_params, new_opt), (params, opt_state))
    metrics = {"wm_loss": total, **parts, "wm_grad_norm": norm, "wm_nan_skips": (~ok).astype(jnp.int32)}
    return params, opt_state, metrics, emb_grad


def _wm_phase(cfg: PWMConfig, state: TrainState, batch: dict, key, lr) -> tuple[TrainState, dict]:
    """The WM step(s) of one epoch: wm_iterations steps on batch['wm'], or (B9) one on the policy batch."""
    task, draws = batch["task"], batch.get("draws", {})
    emb_grad = state.wm_emb_grad
    if cfg.wm_updates == "iterations" and "wm" in batch:
        wb = batch["wm"]

        def wm_body(carry, xs):
            p, o, g = carry
            obs, act, rew, k = xs
            p, o, m, g = wm_update(cfg, p, o, obs, act, rew, task, k, lr, emb_grad=g)
            return (p, o, g), m

        n = wb["obs"].shape[0]
        (wp, wo, emb_grad), ms = jax.lax.scan(wm_body, (state.wm, state.wm_opt, emb_grad),
                                              (wb["obs"], wb["action"], wb["reward"], jax.random.split(key, n)))
        reduce = {"wm_nan_skips": jnp.sum, "wm_grad_norm": lambda v: v[-1]}
        metrics = {k: reduce.get(k, jnp.mean)(v) for k, v in ms.items()}
    else:  # B9: one step on the policy batch
        wp, wo, metrics, emb_grad = wm_update(cfg, state.wm, state.wm_opt, batch["obs"], batch["action"],
                                              batch["reward"], task, key, lr, taus=draws.get("wm_taus"), emb_grad=emb_grad)
    return state.replace(wm=wp, wm_opt=wo, wm_emb_grad=emb_grad), metrics


def _actor_phase(cfg: PWMConfig, state: TrainState, wm_params: Params, batch: dict, key, lr) -> tuple[TrainState, dict, dict]:
    """The actor step: loss and gradient through the rollout, clip, Adam; NaN steps skipped and counted.

    Returns (state, metrics, aux) with aux = the rollout (for the critic) and the clipped gradient.
    The stored log-std is first clamped to its minimum, as the reference's forward does in place (B21).
    """
    actor_p = actors.project_logstd(cfg.actor, state.actor)
    emb = wm_params["_task_emb"]["weight"] if state.wm_emb_grad is not None else None

    def objective(p, table):
        w = wm_params if table is None else dict(wm_params, _task_emb={"weight": table})
        return actor_loss(cfg, p, w, state.critic, state.ret_rms, batch["obs"][0], batch["task"], key,
                          eps=batch.get("draws", {}).get("actor_eps"))

    (loss, aux), (grads, emb_g) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(actor_p, emb)
    ok = all_finite(grads) & jnp.isfinite(loss)
    new_actor, new_opt, norm = adam_step(actor_p, state.actor_opt, grads, lr, cfg.actor_betas, cfg.actor_grad_clip,
                                         cfg.adam_eps)
    if cfg.logstd_clamp == "stored":
        new_actor = actors.project_logstd(cfg.actor, new_actor)
    new_actor, new_opt, rms = _keep_if(ok, (new_actor, new_opt, aux["rms"]), (actor_p, state.actor_opt, state.ret_rms))
    state = state.replace(actor=new_actor, actor_opt=new_opt, ret_rms=rms, nan_skips=state.nan_skips + (~ok).astype(jnp.int32))
    if emb is not None:  # the actor's backward adds to the never-zeroed embedding gradient (B22)
        state = state.replace(wm_emb_grad=state.wm_emb_grad + emb_g)
    stddev_clamped = cfg.logstd_clamp == "stored" or cfg.actor.kind == "flow"
    metrics = {"actor_loss": loss, "actor_grad_norm": norm, "actor_nan_skip": (~ok).astype(jnp.int32),
               "actor_stddev": actors.stddev(cfg.actor, new_actor, clamped=stddev_clamped),
               "imagined_return": aux["imagined_return"]}
    aux = dict(aux, actor_grad_clipped=clip_by_norm(grads, cfg.actor_grad_clip)[0])
    return state, metrics, aux


def _critic_targets(cfg: PWMConfig, rewards, next_values):
    """TD targets [H, B] and the done mask used: dones = 1 everywhere (B6, one-step) or only at the horizon."""
    if cfg.critic_target == "one_step":
        done = jnp.ones_like(rewards)
    else:
        done = jnp.zeros_like(rewards).at[cfg.horizon - 1].set(1.0)
    return td_targets(rewards, next_values, done, cfg.gamma, cfg.lam, "td-lambda"), done


def update(cfg: PWMConfig, state: TrainState, batch: dict, key, frozen_wm: Params | None = None, record: bool = False):
    """One epoch for one task: WM step(s) if fine-tuning, actor step, critic steps. Pure and jittable.

    batch: obs [H+1, B, O], action [H, B, A], reward [H, B], task (int32 scalar, or [B] ids); optionally 'wm'
    with obs [I, H+1, Bw, O], action [I, H, Bw, A], reward [I, H, Bw] for wm_updates='iterations'; optionally
    'draws' = {'actor_eps': [H, B, A], 'wm_taus': [H, B, 1]}: recorded random draws used instead of `key`'s.
    frozen_wm: the shared WM when not fine-tuning. record (static): also return the rollout buffers, critic
    targets and the clipped actor gradient, for parity checks. Returns (state, metrics[, record]).
    """
    k_wm, k_actor, k_critic = jax.random.split(key, 3)
    lr_a, lr_c, lr_w = (learning_rate(lr0, state.epoch, cfg.max_epochs, cfg.lr_schedule)
                        for lr0 in (cfg.actor_lr, cfg.critic_lr, cfg.model_lr))
    metrics = {}
    if cfg.finetune_wm:
        state, wm_metrics = _wm_phase(cfg, state, batch, k_wm, lr_w)
        metrics.update(wm_metrics, lr_wm=lr_w)
        wm_params = state.wm
    elif frozen_wm is None:
        raise ValueError("update: the WM is frozen (finetune_wm=False) but no frozen_wm params were given")
    else:
        wm_params = frozen_wm

    k_act, k_perm = jax.random.split(k_actor)
    state, actor_metrics, aux = _actor_phase(cfg, state, wm_params, batch, k_act, lr_a)
    targets, done = _critic_targets(cfg, aux["rewards"], aux["next_values"])
    c_params, c_opt, c_metrics = critic_update(cfg, state.critic, state.critic_opt, aux["states"], targets, lr_c, k_perm)
    state = state.replace(critic=c_params, critic_opt=c_opt, epoch=state.epoch + 1)
    metrics.update(actor_metrics, lr_actor=lr_a, lr_critic=lr_c, **c_metrics)
    if not record:
        return state, metrics
    rec = {"obs_buf": aux["states"], "rew_buf": aux["rewards"], "next_values": aux["next_values"], "target_values": targets,
           "done_mask": done, "actor_grad_clipped": aux["actor_grad_clipped"]}
    return state, metrics, rec


# ========================================================================================= WM pretraining


@struct.dataclass
class PretrainState:
    """WM pretraining state (phase 8): the WM, its Adam state and the steps done."""

    wm: Params
    wm_opt: Any
    step: jax.Array


def wm_pretrain_init(cfg: PWMConfig, key, wm_params: Params | None = None) -> PretrainState:
    w = wm.init(cfg.wm, key) if wm_params is None else wm_params
    return PretrainState(wm=w, wm_opt=_adam(cfg.wm_betas, cfg.adam_eps).init(w), step=jnp.zeros((), jnp.int32))


def wm_pretrain_step(cfg: PWMConfig, state: PretrainState, batch: dict, key) -> tuple[PretrainState, dict]:
    """Phase 8: one WM step on a multitask batch (task ids per sequence, batch['task'] [B]) at a constant lr.

    The reference never decays this lr (update_lrs is not called in pretraining).
    """
    p, o, m, _ = wm_update(cfg, state.wm, state.wm_opt, batch["obs"], batch["action"], batch["reward"], batch["task"],
                           key, jnp.asarray(cfg.model_lr, mathops.default_float()))
    return PretrainState(wm=p, wm_opt=o, step=state.step + 1), m
