"""An independent PyTorch re-implementation of the reference's whole `PWM.update(obs, act, rew, task, finetune_wm)`.

Test helper, written from the reference's (Flow-MBPO-PWM, dev/multitask) semantics, not its code, and without any
fmbpo_jax import, so that it can (a) be checked against the shipped whole-update goldens
(tests/fixtures/golden_update_small.*) and (b) generate further golden sets with other settings
(`write_golden_set`, in tests/reference_update_goldens.py).

Everything is plain functions of parameter dicts keyed by the reference's torch names (Linear weights [out, in]):
the world model (MLP or flow), the actor (Gaussian or flow ODE) and the critic ensemble (`params.<i>`, members
stacked on axis 0). Randomness is never sampled here: every draw the reference makes (the Gaussian actor's rsample
eps, the flow actor's initial noise, the flow-matching tau) is taken, in the reference's order, from recorded arrays.

Reference semantics reproduced on purpose (each one is visible in some golden array):
- nn.Embedding(max_norm=1): each lookup renormalises the looked-up stored rows IN PLACE (row *= 1/(norm+1e-7) when
  norm > 1) under no_grad; the gradient reaching the stored row is the plain output gradient.
- The task embedding is in no optimizer group: its .grad is never zeroed, so it accumulates the WM-loss and the
  actor-loss gradients of every update, and clip_grad_norm_(all WM params, wm_clip) includes (and scales) it.
- The actor's rollout starts from z0 = encode(obs[0]) WITH gradient (only the actor's input is detached), so the
  actor loss also leaves gradients on the WM (zeroed by the next WM step, except the task embedding's).
- The Gaussian actor clamps its stored logstd in place (>= min_logstd) at every forward; Adam then steps the
  clamped value and may leave it below the minimum; the actor_stddev metric reads the unclamped value. The flow
  actor clamps init_logstd in place at -10 and its stddev metric reads the clamped value.
- The actor loss's running discount is a float32 tensor even when everything else is float64 (torch.ones(B,
  dtype=float32) multiplied by gamma each step, in float32, and gamma * it for the terminal value): without it the
  float64 goldens' actor_loss, ret_rms_mean/var and actor gradients are off by ~1e-7 relative.
- Terminal value discounted by gamma^(H+1); actor loss normalised by sqrt(ret_rms.var + 1e-5) after the ret_rms
  update with this batch (no mean subtraction); the WM reward loss is an MSE of every logit against the reward.
- Critic: one dataset of the H*B rollout states (time-major), contiguous slices of H*B // critic_batches rows (the
  last one shorter), critic_iterations passes; every member regressed on the same min-over-members targets.
- Learning rates are constant within update() (no schedule call).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]

LN_EPS = 1e-5
EMB_MAX_NORM = 1.0
FLOW_ACTOR_MIN_LOGSTD = -10.0
WM_PREFIXES = {"mlp": ("_encoder", "_dynamics", "_reward"), "flow": ("_encoder", "_velocity", "_reward")}
DRAW_KINDS = ("gauss_eps", "flow_z0", "fm_tau")


# --------------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything update() depends on, from a golden json's `config` (sizes) and `alg` (hyper-parameters)."""

    horizon: int
    batch: int
    gamma: float
    lam: float
    simnorm_dim: int
    num_bins: int
    vmin: float
    vmax: float
    actor_min_logstd: float
    lrs: dict  # module -> lr (actor, critic, world_model)
    betas: dict  # module -> (beta1, beta2)
    adam_eps: float
    clips: dict  # module -> max grad norm
    critic_iterations: int
    critic_batches: int
    wm_integrator: str
    wm_substeps: int
    actor_integrator: str
    actor_substeps: int
    tau_sampling: str
    detach: bool
    ret_rms: bool
    critic_method: str

    @staticmethod
    def from_json(config: dict, alg: dict) -> "Settings":
        for key, allowed in (("wm_integrator", ("euler", "heun")), ("actor_integrator", ("euler", "heun")),
                             ("tau_sampling", ("uniform", "midpoint")), ("critic_method", ("td-lambda", "one-step"))):
            if alg[key] not in allowed:
                raise ValueError(f"alg.{key}={alg[key]!r}: expected one of {allowed}")
        betas = tuple(alg["betas"])
        return Settings(
            horizon=int(config["horizon"]), batch=int(config["batch"]),
            gamma=float(alg["gamma"]), lam=float(alg["lam"]),
            simnorm_dim=int(config["simnorm_dim"]), num_bins=int(config["num_bins"]), vmin=float(config["vmin"]),
            vmax=float(config["vmax"]), actor_min_logstd=float(config["actor_min_logstd"]),
            lrs={"actor": alg["actor_lr"], "critic": alg["critic_lr"], "world_model": alg["model_lr"]},
            betas={"actor": betas, "critic": betas, "world_model": tuple(alg["wm_betas"])},
            adam_eps=float(alg["adam_eps"]),
            clips={"actor": alg["actor_grad_norm"], "critic": alg["critic_grad_norm"],
                   "world_model": alg["wm_grad_norm"]},
            critic_iterations=int(alg["critic_iterations"]), critic_batches=int(alg["critic_batches"]),
            wm_integrator=alg["wm_integrator"], wm_substeps=int(alg["wm_substeps"]),
            actor_integrator=alg["actor_integrator"], actor_substeps=int(alg["actor_substeps"]),
            tau_sampling=alg["tau_sampling"], detach=bool(alg["detach"]), ret_rms=bool(alg["ret_rms"]),
            critic_method=alg["critic_method"])


