"""Whole-update parity: replay the reference's recorded `PWM.update()` calls with fmbpo_jax and compare every array.

A golden set is a directory (tests/fixtures is one) holding

  config_small.json                the small architecture (sizes, tasks, horizon, batch)
  wm_small_native.pt               'world_model' (MLP WM), 'actor' (Gaussian), 'critic' (ensemble)
  wm_small_native_flow.pt          'world_model' (flow WM)
  actor_flow_small.pt              'actor' (flow ODE actor)
  golden_update_small.npz / .json  inputs, the reference's random draws, and its outputs for each case

Every setting comes from golden_update_small.json: the cases (world model, actor, fine-tuning), the number of
consecutive updates, and under `alg` gamma, lam, the three learning rates, the Adam betas and eps, the three clip
norms, critic_iterations x critic_batches, the integrators and substeps of the WM and of the flow actor, tau
sampling, ret_rms and the critic method. Behaviours are the `reference` preset's. The learning rates are constant:
the reference's update() does not schedule them.

Per case and update the outputs compared are the metrics, the rollout buffers (obs_buf, rew_buf, next_values,
target_values, done_mask), ret_rms, the clipped actor gradient, and at the end every parameter's change, all in
torch names and layout. float64 (jax_enable_x64, everything cast) must match within 1e-8 absolute + 1e-8 relative;
float32 (highest matmul precision) within max(10 x the reference's own float32 deviation, 1e-6).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert_ckpt.safe_load import safe_torch_load
from convert_ckpt.verify import Result
from fmbpo_jax import nets, presets, pwm
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from convert_ckpt.torch_mapping import (actor_params_from_state_dict, critic_params_from_state_dict, state_dict_from_params,
                                     wm_params_from_state_dict)
from fmbpo_jax.world_model import WMConfig

GOLDEN = "golden_update_small"
WEIGHT_FILES = {"mlp_wm": ("wm_small_native.pt", "world_model"), "gaussian": ("wm_small_native.pt", "actor"),
                "critic": ("wm_small_native.pt", "critic"), "flow_wm": ("wm_small_native_flow.pt", "world_model"),
                "flow": ("actor_flow_small.pt", "actor")}
F64_TOL = 1e-8  # absolute and relative
F32_FLOOR, F32_FACTOR = 1e-6, 10.0


class GoldenSetError(ValueError):
    """The golden directory is missing a file or key, or asks for a setting the port does not have."""


@dataclasses.dataclass(frozen=True)
class GoldenSet:
    root: Path
    meta: dict  # golden_update_small.json
    arrays: dict  # golden_update_small.npz
    weights: dict  # name in WEIGHT_FILES -> torch state_dict

    @property
    def cases(self) -> list[dict]:
        return self.meta["cases"]


def load_set(root: str | Path) -> GoldenSet:
    """Read every file of a golden directory (torch files through the restricted loader: no code runs)."""
    root = Path(root)
    need = [f"{GOLDEN}.json", f"{GOLDEN}.npz", "config_small.json"] + sorted({f for f, _ in WEIGHT_FILES.values()})
    missing = [n for n in need if not (root / n).is_file()]
    if missing:
        raise GoldenSetError(f"{root}: missing {', '.join(missing)}")
    meta = json.loads((root / f"{GOLDEN}.json").read_text())
    for key in ("alg", "cases", "updates"):
        if key not in meta:
            raise GoldenSetError(f"{root / (GOLDEN + '.json')}: no '{key}' key")
    meta.setdefault("config", json.loads((root / "config_small.json").read_text()))
    with np.load(root / f"{GOLDEN}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    files = {name: safe_torch_load(root / name) for name in {f for f, _ in WEIGHT_FILES.values()}}
    weights = {}
    for name, (fname, key) in WEIGHT_FILES.items():
        if key not in files[fname]:
            raise GoldenSetError(f"{root / fname}: no '{key}' entry")
        weights[name] = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in files[fname][key].items()}
    return GoldenSet(root, meta, arrays, weights)


# ------------------------------------------------------------------------------------------ configs


def _alg(gset: GoldenSet, key: str):
    try:
        return gset.meta["alg"][key]
    except KeyError:
        raise GoldenSetError(f"{gset.root / (GOLDEN + '.json')}: alg.{key} is missing") from None


def model_configs(gset: GoldenSet, case: dict) -> tuple[WMConfig, ActorConfig, CriticConfig]:
    """The case's architectures, from config_small.json's sizes and the .json's integrators and substeps."""
    c = gset.meta["config"]
    flow_wm = case["wm"] == "flow"
    wm_cfg = WMConfig(kind=case["wm"], obs_dim=c["obs_dim"], action_dim=c["action_dim"], latent_dim=c["latent_dim"],
                      task_dim=c["task_dim"], num_tasks=len(c["tasks"]), encoder_units=tuple(c["encoder_units"]),
                      units=tuple(c["flow_units"] if flow_wm else c["units"]), simnorm_dim=c["simnorm_dim"],
                      num_bins=c["num_bins"], vmin=c["vmin"], vmax=c["vmax"], velocity_head="simnorm",
                      integrator=_alg(gset, "wm_integrator"), substeps=int(_alg(gset, "wm_substeps")))
    flow_actor = case["actor"] == "flow"
    actor_cfg = ActorConfig(kind=case["actor"], latent_dim=c["latent_dim"], action_dim=c["action_dim"],
                            units=tuple(c["flow_actor_units"] if flow_actor else c["actor_units"]),
                            min_logstd=c["actor_min_logstd"], integrator=_alg(gset, "actor_integrator"),
                            substeps=int(_alg(gset, "actor_substeps")))
    critic_cfg = CriticConfig(latent_dim=c["latent_dim"], units=tuple(c["critic_units"]), num_critics=c["num_critics"])
    return wm_cfg, actor_cfg, critic_cfg


