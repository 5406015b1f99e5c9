"""Generate a complete whole-update golden directory (the layout of tests/fixtures) with the independent PyTorch
re-implementation in reference_update_torch.py: random small-set weights, inputs and draws from a seed, the float64
truth of `updates` consecutive PWM.update() calls per case, and the float32 run's deviation from it.

    write_golden_set(out_dir, seed=7, updates=3, config=None, alg=None, cases=None) -> dict (the .json content)

The defaults differ from the shared set on purpose (see GEN_CONFIG / GEN_ALG / GEN_CASES): other sizes, horizon 3 x
batch 5 (15 critic rows in slices of 7, 7 and 1), 3 critic passes, Euler K=3 for the flow WM and the flow actor, a
flow-WM + Gaussian-actor case, asymmetric reward bins, active actor / critic / WM gradient clips.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

import reference_update_torch as ref

GEN_CONFIG = {
    "prefix": "wm_small", "seed": 7, "tasks": ["task0", "task1", "task2"], "obs_dims": [4, 7, 10],
    "action_dims": [2, 3, 3], "obs_dim": 10, "action_dim": 3, "task_dim": 8, "latent_dim": 24, "simnorm_dim": 8,
    "encoder_units": [48, 40], "units": [40, 40], "flow_units": [36, 36], "num_bins": 41, "vmin": -4.0, "vmax": 6.0,
    "embedding_row_norms": [1.3, 0.6, 2.2],
    "actor_units": [40, 24], "actor_min_logstd": -1.427, "actor_logstd_raw": [-1.6, -0.8, -1.43],
    "critic_units": [32, 24], "num_critics": 2,
    "flow_actor_units": [32, 16], "flow_actor_substeps": 3, "flow_actor_integrator": "euler",
    "flow_actor_init_logstd_raw": [-0.9, -11.0, -1.2],
    "horizon": 3, "batch": 5, "gamma": 0.97, "lam": 0.9,
}

GEN_ALG = {
    "gamma": 0.97, "lam": 0.9, "actor_lr": 1e-3, "critic_lr": 7e-4, "model_lr": 5e-4, "betas": [0.8, 0.9],
    "actor_grad_norm": 0.5, "critic_grad_norm": 5.0, "wm_grad_norm": 1.0, "critic_iterations": 3, "critic_batches": 2,
    "wm_substeps": 3, "wm_integrator": "euler", "actor_substeps": 3, "actor_integrator": "euler",
    "tau_sampling": "uniform", "detach": True, "ret_rms": True, "critic_method": "td-lambda",
    "wm_betas": [0.85, 0.995], "adam_eps": 1e-7,
    "wm_optimized": "encoder, dynamics (MLP WM) or velocity (flow WM), reward; not the task embedding",
    "updates_in_order": "WM step (finetune only), actor step, then critic_iterations x critic_batches critic steps",
}

GEN_CASES = [
    {"name": "mlp_gauss_frozen", "wm": "mlp", "actor": "gaussian", "finetune": False},
    {"name": "mlp_gauss_finetune", "wm": "mlp", "actor": "gaussian", "finetune": True},
    {"name": "flow_flow_finetune", "wm": "flow", "actor": "flow", "finetune": True},
    {"name": "flow_gauss_finetune", "wm": "flow", "actor": "gaussian", "finetune": True},
]


# --------------------------------------------------------------------------------------------------------------
# Random weights in the reference's state-dict layouts (float32)


def _linear(rng, fan_in: int, fan_out: int) -> dict:
    return {"weight": rng.normal(0.0, fan_in ** -0.5, (fan_out, fan_in)), "bias": rng.normal(0.0, 0.1, fan_out)}


def _layer_norm(rng, n: int) -> dict:
    return {"weight": 1.0 + rng.normal(0.0, 0.1, n), "bias": rng.normal(0.0, 0.1, n)}


def _wm_mlp(rng, prefix: str, dims: list, last_ln: bool) -> dict:
    """TD-MPC2 mlp(): <prefix>.<i>.{weight,bias,ln.weight,ln.bias}; the last layer has no ln when not last_ln."""
    out = {}
    for i in range(len(dims) - 1):
        out.update({f"{prefix}.{i}.{k}": v for k, v in _linear(rng, dims[i], dims[i + 1]).items()})
        if i < len(dims) - 2 or last_ln:
            out.update({f"{prefix}.{i}.ln.{k}": v for k, v in _layer_norm(rng, dims[i + 1]).items()})
    return out


def _seq_mlp(rng, prefix: str, dims: list) -> dict:
    """nn.Sequential Linear(3i) / Mish / LayerNorm(3i+2) ... Linear(3(n-1))."""
    out = {}
    for i in range(len(dims) - 1):
        out.update({f"{prefix}.{3 * i}.{k}": v for k, v in _linear(rng, dims[i], dims[i + 1]).items()})
        if i < len(dims) - 2:
            out.update({f"{prefix}.{3 * i + 2}.{k}": v for k, v in _layer_norm(rng, dims[i + 1]).items()})
    return out


def _task_embedding(rng, c: dict) -> np.ndarray:
    """Random directions with the configured row norms (rows above 1 exercise the in-place max_norm renorm)."""
    rows = rng.normal(size=(len(c["tasks"]), c["task_dim"]))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True) * np.asarray(c["embedding_row_norms"])[:, None]


def _world_model(rng, c: dict, kind: str) -> dict:
    lat, act, emb, obs = c["latent_dim"], c["action_dim"], c["task_dim"], c["obs_dim"]
    units = c["units"] if kind == "mlp" else c["flow_units"]
    sd = {"_task_emb.weight": _task_embedding(rng, c)}
    sd.update(_wm_mlp(rng, "_encoder", [obs + emb, *c["encoder_units"], lat], last_ln=True))
    if kind == "mlp":
        sd.update(_wm_mlp(rng, "_dynamics", [lat + act + emb, *units, lat], last_ln=True))
    else:
        sd.update(_wm_mlp(rng, "_velocity", [lat + act + 1 + emb, *units, lat], last_ln=True))
    sd.update(_wm_mlp(rng, "_reward", [lat + act + emb, *units, c["num_bins"]], last_ln=False))
    return sd


def _critic(rng, c: dict) -> dict:
    """Ensemble layout: params.<i> = member-stacked [W, b, ln_w, ln_b] per hidden layer, then [W, b]."""
    members = [_seq_mlp(rng, "critic", [c["latent_dim"], *c["critic_units"], 1]) for _ in range(c["num_critics"])]
    names = list(members[0])  # critic.0.weight, critic.0.bias, critic.2.weight, ... in layer order
    return {f"params.{i}": np.stack([m[n] for m in members]) for i, n in enumerate(names)}


def random_weights(c: dict, seed: int) -> dict:
    """{wm_mlp, wm_flow, actor_gaussian, actor_flow, critic} float32 torch state dicts for config c."""
    rng = np.random.default_rng(seed)
    lat, act = c["latent_dim"], c["action_dim"]
    sds = {"wm_mlp": _world_model(rng, c, "mlp"), "wm_flow": _world_model(rng, c, "flow")}
    sds["actor_gaussian"] = {**_seq_mlp(rng, "mu_net", [lat, *c["actor_units"], act]),
                             "logstd": np.asarray(c["actor_logstd_raw"])}
    sds["actor_flow"] = {**_seq_mlp(rng, "velocity_net", [lat + act + 1, *c["flow_actor_units"], act]),
                         "init_logstd": np.asarray(c["flow_actor_init_logstd_raw"])}
    sds["critic"] = _critic(rng, c)
    return {m: {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in sd.items()} for m, sd in sds.items()}


# --------------------------------------------------------------------------------------------------------------
# Inputs, draws, outputs


def random_batches(c: dict, updates: int, rng) -> list:
    """Per update: obs (H+1,B,O) zero-padded past each task's obs size, act tanh(N) in all columns, rew (H,B,1),
    task (B,) int64."""
    H, B, O, A = c["horizon"], c["batch"], c["obs_dim"], c["action_dim"]
    out = []
    for _ in range(updates):
        task = rng.integers(0, len(c["tasks"]), B).astype(np.int64)
        mask = np.arange(O)[None, :] < np.asarray(c["obs_dims"])[task][:, None]
        out.append({"obs": (rng.normal(size=(H + 1, B, O)) * mask).astype(np.float32),
                    "act": np.tanh(rng.normal(size=(H, B, A))).astype(np.float32),
                    "rew": rng.uniform(-1.0, 2.0, (H, B, 1)).astype(np.float32), "task": task})
    return out


def random_draws(c: dict, alg: dict, case: dict, updates: int, rng) -> list:
    """Per update, the draws the reference makes: H flow-matching taus (flow WM fine-tuning, uniform sampling),
    then H actor draws (Gaussian eps or flow-actor initial noise), stacked per kind."""
    H, B, A = c["horizon"], c["batch"], c["action_dim"]
    out = []
    for _ in range(updates):
        d = {}
        if case["wm"] == "flow" and case["finetune"] and alg["tau_sampling"] == "uniform":
            d["fm_tau"] = rng.random((H, B, 1)).astype(np.float32)
        kind = "gauss_eps" if case["actor"] == "gaussian" else "flow_z0"
        d[kind] = rng.normal(size=(H, B, A)).astype(np.float32)
        out.append(d)
    return out


def _write_weights(out: pathlib.Path, c: dict, w: dict) -> None:
    (out / "config_small.json").write_text(json.dumps(c, indent=1) + "\n")
    torch.save({"world_model": w["wm_mlp"], "actor": w["actor_gaussian"], "critic": w["critic"]},
               out / "wm_small_native.pt")
    torch.save({"world_model": w["wm_flow"]}, out / "wm_small_native_flow.pt")
    torch.save({"actor": w["actor_flow"]}, out / "actor_flow_small.pt")


def write_golden_set(out_dir, seed: int = 7, updates: int = 3, config: dict | None = None, alg: dict | None = None,
                     cases: list | None = None) -> dict:
    """Write config_small.json, wm_small_native.pt, wm_small_native_flow.pt, actor_flow_small.pt,
    golden_update_small.npz and golden_update_small.json into out_dir (created). config/alg override entries of
    GEN_CONFIG/GEN_ALG; cases replaces GEN_CASES. Returns the json content."""
    c, a = {**GEN_CONFIG, **(config or {}), "seed": seed}, {**GEN_ALG, **(alg or {})}
    cases = list(GEN_CASES if cases is None else cases)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    weights = random_weights(c, seed)
    batches = random_batches(c, updates, rng)
    arrays = {f"inputs/batch{u}_{k}": v for u, b in enumerate(batches) for k, v in b.items()}
    deviation = {}
    for case in cases:
        draws = random_draws(c, a, case, updates, rng)
        arrays.update({f"{case['name']}/update{u}/draws/{k}": v for u, d in enumerate(draws) for k, v in d.items()})
        truth = ref.run_case(c, a, case, weights, batches, draws, torch.float64)
        single = ref.run_case(c, a, case, weights, batches, draws, torch.float32)
        for k, v in truth.items():
            arrays[f"{case['name']}/{k}"] = v
            deviation[f"{case['name']}/{k}"] = float(np.max(np.abs(np.asarray(single[k], np.float64) - v), initial=0.0))
    _write_weights(out, c, weights)
    np.savez(out / "golden_update_small.npz", **arrays)
    meta = {"config": c, "alg": a, "dtype": "float64 (same draws as the float32 run)", "cases": cases,
            "keys": sorted(arrays), "updates": updates, "float32_reference_max_abs_dev": deviation,
            "generator": f"tests/reference_update_goldens.py write_golden_set(seed={seed}, updates={updates})"}
    (out / "golden_update_small.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
