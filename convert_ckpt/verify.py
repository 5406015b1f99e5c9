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

import numpy as np

DEFAULTS_48M = dict(gamma=0.99, lam=0.95, flow_integrator="heun", flow_substeps=4, actor_min_logstd=-1.427,
                    flow_actor_integrator="heun", flow_actor_substeps=2)


@dataclasses.dataclass
class Result:
    name: str
    err: float | None  # max abs error (None: could not compute)
    status: str  # 'ok' | 'FAIL' | 'error' | 'skipped'
    note: str = ""


def _pwm():
    try:
        from fmbpo_jax import pwm  # noqa: WPS433 (optional: written by another engineer)

        return pwm
    except Exception as exc:  # pragma: no cover - depends on the state of the tree
        return exc


def _reference_reward_loss() -> str:
    """The reward_loss value of the `reference` preset (B1: MSE of every logit to the raw reward)."""
    try:
        from fmbpo_jax.presets import preset_values

        return str(preset_values("reference")["reward_loss"])
    except Exception:  # pragma: no cover - presets module not there
        return "mse_bins"


def compute(conv, golden: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None) -> tuple[dict[str, Callable], list[Result]]:
    """name -> thunk computing that output, for every golden output this checkpoint can produce; plus skip notes."""
    import jax.numpy as jnp

    from fmbpo_jax import actors, critic, nets
    from fmbpo_jax import world_model as wm

    c = dict(DEFAULTS_48M, **{k: v for k, v in (config or {}).items() if v is not None})
    g = golden
    todo: dict[str, Callable] = {}
    skipped: list[Result] = []

    def has(*names):
        return all(n in g for n in names)

    def add(name, fn, *inputs):
        if name in g and has(*inputs):
            todo[name] = fn

    pwm = _pwm()

    def need_pwm(names, attr):
        present = [n for n in names if n in g]
        if not present:
            return False
        if isinstance(pwm, Exception) or not hasattr(pwm, attr):
            why = f"fmbpo_jax.pwm.{attr} is not available ({pwm!r})" if isinstance(pwm, Exception) else f"fmbpo_jax.pwm has no {attr}"
            skipped.extend(Result(n, None, "skipped", why) for n in present)
            return False
        return True

    if conv.wm is not None:
        cfg, wp = conv.wm_cfg, conv.wm
        if cfg.kind == "mlp":
            z = lambda: g["enc_z"] if "enc_z" in g else wm.encode(cfg, wp, g["obs"], g["task_ids"])  # noqa: E731
            add("enc_z", lambda: wm.encode(cfg, wp, g["obs"], g["task_ids"]), "obs", "task_ids")
            add("enc_z_int_task", lambda: wm.encode(cfg, wp, g["obs_task1"], 1), "obs_task1")
            add("mlp_next_z", lambda: wm.next_latent(cfg, wp, z(), g["act"], g["task_ids"]), "act", "task_ids", "obs")
            logits = lambda: wm.reward_logits(cfg, wp, z(), g["act"], g["task_ids"])  # noqa: E731
            add("mlp_reward_logits", logits, "act", "task_ids", "obs")
            add("mlp_reward_almost_two_hot_inv", lambda: wm.reward_value(cfg, logits(), False), "act", "task_ids", "obs")
            add("mlp_reward_two_hot_inv", lambda: wm.reward_value(cfg, logits(), True), "act", "task_ids", "obs")
            if cfg.task_dim > 0:
                used = lambda: np.unique(np.concatenate([np.asarray(g["task_ids"]).reshape(-1)] + ([np.array([1])] if "obs_task1" in g else [])))  # noqa: E731
                add("task_emb_weight_after_renorm", lambda: nets.renormed_table(wp["_task_emb"]["weight"], used()), "task_ids")
            names = ["wml_total_loss", "wml_dyn_loss", "wml_rew_loss"]
            if has("wml_obs", "wml_act", "wml_rew", "wml_task") and need_pwm(names, "wm_loss"):
                def wml():
                    total, aux = pwm.wm_loss(cfg, wp, g["wml_obs"], g["wml_act"], g["wml_rew"], g["wml_task"], None,
                                             gamma=c["gamma"], reward_loss=_reference_reward_loss())
                    return {"wml_total_loss": total, "wml_dyn_loss": aux["dynamics_loss"], "wml_rew_loss": aux["reward_loss"]}

                for n in names:
                    add(n, (lambda n=n: wml()[n]))
        else:
            fcfg = dataclasses.replace(cfg, integrator=c["flow_integrator"], substeps=int(c["flow_substeps"]))
            z = lambda: g["flow_enc_z"] if "flow_enc_z" in g else wm.encode(cfg, wp, g["obs"], g["task_ids"])  # noqa: E731
            add("flow_enc_z", lambda: wm.encode(cfg, wp, g["obs"], g["task_ids"]), "obs", "task_ids")
            add("flow_enc_z2", lambda: wm.encode(cfg, wp, g["obs2"], g["task_ids"]), "obs2", "task_ids")
            add("flow_velocity", lambda: wm.velocity(cfg, wp, z(), g["act"], g["tau"], g["task_ids"]), "act", "tau", "task_ids", "obs")
            for name, integ, k in (("flow_next_heun4", "heun", 4), ("flow_next_euler2", "euler", 2), ("flow_next_default", "heun", 1)):
                add(name, (lambda integ=integ, k=k: wm.next_latent(dataclasses.replace(cfg, integrator=integ, substeps=k), wp, z(),
                                                                   g["act"], g["task_ids"])), "act", "task_ids", "obs")
            logits = lambda: wm.reward_logits(cfg, wp, z(), g["act"], g["task_ids"])  # noqa: E731
            add("flow_reward_logits", logits, "act", "task_ids", "obs")
            add("flow_reward_almost_two_hot_inv", lambda: wm.reward_value(cfg, logits(), False), "act", "task_ids", "obs")
            add("flow_reward_two_hot_inv", lambda: wm.reward_value(cfg, logits(), True), "act", "task_ids", "obs")
            z2 = lambda: g["flow_enc_z2"] if "flow_enc_z2" in g else wm.encode(cfg, wp, g["obs2"], g["task_ids"])  # noqa: E731
            add("fm_loss_uniform", lambda: wm.flow_matching_loss(cfg, wp, z(), z2(), g["act"], g["fm_tau_uniform"], g["task_ids"],
                                                                 c["gamma"] ** 2), "fm_tau_uniform", "act", "task_ids", "obs", "obs2")
            add("fm_loss_midpoint", lambda: wm.flow_matching_loss(cfg, wp, z(), z2(), g["act"], jnp.full((g["act"].shape[0], 1), 0.5),
                                                                  g["task_ids"], 1.0), "act", "task_ids", "obs", "obs2")
            names = ["flowwml_total_loss", "flowwml_dyn_loss", "flowwml_rew_loss"]
            if has("wml_obs", "wml_act", "wml_rew", "wml_task", "flowwml_taus") and need_pwm(names, "wm_loss"):
                def fwml():
                    total, aux = pwm.wm_loss(fcfg, wp, g["wml_obs"], g["wml_act"], g["wml_rew"], g["wml_task"], None,
                                             gamma=c["gamma"], reward_loss=_reference_reward_loss(), tau_sampling="uniform",
                                             taus=g["flowwml_taus"])
                    return {"flowwml_total_loss": total, "flowwml_dyn_loss": aux["dynamics_loss"], "flowwml_rew_loss": aux["reward_loss"]}

                for n in names:
                    add(n, (lambda n=n: fwml()[n]))

    latent = g.get("enc_z")
    if latent is None and conv.wm is not None and conv.wm_cfg.kind == "mlp" and has("obs", "task_ids"):
        latent = np.asarray(wm.encode(conv.wm_cfg, conv.wm, g["obs"], g["task_ids"]))

    if conv.actor is not None and latent is not None:
        acfg, ap = conv.actor_cfg, conv.actor
        if acfg.kind == "gaussian":
            acfg = dataclasses.replace(acfg, min_logstd=float(c["actor_min_logstd"]))
            mu = lambda: actors.action(acfg, ap, latent, None, deterministic=True)  # noqa: E731
            std = lambda: jnp.exp(actors.clamped_logstd(acfg, ap))  # noqa: E731
            add("actor_logstd_raw", lambda: ap["logstd"])
            add("actor_mu", mu)
            add("actor_det_action_tanh", lambda: jnp.tanh(mu()))
            add("actor_logstd_clamped", lambda: actors.clamped_logstd(acfg, ap))
            add("actor_std", std)
            add("actor_sample", lambda: mu() + g["actor_sample_eps"] * std(), "actor_sample_eps")
            add("actor_log_probs_of_sample", lambda: actors.gaussian_log_prob(acfg, actors.project_logstd(acfg, ap), latent,
                                                                              g["actor_sample"]), "actor_sample")
        else:
            acfg = dataclasses.replace(acfg, integrator=c["flow_actor_integrator"], substeps=int(c["flow_actor_substeps"]))
            add("flow_actor_init_logstd_raw", lambda: ap["init_logstd"])
            add("flow_actor_det_action", lambda: actors.action(acfg, ap, latent, None, deterministic=True))
            add("flow_actor_init_logstd_clamped", lambda: actors.clamped_logstd(acfg, ap))
            add("flow_actor_z0", lambda: g["flow_actor_noise"] * jnp.exp(actors.clamped_logstd(acfg, ap)), "flow_actor_noise")
            add("flow_actor_action_from_z0", lambda: actors.flow_integrate(acfg, ap, g["flow_actor_z0"], latent), "flow_actor_z0")
            add("flow_actor_action_from_z0_substeps4", lambda: actors.flow_integrate(acfg, ap, g["flow_actor_z0"], latent, substeps=4),
                "flow_actor_z0")

    if conv.critic is not None and latent is not None:
        ccfg, cp = conv.critic_cfg, conv.critic
        add("critic_values", lambda: critic.values(ccfg, cp, latent))
        add("critic_min", lambda: critic.min_value(ccfg, cp, latent))
        names = ["td_target_values_td_lambda", "td_target_values_one_step"]
        if has("td_rew_buf", "td_next_values", "td_done_mask") and need_pwm(names, "td_targets"):
            args = lambda: (g["td_rew_buf"], g["td_next_values"], g["td_done_mask"], c["gamma"], c["lam"])  # noqa: E731
            add("td_target_values_td_lambda", lambda: pwm.td_targets(*args(), method="td-lambda"))
            add("td_target_values_one_step", lambda: pwm.td_targets(*args(), method="one-step"))
    return todo, skipped


def verify(conv, golden: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None, atol: float = 1e-5) -> list[Result]:
    """Every output this checkpoint can produce vs the golden arrays (float32, highest matmul precision)."""
    import jax

    todo, results = compute(conv, golden, config)
    with jax.default_matmul_precision("highest"):
        for name, fn in todo.items():
            want = np.asarray(golden[name])
            try:
                got = np.asarray(fn())
            except Exception as exc:  # report, do not crash: one bad output must not hide the others
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