def pwm_config(gset: GoldenSet, case: dict) -> pwm.PWMConfig:
    """The reference preset with every hyper-parameter of the golden .json (constant learning rates)."""
    if not _alg(gset, "detach"):
        raise GoldenSetError("alg.detach=False (actor gradient through its own input) is not implemented")
    if _alg(gset, "critic_method") not in ("td-lambda", "one-step"):
        raise GoldenSetError(f"alg.critic_method={_alg(gset, 'critic_method')!r}: 'td-lambda' or 'one-step' expected")
    w, a, cr = model_configs(gset, case)
    ref = presets.preset_values("reference")
    fields = {f.name for f in dataclasses.fields(pwm.PWMConfig)}
    # offline, the reference's td-lambda has dones = 1 everywhere: both of its methods are one-step targets (B6)
    return pwm.PWMConfig(
        wm=w, actor=a, critic=cr, horizon=int(gset.meta["config"]["horizon"]), gamma=_alg(gset, "gamma"),
        lam=_alg(gset, "lam"), actor_lr=_alg(gset, "actor_lr"), critic_lr=_alg(gset, "critic_lr"),
        model_lr=_alg(gset, "model_lr"), lr_schedule="constant", actor_grad_clip=_alg(gset, "actor_grad_norm"),
        critic_grad_clip=_alg(gset, "critic_grad_norm"), wm_grad_clip=_alg(gset, "wm_grad_norm"),
        critic_iterations=int(_alg(gset, "critic_iterations")), critic_batches=int(_alg(gset, "critic_batches")),
        ret_rms=bool(_alg(gset, "ret_rms")), finetune_wm=bool(case["finetune"]), tau_sampling=_alg(gset, "tau_sampling"),
        actor_betas=tuple(_alg(gset, "betas")), critic_betas=tuple(_alg(gset, "betas")),
        wm_betas=tuple(_alg(gset, "wm_betas")), adam_eps=_alg(gset, "adam_eps"),
        **{k: v for k, v in ref.items() if k in fields})


# ------------------------------------------------------------------------------------------ running


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                                  else jnp.asarray(x), tree)


