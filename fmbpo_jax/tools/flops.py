"""The matmul FLOP model of one training epoch: the only one in the project (bench, report and tests use it).

Inputs are plain numbers: an `Architecture` (layer widths, WM and actor kind, integrator, substeps) and the
epoch's work (horizon, batch, WM steps, critic iterations...). `from_pwm_config` (the bench) and
`from_config_dict` (the report, from a run's config.json) only read those numbers out of a config.

Convention. A dense layer of `in` -> `out` on `rows` rows costs 2*rows*in*out FLOPs forward; its weight
gradient costs the same and its input gradient the same (2*rows*out per input column), so a layer that is
differentiated costs 3x its forward. Only matmuls are counted (biases, LayerNorm, Mish, SimNorm, softmax,
Adam and sampling are not). Two counts per part of the epoch:

* ``needed``: what the algorithm must compute (a functional implementation): no weight gradients of networks
  that a loss does not step, no input gradients of inputs that are data or detached;
* ``naive``: what a framework autograd such as the PyTorch reference computes for the same epoch: weight
  gradients of every parameter on the path and whole input gradients.

The task embedding's input-gradient columns of the encoder's first layer are counted in neither (< 0.01% at 48M).
Checked against the matmuls XLA compiles for a tiny epoch (tests/test_flops.py): JAX's autodiff computes `needed`
plus the whole input gradient of a first layer where only some of its columns need one (a concatenated input's
cotangent is one matmul) and one more critic forward for the terminal value (the rollout already evaluated
V(z_H)); within 0.5% of that on the test's architecture, and below `naive` for the reference preset's epoch.

An epoch (pwm.update) = WM step(s) when fine-tuning + one actor step + critic_iterations x critic_batches critic
steps; a WM pretraining iteration = one WM step on a multitask batch.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from configs.base import SIZES
from fmbpo_jax.envs.tasks import MAX_ACTION_DIM, MAX_OBS_DIM
from fmbpo_jax.presets import preset_values

Pair = tuple[float, float]  # (needed, naive)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Widths of the world model (encoder, dynamics or velocity net, reward head), actor and critic ensemble.

    wm_kind 'mlp' | 'flow', actor_kind 'gaussian' | 'flow'; a flow network is evaluated per macro step
    `substeps` times (Euler) or 2 x `substeps` times (Heun); an MLP WM or Gaussian actor once.
    """

    obs_dim: int
    action_dim: int
    latent_dim: int
    task_dim: int
    num_bins: int
    encoder_units: tuple[int, ...]
    wm_units: tuple[int, ...]
    actor_units: tuple[int, ...]
    critic_units: tuple[int, ...]
    num_critics: int
    wm_kind: str = "mlp"
    wm_integrator: str = "heun"
    wm_substeps: int = 1
    actor_kind: str = "gaussian"
    actor_integrator: str = "heun"
    actor_substeps: int = 1

    def __post_init__(self):
        if self.wm_kind not in ("mlp", "flow") or self.actor_kind not in ("gaussian", "flow"):
            raise ValueError(f"Architecture: wm_kind {self.wm_kind!r} (mlp | flow), actor_kind {self.actor_kind!r} "
                             "(gaussian | flow)")
        for name in ("encoder_units", "wm_units", "actor_units", "critic_units"):
            object.__setattr__(self, name, tuple(int(u) for u in getattr(self, name)))

    @property
    def wm_evals(self) -> int:
        """Dynamics/velocity evaluations per WM macro step."""
        return evals_per_step(self.wm_kind == "flow", self.wm_integrator, self.wm_substeps)

    @property
    def actor_evals(self) -> int:
        """Actor network evaluations per action."""
        return evals_per_step(self.actor_kind == "flow", self.actor_integrator, self.actor_substeps)


def evals_per_step(is_flow: bool, integrator: str, substeps: int) -> int:
    """Network evaluations of one macro step: 1 (not a flow), 2K (Heun) or K (Euler)."""
    if not is_flow:
        return 1
    return 2 * int(substeps) if integrator == "heun" else int(substeps)


def mlp_dims(in_dim: int, hidden: Sequence[int], out: int) -> list[tuple[int, int]]:
    """(in, out) of every dense layer of an MLP in -> hidden... -> out."""
    widths = [int(in_dim), *[int(h) for h in hidden], int(out)]
    return list(zip(widths[:-1], widths[1:]))