# --------------------------------------------------------------------------------------------------------------
# Layers and networks (functions of torch-named parameter dicts)


def simnorm(x: torch.Tensor, group: int) -> torch.Tensor:
    """Softmax inside contiguous groups of `group` features of the last axis."""
    return F.softmax(x.reshape(*x.shape[:-1], -1, group), dim=-1).reshape(x.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps=LN_EPS)


def wm_mlp(p: Params, prefix: str, x: torch.Tensor, simnorm_dim: int) -> torch.Tensor:
    """TD-MPC2 mlp(): NormedLinear (Linear -> LN -> Mish) hidden layers; the last layer is Linear -> LN -> SimNorm
    when it has a LayerNorm (`<prefix>.<i>.ln.*`), else a plain Linear (the reward head)."""
    n = sum(1 for k in p if k.startswith(prefix + ".") and k.endswith(".weight") and ".ln." not in k)
    for i in range(n):
        name = f"{prefix}.{i}"
        x = F.linear(x, p[name + ".weight"], p[name + ".bias"])
        if name + ".ln.weight" in p:
            x = layer_norm(x, p[name + ".ln.weight"], p[name + ".ln.bias"])
            x = F.mish(x) if i < n - 1 else simnorm(x, simnorm_dim)
    return x


def seq_mlp(p: Params, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Actor/critic nn.Sequential MLP: Linear(3i) -> Mish -> LayerNorm(3i+2) per hidden layer, last Linear(3(n-1))."""
    n = sum(1 for k, v in p.items() if k.startswith(prefix + ".") and k.endswith(".weight") and v.ndim == 2)
    for i in range(n):
        x = F.linear(x, p[f"{prefix}.{3 * i}.weight"], p[f"{prefix}.{3 * i}.bias"])
        if i < n - 1:
            x = layer_norm(F.mish(x), p[f"{prefix}.{3 * i + 2}.weight"], p[f"{prefix}.{3 * i + 2}.bias"])
    return x


def critic_values(c: Params, z: torch.Tensor) -> torch.Tensor:
    """Ensemble of CriticMLPs stored as params.<i> = [W, b, ln_w, ln_b] per hidden layer + [W, b] (members on axis 0).
    z (..., latent) -> (K, ..., 1)."""
    hidden = (len(c) - 2) // 4
    members = []
    for k in range(c["params.0"].shape[0]):
        x = z
        for i in range(hidden):
            x = F.mish(F.linear(x, c[f"params.{4 * i}"][k], c[f"params.{4 * i + 1}"][k]))
            x = layer_norm(x, c[f"params.{4 * i + 2}"][k], c[f"params.{4 * i + 3}"][k])
        members.append(F.linear(x, c[f"params.{4 * hidden}"][k], c[f"params.{4 * hidden + 1}"][k]))
    return torch.stack(members)


def integrate(velocity: Callable, x: torch.Tensor, substeps: int, method: str) -> torch.Tensor:
    """x + integral_0^1 velocity(x, tau) on t_k = k/K, tau a (batch, 1) column; Euler or Heun (explicit trapezoid)."""
    dt = 1.0 / substeps
    for k in range(substeps):
        t = k * dt
        tau = torch.full((x.shape[0], 1), t, dtype=x.dtype)
        k1 = velocity(x, tau)
        if method == "euler":
            x = x + dt * k1
        else:
            k2 = velocity(x + dt * k1, torch.full((x.shape[0], 1), t + dt, dtype=x.dtype))
            x = x + (dt / 2.0) * (k1 + k2)
    return x


# --------------------------------------------------------------------------------------------------------------
# World models


def task_embedding(weight: torch.Tensor, task: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """nn.Embedding(max_norm=1) lookup: renormalise the looked-up stored rows in place (no grad), then look up (the
    gradient to a stored row is the plain sum of its output gradients). Broadcast over a leading time axis."""
    with torch.no_grad():
        rows = torch.unique(task)
        norms = torch.linalg.vector_norm(weight.data[rows], dim=-1)
        scale = torch.where(norms > EMB_MAX_NORM, EMB_MAX_NORM / (norms + 1e-7), torch.ones_like(norms))
        weight.data[rows] = weight.data[rows] * scale[:, None]
    emb = F.embedding(task, weight)
    return emb.expand(*like.shape[:-1], emb.shape[-1]) if like.ndim == 3 else emb


def encode(wm: Params, s: Settings, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    emb = task_embedding(wm["_task_emb.weight"], task, obs)
    return wm_mlp(wm, "_encoder", torch.cat([obs, emb], -1), s.simnorm_dim)


def flow_velocity(wm: Params, s: Settings, z, a, tau, task) -> torch.Tensor:
    """Flow WM velocity on [z, a, tau, emb]."""
    x = torch.cat([z, a, tau], -1)
    return wm_mlp(wm, "_velocity", torch.cat([x, task_embedding(wm["_task_emb.weight"], task, x)], -1), s.simnorm_dim)


def wm_next(kind: str, wm: Params, s: Settings, z, a, task) -> torch.Tensor:
    """MLP WM: _dynamics([z, emb, a]). Flow WM: z + integral of the velocity (alg wm_integrator, wm_substeps)."""
    if kind == "mlp":
        return wm_mlp(wm, "_dynamics", torch.cat([z, task_embedding(wm["_task_emb.weight"], task, z), a], -1),
                      s.simnorm_dim)
    return integrate(lambda x, tau: flow_velocity(wm, s, x, a, tau, task), z, s.wm_substeps, s.wm_integrator)


def wm_reward_logits(kind: str, wm: Params, s: Settings, z, a, task) -> torch.Tensor:
    """Reward logits (..., num_bins): MLP WM on [z, emb, a], flow WM on [z, a, emb]."""
    emb = task_embedding(wm["_task_emb.weight"], task, z)
    x = torch.cat([z, emb, a], -1) if kind == "mlp" else torch.cat([z, a, emb], -1)
    return wm_mlp(wm, "_reward", x, s.simnorm_dim)


def almost_two_hot_inv(s: Settings, logits: torch.Tensor) -> torch.Tensor:
    """sum(softmax(logits) * linspace(vmin, vmax, num_bins)), keepdim; no symexp."""
    bins = torch.linspace(s.vmin, s.vmax, s.num_bins, dtype=logits.dtype)
    return torch.sum(F.softmax(logits, dim=-1) * bins, dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------------------
# Recorded draws, Adam, gradient norms


class Draws:
    """The recorded random draws of one update ({kind: (n, ...) array}), handed out in the order they are asked for."""

    def __init__(self, arrays: dict, dtype: torch.dtype):
        unknown = set(arrays) - set(DRAW_KINDS)
        if unknown:
            raise ValueError(f"unknown draw kinds {sorted(unknown)}; expected some of {DRAW_KINDS}")
        self._arrays = {k: torch.as_tensor(np.asarray(v)).to(dtype) for k, v in arrays.items()}
        self._used = dict.fromkeys(self._arrays, 0)

    def take(self, kind: str) -> torch.Tensor:
        if kind not in self._arrays or self._used[kind] >= len(self._arrays[kind]):
            have = len(self._arrays.get(kind, ()))
            raise ValueError(f"draws/{kind}: draw {self._used.get(kind, 0)} requested, {have} recorded")
        self._used[kind] += 1
        return self._arrays[kind][self._used[kind] - 1]

    def check_consumed(self) -> None:
        left = {k: len(v) - self._used[k] for k, v in self._arrays.items() if len(v) != self._used[k]}
        if left:
            raise ValueError(f"recorded draws left unused: {left}")


def zero_grads(params: Params) -> None:
    """optimizer.zero_grad() (set_to_none) for the tensors of one optimizer."""
    for p in params.values():
        p.grad = None


def grad_norm(params: Params) -> torch.Tensor:
    """sqrt(sum over params with a grad of sum(grad^2)) (the reference's actor_grad_norm metric)."""
    return torch.sqrt(sum(torch.sum(p.grad ** 2) for p in params.values() if p.grad is not None))


def clip_grad_norm(params: Params, max_norm: float) -> torch.Tensor:
    """torch clip_grad_norm_: total = L2 norm of the per-tensor L2 norms; grads *= min(1, max_norm/(total+1e-6)) in
    place. Returns the pre-clip total."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


def adam_step(params: Params, state: dict, lr: float, betas: tuple, eps: float) -> None:
    """torch.optim.Adam (no weight decay, no amsgrad) on the params that have a grad; `state` name -> (step, m, v)."""
    b1, b2 = betas
    with torch.no_grad():
        for name, p in params.items():
            if p.grad is None:
                continue
            step, m, v = state.get(name, (0, torch.zeros_like(p), torch.zeros_like(p)))
            step, m, v = step + 1, b1 * m + (1 - b1) * p.grad, b2 * v + (1 - b2) * p.grad * p.grad
            denom = v.sqrt() / np.sqrt(1 - b2 ** step) + eps
            p.sub_(lr / (1 - b1 ** step) * m / denom)
            state[name] = (step, m, v)


# --------------------------------------------------------------------------------------------------------------
# Agent state


@dataclasses.dataclass
class Agent:
    """The mutable state update() reads and writes: parameters (torch names, leaf tensors whose .grad accumulates as
    in the reference), Adam states, the return normaliser."""

    wm_kind: str  # "mlp" | "flow"
    actor_kind: str  # "gaussian" | "flow"
    wm: Params
    actor: Params
    critic: Params
    adam: dict  # module -> {name: (step, m, v)}
    ret_rms: dict  # mean (1,), var (1,), count (float)

    def modules(self) -> dict:
        """{actor, critic, world_model} parameter dicts (the golden's module names)."""
        return {"actor": self.actor, "critic": self.critic, "world_model": self.wm}

    def wm_optimized(self) -> Params:
        """The WM optimizer's tensors: encoder, dynamics-or-velocity and reward; not the task embedding."""
        prefixes = tuple(p + "." for p in WM_PREFIXES[self.wm_kind])
        return {k: v for k, v in self.wm.items() if k.startswith(prefixes)}


def _leaves(state_dict: dict, dtype: torch.dtype) -> Params:
    return {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in state_dict.items()}


def make_agent(case: dict, weights: dict, dtype: torch.dtype) -> Agent:
    """case: {wm: mlp|flow, actor: gaussian|flow}; weights: {wm_mlp, wm_flow, actor_gaussian, actor_flow, critic}
    state dicts (torch names and layouts, as in the checkpoint files)."""
    for key, allowed in (("wm", ("mlp", "flow")), ("actor", ("gaussian", "flow"))):
        if case[key] not in allowed:
            raise ValueError(f"case {case.get('name')!r}: {key}={case[key]!r}, expected one of {allowed}")
    dt = dtype
    return Agent(wm_kind=case["wm"], actor_kind=case["actor"], wm=_leaves(weights[f"wm_{case['wm']}"], dt),
                 actor=_leaves(weights[f"actor_{case['actor']}"], dt), critic=_leaves(weights["critic"], dt),
                 adam={"actor": {}, "critic": {}, "world_model": {}},
                 ret_rms={"mean": torch.zeros(1, dtype=dt), "var": torch.ones(1, dtype=dt), "count": 1e-4})


def actor_stddev(agent: Agent) -> torch.Tensor:
    """exp(get_logstd()).mean(): the Gaussian actor's raw logstd, the flow actor's clamped init_logstd."""
    if agent.actor_kind == "gaussian":
        return agent.actor["logstd"].detach().exp().mean()
    return agent.actor["init_logstd"].detach().clamp(min=FLOW_ACTOR_MIN_LOGSTD).exp().mean()


# --------------------------------------------------------------------------------------------------------------
# Losses


def flow_matching_loss(agent: Agent, s: Settings, z, z_target, a, task, gamma_t: float, draws: Draws) -> torch.Tensor:
    """mean((v(z_tau, a, tau) - (z_target - z))^2) * gamma_t, z_tau = (1 - tau) z + tau z_target."""
    if s.tau_sampling == "uniform":
        tau = draws.take("fm_tau")
    else:
        tau = torch.full((z.shape[0], 1), 0.5, dtype=z.dtype)
    z_tau = (1.0 - tau) * z + tau * z_target
    err = flow_velocity(agent.wm, s, z_tau, a, tau, task) - (z_target - z)
    return (err ** 2).mean() * gamma_t


def wm_loss(agent: Agent, s: Settings, obs, act, rew, task, draws: Draws):
    """compute_wm_loss: obs (H+1,B,O), act (H,B,A), rew (H,B,1), task (B,) -> (total, dynamics/H, reward/H).
    Autoregressive latent rollout from encode(obs[0]); targets encode(obs[1:]) without grad."""
    kind, wm, H = agent.wm_kind, agent.wm, s.horizon
    with torch.no_grad():
        next_z = encode(wm, s, obs[1:], task)
    z = encode(wm, s, obs[0], task)
    zs, dynamics = [z], 0.0
    for t in range(H):
        if kind == "flow":
            dynamics = dynamics + flow_matching_loss(agent, s, z, next_z[t], act[t], task, s.gamma ** t, draws)
        z = wm_next(kind, wm, s, z, act[t], task)
        if kind == "mlp":
            dynamics = dynamics + F.mse_loss(z, next_z[t]) * s.gamma ** t
        zs.append(z)
    logits = wm_reward_logits(kind, wm, s, torch.stack(zs[:-1]), act, task)
    discount = (s.gamma ** torch.arange(H, dtype=z.dtype)).view(H, 1, 1)
    reward = ((logits - rew) ** 2 * discount).mean()
    return (dynamics + reward) / H, dynamics / H, reward / H


def actor_action(agent: Agent, s: Settings, z: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Pre-tanh stochastic action. Each forward first clamps the stored log-std IN PLACE."""
    a = agent.actor
    if agent.actor_kind == "gaussian":
        a["logstd"].data.clamp_(min=s.actor_min_logstd)
        return seq_mlp(a, "mu_net", z) + draws.take("gauss_eps") * a["logstd"].exp()
    a["init_logstd"].data.clamp_(min=FLOW_ACTOR_MIN_LOGSTD)
    z0 = draws.take("flow_z0") * a["init_logstd"].exp()
    return integrate(lambda x, tau: seq_mlp(a, "velocity_net", torch.cat([z, x, tau], -1)), z0,
                     s.actor_substeps, s.actor_integrator)


def update_ret_rms(rms: dict, values: torch.Tensor) -> None:
    """RunningMeanStd parallel update with the population variance of `values` (B,)."""
    mean, var, n = values.mean(), values.var(unbiased=False), values.shape[0]
    delta, total = mean - rms["mean"], rms["count"] + n
    m2 = rms["var"] * rms["count"] + var * n + delta ** 2 * rms["count"] * n / total
    rms.update(mean=rms["mean"] + delta * n / total, var=m2 / total, count=n + rms["count"])


def actor_loss(agent: Agent, s: Settings, obs0, task, draws: Draws):
    """compute_actor_loss (offline branch): H imagined steps from z0 = encode(obs0) (kept in the graph). Returns
    (loss, buffers) with buffers obs_buf (H,B,L), rew_buf/next_values/done_mask (H,B), all detached."""
    kind, wm = agent.wm_kind, agent.wm
    z = encode(wm, s, obs0, task)
    # The running discount is a float32 tensor in the reference whatever the compute dtype (torch.ones(bsz,
    # dtype=float32) *= gamma each step, and gamma * it for the terminal value): the float64 goldens show it.
    ret, disc = 0.0, torch.ones(obs0.shape[0], dtype=torch.float32)
    bufs = {"obs_buf": [], "rew_buf": [], "next_values": []}
    for _ in range(s.horizon):
        bufs["obs_buf"].append(z.detach().clone())
        action = torch.tanh(actor_action(agent, s, z.detach() if s.detach else z, draws))
        z_next = wm_next(kind, wm, s, z, action, task)
        rew = almost_two_hot_inv(s, wm_reward_logits(kind, wm, s, z, action, task)).squeeze(-1)
        rew = torch.nan_to_num(rew, 0.0, 0.0, 0.0)
        ret = ret + disc * rew
        value = critic_values(agent.critic, z_next).min(dim=0).values.squeeze(-1)
        disc = disc * s.gamma
        bufs["rew_buf"].append(rew.detach())
        bufs["next_values"].append(value.detach())
        z = z_next
    loss = -ret - s.gamma * disc * value  # gamma^(H+1) on the terminal value, as the reference
    if s.ret_rms:
        with torch.no_grad():
            update_ret_rms(agent.ret_rms, loss.detach())
        loss = loss / torch.sqrt(agent.ret_rms["var"] + 1e-5)
    else:
        loss = loss / s.horizon
    bufs = {k: torch.stack(v) for k, v in bufs.items()}
    bufs["done_mask"] = torch.ones_like(bufs["rew_buf"])  # offline: every step "done"
    return loss.mean(), bufs


def target_values(s: Settings, rew_buf, next_values, done_mask) -> torch.Tensor:
    """compute_target_values: one-step r + gamma V, or the reference's TD(lambda) backward recursion. (H,B)."""
    if s.critic_method == "one-step":
        return rew_buf + s.gamma * next_values
    a_i, b_i = torch.zeros_like(rew_buf[0]), torch.zeros_like(rew_buf[0])
    lam, out = torch.ones_like(rew_buf[0]), torch.zeros_like(rew_buf)
    for i in reversed(range(s.horizon)):
        d = done_mask[i]
        lam = lam * s.lam * (1.0 - d) + d
        a_i = (1.0 - d) * (s.lam * s.gamma * a_i + s.gamma * next_values[i] + (1.0 - lam) / (1.0 - s.lam) * rew_buf[i])
        b_i = s.gamma * (next_values[i] * d + b_i * (1.0 - d)) + rew_buf[i]
        out[i] = (1.0 - s.lam) * a_i + lam * b_i
    return out


def train_critic(agent: Agent, s: Settings, obs_buf, targets):
    """critic_iterations passes over contiguous slices of H*B // critic_batches rows (NaN rows dropped; the last
    slice shorter). Returns (value_loss = mean over passes of the mean slice loss, pre-clip norm of the last step)."""
    obs = obs_buf.reshape(-1, obs_buf.shape[-1])
    y = targets.reshape(-1)
    keep = (obs == obs).all(dim=-1)
    obs, y = obs[keep], y[keep]
    size = s.batch * s.horizon // s.critic_batches
    n_slices = (obs.shape[0] - 1) // size + 1
    value_loss, norm = 0.0, None
    for _ in range(s.critic_iterations):
        total = 0.0
        for i in range(n_slices):
            zero_grads(agent.critic)
            pred = critic_values(agent.critic, obs[i * size:(i + 1) * size])  # (K, n, 1)
            loss = ((pred - y[i * size:(i + 1) * size, None]) ** 2).mean()
            loss.backward()
            for p in agent.critic.values():
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
            norm = clip_grad_norm(agent.critic, s.clips["critic"])
            adam_step(agent.critic, agent.adam["critic"], s.lrs["critic"], s.betas["critic"], s.adam_eps)
            total = total + loss.detach()
        value_loss = value_loss + total / n_slices
    return value_loss / s.critic_iterations, norm


# --------------------------------------------------------------------------------------------------------------
# One update, and consecutive updates of a case


def _wm_step(agent: Agent, s: Settings, obs, act, rew, task, draws: Draws) -> dict:
    """One WM Adam step; the clip runs over ALL WM tensors, the task embedding (never zeroed) included."""
    zero_grads(agent.wm_optimized())
    total, dynamics, reward = wm_loss(agent, s, obs, act, rew, task, draws)
    total.backward()
    norm = clip_grad_norm(agent.wm, s.clips["world_model"])
    adam_step(agent.wm_optimized(), agent.adam["world_model"], s.lrs["world_model"], s.betas["world_model"],
              s.adam_eps)
    return {"wm_loss": total, "dynamics_loss": dynamics, "reward_loss": reward, "wm_grad_norm": norm}


def update(agent: Agent, s: Settings, batch: dict, draws: Draws, finetune_wm: bool) -> dict:
    """PWM.update(obs, act, rew, task, finetune_wm): [WM step], actor step, critic steps. batch holds tensors obs
    (H+1,B,O), act (H,B,A), rew (H,B,1), task (B,) int64. Returns the arrays a golden records for one update."""
    obs, act, rew, task = batch["obs"], batch["act"], batch["rew"], batch["task"]
    if obs.shape[:2] != (s.horizon + 1, s.batch):
        raise ValueError(f"batch obs shape {tuple(obs.shape)}: expected (horizon+1, batch, obs_dim) = "
                         f"({s.horizon + 1}, {s.batch}, .)")
    metrics = _wm_step(agent, s, obs, act, rew, task, draws) if finetune_wm else {}
    zero_grads(agent.actor)
    loss, bufs = actor_loss(agent, s, obs[0], task, draws)
    loss.backward()
    metrics["actor_grad_norm"] = grad_norm(agent.actor)
    clip_grad_norm(agent.actor, s.clips["actor"])
    clipped = {k: p.grad.detach().clone() for k, p in agent.actor.items()}
    adam_step(agent.actor, agent.adam["actor"], s.lrs["actor"], s.betas["actor"], s.adam_eps)
    with torch.no_grad():
        bufs["target_values"] = target_values(s, bufs["rew_buf"], bufs["next_values"], bufs["done_mask"])
    metrics["value_loss"], metrics["critic_grad_norm"] = train_critic(agent, s, bufs["obs_buf"], bufs["target_values"])
    metrics["actor_loss"], metrics["actor_stddev"] = loss, actor_stddev(agent)
    draws.check_consumed()
    out = {f"metric/{k}": np.float64(torch.as_tensor(v).item()) for k, v in metrics.items()}
    out.update({k: v.numpy().astype(np.float64) for k, v in bufs.items()})
    out.update({f"actor_grad_clipped/{k}": v.numpy().astype(np.float64) for k, v in clipped.items()})
    out.update(ret_rms_mean=agent.ret_rms["mean"].numpy().astype(np.float64),
               ret_rms_var=agent.ret_rms["var"].numpy().astype(np.float64),
               ret_rms_count=np.float64(agent.ret_rms["count"]))
    return out


def deltas(agent: Agent, initial: Agent, finetune_wm: bool) -> dict:
    """delta/<module>/<param> = final - loaded, float32. A frozen WM only lists its task embedding (changed in place
    by the max_norm lookups); a fine-tuned WM lists every tensor."""
    out = {}
    for module, now in agent.modules().items():
        before = initial.modules()[module]
        names = now if (module != "world_model" or finetune_wm) else ["_task_emb.weight"]
        for name in names:
            out[f"delta/{module}/{name}"] = (now[name].detach() - before[name].detach()).numpy().astype(np.float32)
    return out


def _to_tensors(batch: dict, dtype: torch.dtype) -> dict:
    return {k: torch.as_tensor(np.asarray(v)).to(torch.int64 if k == "task" else dtype) for k, v in batch.items()}


def run_case(config: dict, alg: dict, case: dict, weights: dict, batches: list, draws: list,
             dtype: torch.dtype = torch.float64) -> dict:
    """Run len(batches) consecutive updates of one case (case: {name, wm, actor, finetune}).

    weights: {wm_mlp, wm_flow, actor_gaussian, actor_flow, critic} state dicts (only the case's are needed);
    batches[u]: {obs, act, rew, task} arrays; draws[u]: {kind: (n, ...) array} in the reference's draw order.
    Returns {"update<u>/...": ..., "delta/<module>/<param>": ...} in the golden's names (without the case prefix).
    """
    s = Settings.from_json(config, alg)
    agent = make_agent(case, weights, dtype)
    initial = make_agent(case, weights, dtype)
    out = {}
    threads = torch.get_num_threads()
    # Tensors of a few hundred elements: intra-op threads only contend (about 100x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        for u, (batch, drawn) in enumerate(zip(batches, draws, strict=True)):
            rec = update(agent, s, _to_tensors(batch, dtype), Draws(drawn, dtype), bool(case["finetune"]))
            out.update({f"update{u}/{k}": v for k, v in rec.items()})
    finally:
        torch.set_num_threads(threads)
    out.update(deltas(agent, initial, bool(case["finetune"])))
    return out


def weights_from_files(directory) -> dict:
    """The five state dicts of a golden directory (wm_small_native.pt, wm_small_native_flow.pt, actor_flow_small.pt)."""
    d = pathlib.Path(directory)

    def load(name):
        return torch.load(d / name, map_location="cpu", weights_only=True)

    native, flow_wm = load("wm_small_native.pt"), load("wm_small_native_flow.pt")
    flow_actor = load("actor_flow_small.pt")
    return {"wm_mlp": native["world_model"], "wm_flow": flow_wm["world_model"], "actor_gaussian": native["actor"],
            "actor_flow": flow_actor["actor"], "critic": native["critic"]}


def golden_case_inputs(npz, case_name: str, updates: int) -> tuple[list, list]:
    """(batches, draws) of one case from a golden npz (inputs/batch{u}_*, <case>/update<u>/draws/<kind>)."""
    batches = [{k: npz[f"inputs/batch{u}_{k}"] for k in ("obs", "act", "rew", "task")} for u in range(updates)]
    draws = [{kind: npz[f"{case_name}/update{u}/draws/{kind}"] for kind in DRAW_KINDS
              if f"{case_name}/update{u}/draws/{kind}" in npz} for u in range(updates)]
    return batches, draws