def initial_params(gset: GoldenSet, case: dict, cfg: pwm.PWMConfig) -> dict:
    """{'world_model', 'actor', 'critic'} params from the set's weight files (float32, our layout)."""
    wm_sd = gset.weights["flow_wm" if case["wm"] == "flow" else "mlp_wm"]
    return {"world_model": wm_params_from_state_dict(wm_sd, cfg.wm),
            "actor": actor_params_from_state_dict(gset.weights[case["actor"]], cfg.actor),
            "critic": critic_params_from_state_dict(gset.weights["critic"], cfg.critic)}


def _batch(gset: GoldenSet, case: dict, u: int, dtype) -> dict:
    a, pre = gset.arrays, f"inputs/batch{u}_"
    draws_at = f"{case['name']}/update{u}/draws/"
    actor_key = draws_at + ("flow_z0" if case["actor"] == "flow" else "gauss_eps")
    if actor_key not in a:
        raise GoldenSetError(f"{gset.root / (GOLDEN + '.npz')}: no {actor_key}")
    draws = {"actor_eps": jnp.asarray(a[actor_key], dtype)}
    if case["finetune"] and case["wm"] == "flow":
        draws["wm_taus"] = jnp.asarray(a[draws_at + "fm_tau"], dtype)
    return {"obs": jnp.asarray(a[pre + "obs"], dtype), "action": jnp.asarray(a[pre + "act"], dtype),
            "reward": jnp.asarray(a[pre + "rew"][..., 0], dtype), "task": jnp.asarray(a[pre + "task"], jnp.int32),
            "draws": draws}


def _update_outputs(case: dict, u: int, metrics: dict, rec: dict, state: dict) -> dict[str, np.ndarray]:
    out = {f"{case['name']}/update{u}/metric/{k}": metrics[k] for k in
           ("actor_loss", "value_loss", "actor_grad_norm", "critic_grad_norm", "actor_stddev")}
    if case["finetune"]:
        out.update({f"{case['name']}/update{u}/metric/{k}": metrics[k] for k in
                    ("wm_loss", "dynamics_loss", "reward_loss", "wm_grad_norm")})
    for k in ("obs_buf", "rew_buf", "next_values", "target_values", "done_mask"):
        out[f"{case['name']}/update{u}/{k}"] = rec[k]
    rms = state.ret_rms
    out.update({f"{case['name']}/update{u}/ret_rms_mean": rms.mean, f"{case['name']}/update{u}/ret_rms_var": rms.var,
                f"{case['name']}/update{u}/ret_rms_count": rms.count})
    for k, v in state_dict_from_params(rec["actor_grad_clipped"], dtype=None).items():
        out[f"{case['name']}/update{u}/actor_grad_clipped/{k}"] = v
    return {k: np.asarray(v) for k, v in out.items()}


def _deltas(case: dict, start: dict, state: dict, frozen_wm, used_tasks: np.ndarray) -> dict[str, np.ndarray]:
    """Each parameter's change over all updates, torch names; the WM's task embedding as PyTorch stores it
    (its looked-up rows renormalised in place by nn.Embedding(max_norm=1))."""
    end = {"actor": state.actor, "critic": state.critic, "world_model": state.wm if case["finetune"] else frozen_wm}
    out = {}
    for module, ensemble in (("actor", False), ("critic", True), ("world_model", False)):
        new = state_dict_from_params(end[module], ensemble=ensemble, dtype=None)
        old = state_dict_from_params(start[module], ensemble=ensemble, dtype=None)
        if module == "world_model":
            table = end[module]["_task_emb"]["weight"]
            new["_task_emb.weight"] = np.asarray(nets.renormed_table(table, used_tasks))
            if not case["finetune"]:
                new, old = {"_task_emb.weight": new["_task_emb.weight"]}, {"_task_emb.weight": old["_task_emb.weight"]}
        out.update({f"{case['name']}/delta/{module}/{k}": np.asarray(new[k]) - np.asarray(old[k]) for k in new})
    return out