def dense_flops(rows: float, dims: Sequence[tuple[int, int]], *, fwd: bool = True, dw: bool = False,
                dx: bool = False, dx_first_cols: int | None = None) -> float:
    """Matmul FLOPs of an MLP on `rows` rows: forward, weight gradient, input gradient (each 2*rows*in*out per layer).

    dx: input gradients of every layer; dx_first_cols: how many of the FIRST layer's input columns need a
    gradient (None = all, 0 = none, e.g. a detached input).
    """
    per = [2.0 * rows * i * o for i, o in dims]
    total = sum(per) if fwd else 0.0
    if dw:
        total += sum(per)
    if dx:
        total += sum(per[1:])
        i0, o0 = dims[0]
        cols = i0 if dx_first_cols is None else min(dx_first_cols, i0)
        total += 2.0 * rows * cols * o0
    return total


def layer_dims(arch: Architecture) -> dict[str, list[tuple[int, int]]]:
    """Dense layers of each network; inputs: encoder [obs, emb], dynamics [z, a, emb] (+ tau for a flow WM),
    reward head [z, a, emb], actor [z] (+ [a_tau, tau] for the flow actor), one critic member [z]."""
    O, A, L, E = arch.obs_dim, arch.action_dim, arch.latent_dim, arch.task_dim
    return {
        "enc": mlp_dims(O + E, arch.encoder_units, L),
        "dyn": mlp_dims(L + A + E + (1 if arch.wm_kind == "flow" else 0), arch.wm_units, L),
        "rew": mlp_dims(L + A + E, arch.wm_units, arch.num_bins),
        "actor": mlp_dims(L + (A + 1 if arch.actor_kind == "flow" else 0), arch.actor_units, A),
        "critic": mlp_dims(L, arch.critic_units, 1),
    }


def wm_step_flops(arch: Architecture, *, horizon: int, sequences: int, teacher_forcing: bool = False,
                  train_task_emb: bool = True) -> Pair:
    """(needed, naive) FLOPs of one WM gradient step on `sequences` windows of H+1 steps (pwm.wm_loss).

    Encoder: H stop-gradient target rows (forward only) + 1 source row (forward, weight grads, input grads of all
    but the first layer). Dynamics: per step one call (MLP), or one flow-matching velocity call plus the macro
    step's integration calls (flow; with teacher forcing the flow-matching call only); reward head: H calls; all
    with weight and input gradients. Needed first-layer input columns: z (+ emb when it is trained); with teacher
    forcing z only at the first step (later sources are stop-gradient targets). Naive: the whole input.
    """
    d = layer_dims(arch)
    H, N, L = horizon, sequences, arch.latent_dim
    emb = arch.task_dim if train_task_emb else 0
    flow = arch.wm_kind == "flow"
    calls_per_step = (1 if teacher_forcing else 1 + arch.wm_evals) if flow else 1
    enc = dense_flops(H * N, d["enc"]) + dense_flops(N, d["enc"], dw=True, dx=True, dx_first_cols=0)
    if teacher_forcing:  # step 0 from z0 (with gradient), steps 1..H-1 from the stop-gradient targets
        first, later = N, (H - 1) * N
        dyn = (dense_flops(first * calls_per_step, d["dyn"], dw=True, dx=True, dx_first_cols=L + emb)
               + dense_flops(later * calls_per_step, d["dyn"], dw=True, dx=True, dx_first_cols=emb))
        rew = (dense_flops(first, d["rew"], dw=True, dx=True, dx_first_cols=L + emb)
               + dense_flops(later, d["rew"], dw=True, dx=True, dx_first_cols=emb))
    else:
        dyn = dense_flops(H * N * calls_per_step, d["dyn"], dw=True, dx=True, dx_first_cols=L + emb)
        rew = dense_flops(H * N, d["rew"], dw=True, dx=True, dx_first_cols=L + emb)
    naive = (enc + dense_flops(H * N * calls_per_step, d["dyn"], dw=True, dx=True)
             + dense_flops(H * N, d["rew"], dw=True, dx=True))
    return enc + dyn + rew, naive


