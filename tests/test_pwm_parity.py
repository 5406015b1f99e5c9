"""Training-core parity with the reference goldens: WM losses (MLP and flow with recorded taus), TD targets."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from fmbpo_jax import pwm
from convert_ckpt.torch_mapping import wm_params_from_state_dict

ATOL = 1e-5


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def check(name, got, golden):
    err = float(np.max(np.abs(np.asarray(got) - golden[name])))
    assert err <= ATOL, f"{name}: max abs error {err:.3g}"


def test_mlp_wm_loss(native_ckpt, small_models, golden, small_cfg):
    cfg = small_models[0]
    p = wm_params_from_state_dict(native_ckpt["world_model"], cfg)
    total, parts = pwm.wm_loss(cfg, p, golden["wml_obs"], golden["wml_act"], golden["wml_rew"], golden["wml_task"],
                               gamma=small_cfg["gamma"], reward_loss="mse_bins")
    check("wml_total_loss", total, golden)
    check("wml_dyn_loss", parts["dynamics_loss"], golden)
    check("wml_rew_loss", parts["reward_loss"], golden)


def test_flow_wm_loss_with_recorded_taus(native_flow_ckpt, small_models, golden, small_cfg):
    cfg = small_models[1]  # heun, K=4, simnorm velocity head (reference)
    p = wm_params_from_state_dict(native_flow_ckpt["world_model"], cfg)
    total, parts = pwm.wm_loss(cfg, p, golden["wml_obs"], golden["wml_act"], golden["wml_rew"], golden["wml_task"],
                               gamma=small_cfg["gamma"], reward_loss="mse_bins", taus=golden["flowwml_taus"])
    check("flowwml_total_loss", total, golden)
    check("flowwml_dyn_loss", parts["dynamics_loss"], golden)
    check("flowwml_rew_loss", parts["reward_loss"], golden)


def test_td_targets(golden, small_cfg):
    g, lam = small_cfg["gamma"], small_cfg["lam"]
    args = golden["td_rew_buf"], golden["td_next_values"], golden["td_done_mask"]
    check("td_target_values_td_lambda", pwm.td_targets(*args, g, lam, "td-lambda"), golden)
    check("td_target_values_one_step", pwm.td_targets(*args, g, lam, "one-step"), golden)