def run_case(gset: GoldenSet, case: dict, dtype: str = "float64", **overrides) -> dict[str, np.ndarray]:
    """Replay the case's `updates` consecutive updates from the set's weights; every output array by golden key.

    overrides: PWMConfig fields to change (e.g. a `fixed` behaviour, to show what it changes)."""
    cfg = dataclasses.replace(pwm_config(gset, case), **overrides)
    jdtype = jnp.float64 if dtype == "float64" else jnp.float32
    with jax.enable_x64(dtype == "float64"), jax.default_matmul_precision("highest"):
        start = _cast(initial_params(gset, case, cfg), jdtype)
        state = _cast(pwm.init_state(cfg, jax.random.key(0), wm_params=start["world_model"]), jdtype)
        state = state.replace(actor=start["actor"], critic=start["critic"],
                              actor_opt=pwm._adam(cfg.actor_betas, cfg.adam_eps).init(start["actor"]),
                              critic_opt=pwm._adam(cfg.critic_betas, cfg.adam_eps).init(start["critic"]))
        frozen = None if cfg.finetune_wm else start["world_model"]
        step = jax.jit(lambda s, b, w: pwm.update(cfg, s, b, jax.random.key(0), w, record=True))
        outputs, used = {}, []
        for u in range(int(gset.meta["updates"])):
            batch = _batch(gset, case, u, jdtype)
            used.append(np.asarray(batch["task"]).reshape(-1))
            state, metrics, rec = step(state, batch, frozen)
            outputs.update(_update_outputs(case, u, metrics, rec, state))
        outputs.update(_deltas(case, start, state, frozen, np.unique(np.concatenate(used))))
    return outputs


# ------------------------------------------------------------------------------------------ comparing


def tolerance(gset: GoldenSet, key: str, dtype: str) -> tuple[float, float]:
    """(absolute, relative) tolerance of one golden array for a float64 or float32 port."""
    if dtype == "float64":
        return F64_TOL, F64_TOL
    dev = gset.meta.get("float32_reference_max_abs_dev", {})
    return max(F32_FACTOR * float(dev.get(key, 0.0)), F32_FLOOR), 0.0


def compare_case(gset: GoldenSet, case: dict, outputs: dict[str, np.ndarray], dtype: str) -> list[Result]:
    """One Result per golden output array of the case (inputs and recorded draws are not outputs)."""
    keys = [k for k in gset.meta.get("keys", sorted(gset.arrays)) if k.startswith(case["name"] + "/") and "/draws/" not in k]
    results = []
    for key in keys:
        stored = np.asarray(gset.arrays[key])
        want = stored.astype(np.float64)
        atol, rtol = tolerance(gset, key, dtype)
        got = outputs.get(key)
        if got is None:
            results.append(Result(key, None, "FAIL", "not produced by the port"))
            continue
        # stored as the golden stores it (the deltas are float32(final - loaded) of the float64 run), then compared
        got = np.asarray(got).astype(stored.dtype).astype(np.float64)
        if got.shape != want.shape:
            results.append(Result(key, None, "FAIL", f"shape {got.shape} != golden {want.shape}"))
            continue
        diff = np.abs(got - want)
        err = float(diff.max()) if diff.size else 0.0
        ok = bool(np.all(np.isfinite(got)) and np.all(diff <= atol + rtol * np.abs(want)))
        tol = f"tol {atol:.1e}" + (f" + {rtol:.0e} rel" if rtol else "")
        results.append(Result(key, err, "ok" if ok else "FAIL", tol))
    return results


def verify_update(root: str | Path, dtype: str = "float64", cases: list[str] | None = None) -> list[Result]:
    """Every case of the golden set (or the named ones), replayed and compared."""
    if dtype not in ("float64", "float32"):
        raise GoldenSetError(f"dtype {dtype!r}: 'float64' or 'float32'")
    gset = load_set(root)
    results = []
    for case in gset.cases:
        if cases is None or case["name"] in cases:
            results.extend(compare_case(gset, case, run_case(gset, case, dtype), dtype))
    return results


def format_results(results: list[Result]) -> str:
    lines = [f"{'array':78s} {'max abs err':>12s}  tolerance  status"]
    for r in results:
        err = "-" if r.err is None else f"{r.err:.3e}"
        lines.append(f"{r.name:78s} {err:>12s}  {r.note}  {r.status}")
    bad = sum(r.status != "ok" for r in results)
    lines.append(f"{len(results)} arrays compared, {bad} failed")
    return "\n".join(lines)