def actor_step_flops(arch: Architecture, *, horizon: int, batch_size: int, emb_grad: bool = False) -> Pair:
    """(needed, naive) FLOPs of one actor step (pwm.actor_loss and its gradient wrt the actor only), B = batch.

    Needed: encoder on obs0 (B rows, forward only: z0 is detached); actor: H x evals calls, forward + weight
    grads + input grads (first layer: none for the Gaussian actor, whose input z is detached; the A action
    columns for the flow actor); WM transition H x evals calls and reward head H calls, forward + input grads
    wrt (z, a) (no weight grads: the actor loss does not step the WM); critic ensemble: H forward evaluations
    (H-1 for the critic targets, the terminal one for the loss) plus input grads of the terminal one.
    Naive (the reference's autograd): the same forwards, plus weight grads of the WM (and of the encoder behind
    z0), whole input grads, and backward (weight + input grads) through all H critic evaluations.
    emb_grad: the reference's never-zeroed task-embedding gradient (B22, pwm.PWMConfig.accumulates_emb_grad): the
    loss's gradient wrt the embedding is needed too, through the encoder (all layers) and the WM's emb columns.
    """
    d = layer_dims(arch)
    H, B, C = horizon, batch_size, arch.num_critics
    flow_actor = arch.actor_kind == "flow"
    act_rows, dyn_rows, rew_rows = H * B * arch.actor_evals, H * B * arch.wm_evals, H * B
    za = arch.latent_dim + arch.action_dim + (arch.task_dim if emb_grad else 0)
    enc_fwd = dense_flops(B, d["enc"], dx=emb_grad, dx_first_cols=arch.task_dim)
    actor_need = dense_flops(act_rows, d["actor"], dw=True, dx=True, dx_first_cols=arch.action_dim if flow_actor else 0)
    actor_naive = dense_flops(act_rows, d["actor"], dw=True, dx=True, dx_first_cols=None if flow_actor else 0)
    wm_need = (dense_flops(dyn_rows, d["dyn"], dx=True, dx_first_cols=za)
               + dense_flops(rew_rows, d["rew"], dx=True, dx_first_cols=za))
    wm_naive = (dense_flops(dyn_rows, d["dyn"], dw=True, dx=True) + dense_flops(rew_rows, d["rew"], dw=True, dx=True)
                + dense_flops(B, d["enc"], fwd=False, dw=True, dx=True, dx_first_cols=0))
    crit_need = dense_flops(H * B * C, d["critic"]) + dense_flops(B * C, d["critic"], fwd=False, dx=True)
    crit_naive = dense_flops(H * B * C, d["critic"], dw=True, dx=True)
    return enc_fwd + actor_need + wm_need + crit_need, enc_fwd + actor_naive + wm_naive + crit_naive


