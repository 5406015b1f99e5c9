"""Full-size structure: state dicts with exactly the 48M MT30 shapes of the fixture manifests convert (in memory)
to the expected configs and parameter counts, and export back to exactly those keys and shapes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert_ckpt import api
from convert_ckpt.formats import torch_objects
from fmbpo_jax import world_model as wm
from fmbpo_jax.world_model import WMConfig

FIX = Path(__file__).parent / "fixtures"
MT30_48M = WMConfig()  # the 48M MT30 defaults: obs 24, act 6, latent 768, task_dim 64, 30 tasks, 1792 widths


def _manifest(name):
    return json.loads((FIX / name).read_text())


def _zeros(shapes: dict, marked: str | None = None, seed: int = 0) -> dict:
    """np.zeros for every key (lazily allocated), small random values under `marked` to check the layout mapping."""
    out = {k: np.zeros(tuple(s), np.float32) for k, s in shapes.items()}
    if marked:
        out[marked] = np.random.default_rng(seed).standard_normal(tuple(shapes[marked])).astype(np.float32)
    return out


def _shapes(sd: dict) -> dict:
    return {k: list(np.shape(v)) for k, v in sd.items()}


def _count(tree) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


@pytest.fixture(scope="module")
def tdmpc2_48m():
    m = _manifest("manifest_tdmpc2_mt30_48M.json")
    obj = {"model": _zeros(m["model"], marked="_encoder.state.0.weight")}
    return m, obj, api.convert_object(obj)


def test_tdmpc2_48m_mt30_converts(tdmpc2_48m):
    m, obj, conv = tdmpc2_48m
    assert conv.layout == "tdmpc2-old"
    assert conv.wm_cfg == MT30_48M
    assert wm.num_params(conv.wm) == 18_983_909 == sum(int(np.prod(s)) for s in m["after_pwm_load_wm_filter"].values())
    assert conv.preset() == {"name": "tdmpc2-48M", "mt30": True, "why": "TD-MPC2 MODEL_SIZE[48]"}
    assert conv.extras_info["num_q"] == 5 and conv.extras_info["q"]["units"] == [1792, 1792]
    assert conv.extras_info["pi"] == {"in_dim": 832, "units": [1792, 1792], "out_dim": 12, "last_layer": "linear",
                                      "input": "[z, task_emb]", "output": "[mu (action_dim), log_std (action_dim)]"}
    ex = conv.extras
    assert _count(ex["_pi"]) == 4_734_476
    assert _count(ex["_Qs"]) == _count(ex["_target_Qs"]) == 5 * 4_904_805
    assert _count(conv.wm) + _count(ex) == m["num_params_model"] == 72_766_435
    assert len(conv.tasks) == 30 and conv.tasks[0] == "walker-stand" and conv.tasks[-1] == "pendulum-spin"
    np.testing.assert_array_equal(conv.wm["_encoder"]["0"]["kernel"], obj["model"]["_encoder.state.0.weight"].T)


def test_tdmpc2_48m_exports_the_same_layout(tdmpc2_48m):
    m, _, conv = tdmpc2_48m
    back = torch_objects(conv, "tdmpc2")["model"]
    assert list(back) == list(m["model"])
    assert _shapes(back) == m["model"]
    native = torch_objects(conv, "native")
    assert _shapes(native["world_model"]) == m["after_pwm_load_wm_filter"]
    assert _shapes(native["world_model"]) == _manifest("manifest_native_48M.json")["world_model_mlp (pwm_48M_mt_baseline.yaml)"]
    assert native["obs_dim"] == 24 and native["act_dim"] == 6 and len(native["task_set"]) == 30


def test_native_48m_models_convert():
    m = _manifest("manifest_native_48M.json")
    wm_mlp, wm_flow = m["world_model_mlp (pwm_48M_mt_baseline.yaml)"], m["world_model_flow (pwm_48M_mt_flowwm.yaml)"]
    actor, critic, actor_flow = m["actor (ActorStochasticMLP, baseline/flowwm configs)"], m["critic (Ensemble of 3 CriticMLP)"], \
        m["actor_flow (ActorFlowODE, pwm_48M_mt_flowpolicy.yaml)"]

    base = api.convert_object({"world_model": _zeros(wm_mlp), "actor": _zeros(actor, "mu_net.3.weight"), "critic": _zeros(critic, "params.4")})
    assert base.wm_cfg == MT30_48M
    assert wm.num_params(base.wm) == m["num_params"]["world_model_mlp"] == 18_983_909
    assert _count(base.actor) == m["num_params"]["actor"] == 409_912
    assert _count(base.critic) == m["num_params"]["critic"] == 1_167_603
    assert (base.actor_cfg.kind, base.actor_cfg.latent_dim, base.actor_cfg.action_dim, base.actor_cfg.units) == ("gaussian", 768, 6, (400, 200, 100))
    assert (base.critic_cfg.num_critics, base.critic_cfg.units) == (3, (400, 200))
    out = torch_objects(base, "native")
    assert _shapes(out["world_model"]) == wm_mlp and _shapes(out["actor"]) == actor and _shapes(out["critic"]) == critic
    assert list(out["world_model"]) == list(wm_mlp) and list(out["actor"]) == list(actor) and list(out["critic"]) == list(critic)

    flow = api.convert_object({"world_model": _zeros(wm_flow, "_velocity.0.weight"), "actor": _zeros(actor_flow)})
    assert flow.wm_cfg == WMConfig(kind="flow", units=(1788, 1788), velocity_head="simnorm")
    assert wm.num_params(flow.wm) == m["num_params"]["world_model_flow"] == 18_946_829
    assert flow.preset()["name"] == "flow-mbpo-48M-flow" and flow.preset()["mt30"]
    assert _count(flow.actor) == m["num_params"]["actor_flow"] == 412_712
    assert flow.actor_cfg.kind == "flow" and flow.actor_cfg.latent_dim == 768
    out = torch_objects(flow, "native")
    assert _shapes(out["world_model"]) == wm_flow and _shapes(out["actor"]) == actor_flow
    assert list(out["world_model"]) == list(wm_flow)
