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
        cfg = conv.wm_cfg
        W = lambda P: P["world_model"]  # noqa: E731
        task, act = g.get("task_ids"), g.get("act")
        if cfg.kind == "mlp":
            z = (lambda P: g["enc_z"]) if "enc_z" in g else (lambda P: wm.encode(cfg, W(P), g["obs"], task))  # noqa: E731
            add("enc_z", lambda P: wm.encode(cfg, W(P), g["obs"], task), "obs", "task_ids")
            add("enc_z_int_task", lambda P: wm.encode(cfg, W(P), g["obs_task1"], 1), "obs_task1")
            add("mlp_next_z", lambda P: wm.next_latent(cfg, W(P), z(P), act, task), "act", "task_ids", "obs")
            logits = lambda P: wm.reward_logits(cfg, W(P), z(P), act, task)  # noqa: E731
            add("mlp_reward_logits", logits, "act", "task_ids", "obs")
            add("mlp_reward_almost_two_hot_inv", lambda P: wm.reward_value(cfg, logits(P), False), "act", "task_ids", "obs")
            add("mlp_reward_two_hot_inv", lambda P: wm.reward_value(cfg, logits(P), True), "act", "task_ids", "obs")
            if cfg.task_dim > 0 and "task_ids" in g:
                used = np.unique(np.concatenate([np.asarray(task).reshape(-1)] + ([np.array([1])] if "obs_task1" in g else [])))
                add("task_emb_weight_after_renorm", lambda P: nets.renormed_table(W(P)["_task_emb"]["weight"], used))
            names = ["wml_total_loss", "wml_dyn_loss", "wml_rew_loss"]
            if has("wml_obs", "wml_act", "wml_rew", "wml_task") and need_pwm(names, "wm_loss"):
                def wml(P, i):
                    total, aux = pwm.wm_loss(cfg, W(P), g["wml_obs"], g["wml_act"], g["wml_rew"], g["wml_task"], None,
                                             gamma=c["gamma"], reward_loss=_reference_reward_loss())
                    return (total, aux["dynamics_loss"], aux["reward_loss"])[i]

                for i, n in enumerate(names):
                    add(n, (lambda P, i=i: wml(P, i)))
        else:
            fcfg = dataclasses.replace(cfg, integrator=c["flow_integrator"], substeps=int(c["flow_substeps"]))
            z = (lambda P: g["flow_enc_z"]) if "flow_enc_z" in g else (lambda P: wm.encode(cfg, W(P), g["obs"], task))  # noqa: E731
            z2 = (lambda P: g["flow_enc_z2"]) if "flow_enc_z2" in g else (lambda P: wm.encode(cfg, W(P), g["obs2"], task))  # noqa: E731
            add("flow_enc_z", lambda P: wm.encode(cfg, W(P), g["obs"], task), "obs", "task_ids")
            add("flow_enc_z2", lambda P: wm.encode(cfg, W(P), g["obs2"], task), "obs2", "task_ids")
            add("flow_velocity", lambda P: wm.velocity(cfg, W(P), z(P), act, g["tau"], task), "act", "tau", "task_ids", "obs")
            for name, integ, k in (("flow_next_heun4", "heun", 4), ("flow_next_euler2", "euler", 2), ("flow_next_default", "heun", 1)):
                kcfg = dataclasses.replace(cfg, integrator=integ, substeps=k)
                add(name, (lambda P, kcfg=kcfg: wm.next_latent(kcfg, W(P), z(P), act, task)), "act", "task_ids", "obs")
            logits = lambda P: wm.reward_logits(cfg, W(P), z(P), act, task)  # noqa: E731
            add("flow_reward_logits", logits, "act", "task_ids", "obs")
            add("flow_reward_almost_two_hot_inv", lambda P: wm.reward_value(cfg, logits(P), False), "act", "task_ids", "obs")
            add("flow_reward_two_hot_inv", lambda P: wm.reward_value(cfg, logits(P), True), "act", "task_ids", "obs")
            add("fm_loss_uniform", lambda P: wm.flow_matching_loss(cfg, W(P), z(P), z2(P), act, g["fm_tau_uniform"], task, c["gamma"] ** 2),
                "fm_tau_uniform", "act", "task_ids", "obs", "obs2")
            add("fm_loss_midpoint", lambda P: wm.flow_matching_loss(cfg, W(P), z(P), z2(P), act, jnp.full((act.shape[0], 1), 0.5), task, 1.0),
                "act", "task_ids", "obs", "obs2")
            names = ["flowwml_total_loss", "flowwml_dyn_loss", "flowwml_rew_loss"]
            if has("wml_obs", "wml_act", "wml_rew", "wml_task", "flowwml_taus") and need_pwm(names, "wm_loss"):
                def fwml(P, i):
                    total, aux = pwm.wm_loss(fcfg, W(P), g["wml_obs"], g["wml_act"], g["wml_rew"], g["wml_task"], None,
                                             gamma=c["gamma"], reward_loss=_reference_reward_loss(), tau_sampling="uniform",
                                             taus=g["flowwml_taus"])
                    return (total, aux["dynamics_loss"], aux["reward_loss"])[i]

                for i, n in enumerate(names):
                    add(n, (lambda P, i=i: fwml(P, i)))

    # latent fed to the actor and the critic: the stored golden one (README), else this checkpoint's MLP WM encoding
    latent = None
    if "enc_z" in g:
        latent = lambda P: g["enc_z"]  # noqa: E731
    elif conv.wm is not None and conv.wm_cfg.kind == "mlp" and has("obs", "task_ids"):
        latent = lambda P: wm.encode(conv.wm_cfg, P["world_model"], g["obs"], g["task_ids"])  # noqa: E731

    if conv.actor is not None and latent is not None:
        acfg = conv.actor_cfg
        A = lambda P: P["actor"]  # noqa: E731
        if acfg.kind == "gaussian":
            acfg = dataclasses.replace(acfg, min_logstd=float(c["actor_min_logstd"]))
            mu = lambda P: actors.action(acfg, A(P), latent(P), None, deterministic=True)  # noqa: E731
            std = lambda P: jnp.exp(actors.clamped_logstd(acfg, A(P)))  # noqa: E731
            add("actor_logstd_raw", lambda P: A(P)["logstd"])
            add("actor_mu", mu)
            add("actor_det_action_tanh", lambda P: jnp.tanh(mu(P)))
            add("actor_logstd_clamped", lambda P: actors.clamped_logstd(acfg, A(P)))
            add("actor_std", std)
            add("actor_sample", lambda P: mu(P) + g["actor_sample_eps"] * std(P), "actor_sample_eps")
            add("actor_log_probs_of_sample", lambda P: actors.gaussian_log_prob(acfg, actors.project_logstd(acfg, A(P)), latent(P),
                                                                                g["actor_sample"]), "actor_sample")
        else:
            acfg = dataclasses.replace(acfg, integrator=c["flow_actor_integrator"], substeps=int(c["flow_actor_substeps"]))
            add("flow_actor_init_logstd_raw", lambda P: A(P)["init_logstd"])
            add("flow_actor_det_action", lambda P: actors.action(acfg, A(P), latent(P), None, deterministic=True))
            add("flow_actor_init_logstd_clamped", lambda P: actors.clamped_logstd(acfg, A(P)))
            add("flow_actor_z0", lambda P: g["flow_actor_noise"] * jnp.exp(actors.clamped_logstd(acfg, A(P))), "flow_actor_noise")
            add("flow_actor_action_from_z0", lambda P: actors.flow_integrate(acfg, A(P), g["flow_actor_z0"], latent(P)), "flow_actor_z0")
            add("flow_actor_action_from_z0_substeps4", lambda P: actors.flow_integrate(acfg, A(P), g["flow_actor_z0"], latent(P), substeps=4),
                "flow_actor_z0")

    if conv.critic is not None and latent is not None:
        ccfg = conv.critic_cfg
        add("critic_values", lambda P: critic.values(ccfg, P["critic"], latent(P)))
        add("critic_min", lambda P: critic.min_value(ccfg, P["critic"], latent(P)))
        names = ["td_target_values_td_lambda", "td_target_values_one_step"]
        if has("td_rew_buf", "td_next_values", "td_done_mask") and need_pwm(names, "td_targets"):
            args = (g["td_rew_buf"], g["td_next_values"], g["td_done_mask"], c["gamma"], c["lam"])
            add("td_target_values_td_lambda", lambda P: pwm.td_targets(*args, method="td-lambda"))
            add("td_target_values_one_step", lambda P: pwm.td_targets(*args, method="one-step"))
    return todo, skipped


def _evaluate(todo: dict[str, Callable], params) -> dict[str, tuple[np.ndarray | None, Exception | None]]:
    """All outputs in one jitted program (one compile; params are arguments, not constants); if that fails,
    output by output (eagerly), so one broken output is reported without hiding the others."""
    import jax

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
    import jax

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