def critic_steps_flops(arch: Architecture, *, horizon: int, batch_size: int, critic_iterations: int,
                       critic_batches: int) -> Pair:
    """(needed, naive) FLOPs of the critic steps: critic_iterations x critic_batches steps on B*H // critic_batches
    rows each, every member forward + weight grads + input grads of all but the first layer (z is data); the same
    in both counts."""
    rows = critic_iterations * (batch_size * horizon // critic_batches) * critic_batches
    c = dense_flops(rows * arch.num_critics, layer_dims(arch)["critic"], dw=True, dx=True, dx_first_cols=0)
    return c, c


def _result(parts: Mapping[str, Pair]) -> dict:
    """{'needed', 'naive', 'parts': {part: {'needed', 'naive'}}} (the bench's JSON layout)."""
    return {"needed": sum(p[0] for p in parts.values()), "naive": sum(p[1] for p in parts.values()),
            "parts": {k: {"needed": v[0], "naive": v[1]} for k, v in parts.items()}}


def epoch_flops(arch: Architecture, *, horizon: int, batch_size: int, critic_iterations: int, critic_batches: int,
                wm_steps: int = 0, wm_batch_size: int = 0, teacher_forcing: bool = False,
                train_task_emb: bool = True, emb_grad: bool = False) -> dict:
    """FLOPs of ONE policy epoch of ONE run (task, seed): {'needed', 'naive', 'parts': {'wm'?, 'actor_step',
    'critic_steps'}}. wm_steps: WM gradient steps per epoch (0 = frozen WM), each on wm_batch_size windows.
    emb_grad: the reference's accumulated task-embedding gradient (B22): both losses differentiate the embedding."""
    parts: dict[str, Pair] = {}
    if wm_steps:
        n, nv = wm_step_flops(arch, horizon=horizon, sequences=wm_batch_size, teacher_forcing=teacher_forcing,
                              train_task_emb=train_task_emb or emb_grad)
        parts["wm"] = (wm_steps * n, wm_steps * nv)
    parts["actor_step"] = actor_step_flops(arch, horizon=horizon, batch_size=batch_size, emb_grad=emb_grad)
    parts["critic_steps"] = critic_steps_flops(arch, horizon=horizon, batch_size=batch_size,
                                               critic_iterations=critic_iterations, critic_batches=critic_batches)
    return _result(parts)


def pretrain_flops(arch: Architecture, *, horizon: int, batch_size: int, teacher_forcing: bool = False,
                   train_task_emb: bool = True) -> dict:
    """FLOPs of ONE WM pretraining iteration: one WM step on `batch_size` multitask windows ({'parts': {'wm'}})."""
    return _result({"wm": wm_step_flops(arch, horizon=horizon, sequences=batch_size, teacher_forcing=teacher_forcing,
                                        train_task_emb=train_task_emb)})


# ------------------------------------------------------------------------------ reading the numbers out of configs


def architecture_of(pcfg) -> Architecture:
    """The Architecture of a pwm.PWMConfig (its wm, actor and critic configs)."""
    w, a, c = pcfg.wm, pcfg.actor, pcfg.critic
    return Architecture(obs_dim=w.obs_dim, action_dim=w.action_dim, latent_dim=w.latent_dim, task_dim=w.task_dim,
                        num_bins=w.num_bins, encoder_units=w.encoder_units, wm_units=w.units, actor_units=a.units,
                        critic_units=c.units, num_critics=c.num_critics, wm_kind=w.kind, wm_integrator=w.integrator,
                        wm_substeps=w.substeps, actor_kind=a.kind, actor_integrator=a.integrator,
                        actor_substeps=a.substeps)


def from_pwm_config(pcfg, batch_size: int, wm_batch_size: int = 256, mode: str = "policy") -> dict:
    """epoch_flops (mode 'policy') or pretrain_flops (mode 'pretrain', `batch_size` windows) of a pwm.PWMConfig.

    Fine-tuning: wm_iterations steps on wm_batch_size windows (wm_updates='iterations') or one on the policy batch.
    """
    arch = architecture_of(pcfg)
    common = dict(horizon=pcfg.horizon, teacher_forcing=pcfg.teacher_forcing, train_task_emb=pcfg.train_task_emb)
    if mode == "pretrain":
        return pretrain_flops(arch, batch_size=batch_size, **common)
    steps, rows = 0, 0
    if pcfg.finetune_wm:
        steps, rows = (pcfg.wm_iterations, wm_batch_size) if pcfg.wm_updates == "iterations" else (1, batch_size)
    return epoch_flops(arch, batch_size=batch_size, critic_iterations=pcfg.critic_iterations,
                       critic_batches=pcfg.critic_batches, wm_steps=steps, wm_batch_size=rows,
                       emb_grad=pcfg.accumulates_emb_grad, **common)


def _model_fields(config: Mapping) -> dict:
    """config['model'] with its named size's widths applied (configs.base.SIZES), as run_config does."""
    m = dict(config["model"])
    if m.get("size", "custom") in SIZES:
        m.update(SIZES[m["size"]])
    return m


def from_config_dict(config: Mapping) -> dict:
    """epoch_flops of a run's config as a dict (config.json, or ConfigDict.to_dict()), at MT30's padded widths.

    Missing preset: 'fixed'; behaviour fields set in config['behaviour'] override the preset's.
    """
    m, alg = _model_fields(config), config["alg"]
    beh = preset_values(config.get("preset", "fixed"))
    beh.update({k: v for k, v in (config.get("behaviour") or {}).items() if v is not None})
    flow_wm = config.get("world_model", "mlp") == "flow"
    arch = Architecture(obs_dim=MAX_OBS_DIM, action_dim=MAX_ACTION_DIM, latent_dim=m["latent_dim"],
                        task_dim=m["task_dim"], num_bins=m["num_bins"], encoder_units=m["encoder_units"],
                        wm_units=m["flow_units"] if flow_wm else m["units"], actor_units=m["actor_units"],
                        critic_units=m["critic_units"], num_critics=m["num_critics"],
                        wm_kind="flow" if flow_wm else "mlp", wm_integrator=m.get("wm_integrator", "heun"),
                        wm_substeps=m.get("wm_substeps", 4), actor_kind=config.get("actor", "gaussian"),
                        actor_integrator=m.get("actor_integrator", "heun"), actor_substeps=m.get("actor_substeps", 2))
    B = int(alg["batch_size"])
    steps, rows = 0, 0
    if config.get("finetune_wm"):
        steps, rows = (int(alg["wm_iterations"]), int(alg["wm_batch_size"])) if beh["wm_updates"] == "iterations" else (1, B)
    return epoch_flops(arch, horizon=int(alg["horizon"]), batch_size=B, critic_iterations=int(alg["critic_iterations"]),
                       critic_batches=int(alg["critic_batches"]), wm_steps=steps, wm_batch_size=rows,
                       teacher_forcing=bool(alg.get("teacher_forcing", False)),
                       train_task_emb=bool(beh["train_task_emb"]),
                       emb_grad=bool(config.get("finetune_wm")) and beh.get("wm_emb_grad") == "accumulate"
                       and not beh["train_task_emb"] and m["task_dim"] > 0)
