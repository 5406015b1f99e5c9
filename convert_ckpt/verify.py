"""Recompute the golden outputs a checkpoint's modules can produce and report the max abs error of each.

The golden .npz follows tests/fixtures/README.md (array names and input conventions). Which outputs are
checked depends on what the checkpoint holds:

  MLP world model  enc_z, enc_z_int_task, mlp_next_z, mlp_reward_logits, mlp_reward_(almost_)two_hot_inv,
                   task_emb_weight_after_renorm, wml_total/dyn/rew_loss (needs fmbpo_jax.pwm.wm_loss)
  flow world model flow_enc_z, flow_enc_z2, flow_velocity, flow_next_heun4/euler2/default, flow_reward_*,
                   fm_loss_uniform, fm_loss_midpoint, flowwml_* (pwm.wm_loss with flowwml_taus)
  Gaussian actor   actor_logstd_raw, actor_mu, actor_det_action_tanh, actor_logstd_clamped, actor_std,
                   actor_sample, actor_log_probs_of_sample
  flow actor       flow_actor_init_logstd_raw, flow_actor_det_action, flow_actor_init_logstd_clamped,
                   flow_actor_z0, flow_actor_action_from_z0(_substeps4)
  critic           critic_values, critic_min, td_target_values_td_lambda/one_step (pwm.td_targets)

Heads, actor and critic take the stored golden latents as input (enc_z, flow_enc_z), so errors do not compound.
Facts shapes cannot tell come from the config (config_small.json layout), else the 48M defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fmbpo_jax import actors, critic, nets, pwm
from fmbpo_jax import world_model as wm
from fmbpo_jax.presets import preset_values

DEFAULTS_48M = dict(gamma=0.99, lam=0.95, flow_integrator="heun", flow_substeps=4, actor_min_logstd=-1.427,
                    flow_actor_integrator="heun", flow_actor_substeps=2)


@dataclasses.dataclass
class Result:
    name: str
    err: float | None  # max abs error (None: could not compute)
    status: str  # 'ok' | 'FAIL' | 'error' | 'skipped'
    note: str = ""


def _reference_reward_loss() -> str:
    """The reward_loss value of the `reference` preset (B1: MSE of every logit to the raw reward)."""
    return str(preset_values("reference")["reward_loss"])


class _Outputs:
    """The golden outputs a checkpoint can produce: name -> thunk(params), and notes on those skipped."""

    def __init__(self, golden: Mapping[str, np.ndarray]):
        self.g = golden
        self.todo: dict[str, Callable] = {}
        self.skipped: list[Result] = []

    def has(self, *names) -> bool:
        return all(n in self.g for n in names)

    def add(self, name, fn, *inputs) -> None:
        if name in self.g and self.has(*inputs):
            self.todo[name] = fn

    def need_pwm(self, names, attr) -> bool:
        """Whether any of `names` is wanted and fmbpo_jax.pwm has `attr` (otherwise they are noted as skipped)."""
        present = [n for n in names if n in self.g]
        if not present:
            return False
        if not hasattr(pwm, attr):
            self.skipped.extend(Result(n, None, "skipped", f"fmbpo_jax.pwm has no {attr}") for n in present)
            return False
        return True


def _mlp_wm_outputs(o: _Outputs, cfg, c: dict) -> None:
    g = o.g
    W = lambda P: P["world_model"]  # noqa: E731
    task, act = g.get("task_ids"), g.get("act")
    z = (lambda P: g["enc_z"]) if "enc_z" in g else (lambda P: wm.encode(cfg, W(P), g["obs"], task))  # noqa: E731
    o.add("enc_z", lambda P: wm.encode(cfg, W(P), g["obs"], task), "obs", "task_ids")
    o.add("enc_z_int_task", lambda P: wm.encode(cfg, W(P), g["obs_task1"], 1), "obs_task1")
    o.add("mlp_next_z", lambda P: wm.next_latent(cfg, W(P), z(P), act, task), "act", "task_ids", "obs")
    logits = lambda P: wm.reward_logits(cfg, W(P), z(P), act, task)  # noqa: E731
    o.add("mlp_reward_logits", logits, "act", "task_ids", "obs")
    o.add("mlp_reward_almost_two_hot_inv", lambda P: wm.reward_value(cfg, logits(P), False), "act", "task_ids", "obs")
    o.add("mlp_reward_two_hot_inv", lambda P: wm.reward_value(cfg, logits(P), True), "act", "task_ids", "obs")
    if cfg.task_dim > 0 and "task_ids" in g:
        used = np.unique(np.concatenate([np.asarray(task).reshape(-1)] + ([np.array([1])] if "obs_task1" in g else [])))
        o.add("task_emb_weight_after_renorm", lambda P: nets.renormed_table(W(P)["_task_emb"]["weight"], used))
    names = ["wml_total_loss", "wml_dyn_loss", "wml_rew_loss"]
    if o.has("wml_obs", "wml_act", "wml_rew", "wml_task") and o.need_pwm(names, "wm_loss"):
        def wml(P, i):
            total, aux = pwm.wm_loss(cfg, W(P), g["wml_obs"], g["wml_act"], g["wml_rew"], g["wml_task"], None,
                                     gamma=c["gamma"], reward_loss=_reference_reward_loss())
            return (total, aux["dynamics_loss"], aux["reward_loss"])[i]

        for i, n in enumerate(names):
            o.add(n, (lambda P, i=i: wml(P, i)))


def _flow_wm_outputs(o: _Outputs, cfg, c: dict) -> None:
    g = o.g
    W = lambda P: P["world_model"]  # noqa: E731
    task, act = g.get("task_ids"), g.get("act")
    fcfg = dataclasses.replace(cfg, integrator=c["flow_integrator"], substeps=int(c["flow_substeps"]))
    z = (lambda P: g["flow_enc_z"]) if "flow_enc_z" in g else (lambda P: wm.encode(cfg, W(P), g["obs"], task))  # noqa: E731
    z2 = (lambda P: g["flow_enc_z2"]) if "flow_enc_z2" in g else (lambda P: wm.encode(cfg, W(P), g["obs2"], task))  # noqa: E731
    o.add("flow_enc_z", lambda P: wm.encode(cfg, W(P), g["obs"], task), "obs", "task_ids")
    o.add("flow_enc_z2", lambda P: wm.encode(cfg, W(P), g["obs2"], task), "obs2", "task_ids")
    o.add("flow_velocity", lambda P: wm.velocity(cfg, W(P), z(P), act, g["tau"], task), "act", "tau", "task_ids", "obs")
    for name, integ, k in (("flow_next_heun4", "heun", 4), ("flow_next_euler2", "euler", 2), ("flow_next_default", "heun", 1)):
        kcfg = dataclasses.replace(cfg, integrator=integ, substeps=k)
        o.add(name, (lambda P, kcfg=kcfg: wm.next_latent(kcfg, W(P), z(P), act, task)), "act", "task_ids", "obs")
    logits = lambda P: wm.reward_logits(cfg, W(P), z(P), act, task)  # noqa: E731
    o.add("flow_reward_logits", logits, "act", "task_ids", "obs")
    o.add("flow_reward_almost_two_hot_inv", lambda P: wm.reward_value(cfg, logits(P), False), "act", "task_ids", "obs")
    o.add("flow_reward_two_hot_inv", lambda P: wm.reward_value(cfg, logits(P), True), "act", "task_ids", "obs")
    o.add("fm_loss_uniform", lambda P: wm.flow_matching_loss(cfg, W(P), z(P), z2(P), act, g["fm_tau_uniform"], task, c["gamma"] ** 2),
          "fm_tau_uniform", "act", "task_ids", "obs", "obs2")
    o.add("fm_loss_midpoint", lambda P: wm.flow_matching_loss(cfg, W(P), z(P), z2(P), act, jnp.full((act.shape[0], 1), 0.5), task, 1.0),
          "act", "task_ids", "obs", "obs2")
    names = ["flowwml_total_loss", "flowwml_dyn_loss", "flowwml_rew_loss"]
    if o.has("wml_obs", "wml_act", "wml_rew", "wml_task", "flowwml_taus") and o.need_pwm(names, "wm_loss"):
        def fwml(P, i):
            total, aux = pwm.wm_loss(fcfg, W(P), g["wml_obs"], g["wml_act"], g["wml_rew"], g["wml_task"], None,
                                     gamma=c["gamma"], reward_loss=_reference_reward_loss(), tau_sampling="uniform",
                                     taus=g["flowwml_taus"])
            return (total, aux["dynamics_loss"], aux["reward_loss"])[i]

        for i, n in enumerate(names):
            o.add(n, (lambda P, i=i: fwml(P, i)))


def _actor_outputs(o: _Outputs, acfg, c: dict, latent: Callable) -> None:
    g = o.g
    A = lambda P: P["actor"]  # noqa: E731
    if acfg.kind == "gaussian":
        acfg = dataclasses.replace(acfg, min_logstd=float(c["actor_min_logstd"]))
        mu = lambda P: actors.action(acfg, A(P), latent(P), None, deterministic=True)  # noqa: E731
        std = lambda P: jnp.exp(actors.clamped_logstd(acfg, A(P)))  # noqa: E731
        o.add("actor_logstd_raw", lambda P: A(P)["logstd"])
        o.add("actor_mu", mu)
        o.add("actor_det_action_tanh", lambda P: jnp.tanh(mu(P)))
        o.add("actor_logstd_clamped", lambda P: actors.clamped_logstd(acfg, A(P)))
        o.add("actor_std", std)
        o.add("actor_sample", lambda P: mu(P) + g["actor_sample_eps"] * std(P), "actor_sample_eps")
        o.add("actor_log_probs_of_sample", lambda P: actors.gaussian_log_prob(acfg, actors.project_logstd(acfg, A(P)), latent(P),
                                                                              g["actor_sample"]), "actor_sample")
        return
    acfg = dataclasses.replace(acfg, integrator=c["flow_actor_integrator"], substeps=int(c["flow_actor_substeps"]))
    o.add("flow_actor_init_logstd_raw", lambda P: A(P)["init_logstd"])
    o.add("flow_actor_det_action", lambda P: actors.action(acfg, A(P), latent(P), None, deterministic=True))
    o.add("flow_actor_init_logstd_clamped", lambda P: actors.clamped_logstd(acfg, A(P)))
    o.add("flow_actor_z0", lambda P: g["flow_actor_noise"] * jnp.exp(actors.clamped_logstd(acfg, A(P))), "flow_actor_noise")
    o.add("flow_actor_action_from_z0", lambda P: actors.flow_integrate(acfg, A(P), g["flow_actor_z0"], latent(P)), "flow_actor_z0")
    o.add("flow_actor_action_from_z0_substeps4", lambda P: actors.flow_integrate(acfg, A(P), g["flow_actor_z0"], latent(P), substeps=4),
          "flow_actor_z0")


def _critic_outputs(o: _Outputs, ccfg, c: dict, latent: Callable) -> None:
    g = o.g
    o.add("critic_values", lambda P: critic.values(ccfg, P["critic"], latent(P)))
    o.add("critic_min", lambda P: critic.min_value(ccfg, P["critic"], latent(P)))
    names = ["td_target_values_td_lambda", "td_target_values_one_step"]
    if o.has("td_rew_buf", "td_next_values", "td_done_mask") and o.need_pwm(names, "td_targets"):
        args = (g["td_rew_buf"], g["td_next_values"], g["td_done_mask"], c["gamma"], c["lam"])
        o.add("td_target_values_td_lambda", lambda P: pwm.td_targets(*args, method="td-lambda"))
        o.add("td_target_values_one_step", lambda P: pwm.td_targets(*args, method="one-step"))


def compute(conv, golden: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None) -> tuple[dict[str, Callable], list[Result]]:
    """name -> thunk computing that output, for every golden output this checkpoint can produce; plus skip notes."""
    c = dict(DEFAULTS_48M, **{k: v for k, v in (config or {}).items() if v is not None})
    g = golden
    o = _Outputs(golden)
    if conv.wm is not None:
        (_mlp_wm_outputs if conv.wm_cfg.kind == "mlp" else _flow_wm_outputs)(o, conv.wm_cfg, c)
    # latent fed to the actor and the critic: the stored golden one (README), else this checkpoint's MLP WM encoding
    latent = None
    if "enc_z" in g:
        latent = lambda P: g["enc_z"]  # noqa: E731
    elif conv.wm is not None and conv.wm_cfg.kind == "mlp" and o.has("obs", "task_ids"):
        latent = lambda P: wm.encode(conv.wm_cfg, P["world_model"], g["obs"], g["task_ids"])  # noqa: E731
    if conv.actor is not None and latent is not None:
        _actor_outputs(o, conv.actor_cfg, c, latent)
    if conv.critic is not None and latent is not None:
        _critic_outputs(o, conv.critic_cfg, c, latent)
    return o.todo, o.skipped


def _evaluate(todo: dict[str, Callable], params) -> dict[str, tuple[np.ndarray | None, Exception | None]]:
    """All outputs in one jitted program (one compile; params are arguments, not constants); if that fails,
    output by output (eagerly), so one broken output is reported without hiding the others."""
    try:
        outs = jax.jit(lambda P: {n: fn(P) for n, fn in todo.items()})(params)
        return {n: (np.asarray(v), None) for n, v in outs.items()}
    except Exception:
        pass
    res = {}
    for n, fn in todo.items():
        try:
            res[n] = (np.asarray(fn(params)), None)
        except Exception as exc:  # report, do not crash
            res[n] = (None, exc)
    return res


def verify(conv, golden: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None, atol: float = 1e-5) -> list[Result]:
    """Every output this checkpoint can produce vs the golden arrays (float32, highest matmul precision)."""
    golden = {k: np.asarray(v) for k, v in golden.items()}
    todo, results = compute(conv, golden, config)
    params = {k: v for k, v in (("world_model", conv.wm), ("actor", conv.actor), ("critic", conv.critic)) if v is not None}
    with jax.default_matmul_precision("highest"):
        outs = _evaluate(todo, params)
    for name in todo:
        want = golden[name]
        got, exc = outs[name]
        if exc is not None:
            results.append(Result(name, None, "error", f"{type(exc).__name__}: {exc}"))
            continue
        if got.shape != want.shape:
            results.append(Result(name, None, "error", f"shape {got.shape} != golden {want.shape}"))
            continue
        err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
        ok = np.isfinite(err) and err <= atol
        results.append(Result(name, err, "ok" if ok else "FAIL"))
    return results


def format_results(results: list[Result], atol: float) -> str:
    lines = [f"{'output':42s} {'max abs err':>12s}  status (atol {atol:g})"]
    for r in results:
        err = "-" if r.err is None else f"{r.err:.3e}"
        lines.append(f"{r.name:42s} {err:>12s}  {r.status}{('  ' + r.note) if r.note else ''}")
    checked = [r for r in results if r.status != "skipped"]
    bad = [r for r in checked if r.status != "ok"]
    lines.append(f"{len(checked)} outputs checked, {len(bad)} failed, {len(results) - len(checked)} skipped")
    return "\n".join(lines)


def exit_code(results: list[Result]) -> int:
    checked = [r for r in results if r.status != "skipped"]
    if not checked:
        return 3
    return 0 if all(r.status == "ok" for r in checked) else 1
