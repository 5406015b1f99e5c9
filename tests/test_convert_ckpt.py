"""convert_ckpt: PyTorch checkpoints -> Flax params -> PyTorch, losslessly, and the goldens recomputed from them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convert_ckpt import api
from convert_ckpt.cli import main
from convert_ckpt.formats import parse_checkpoint
from convert_ckpt.store import read_manifest
from fmbpo_jax import world_model as wm
from fmbpo_jax.world_model import WMConfig

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
NAMES = ["wm_small_native", "wm_small_native_flow", "wm_small_tdmpc2", "actor_flow_small"]


def tload(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state_dict(a, b, what):
    assert list(a) == list(b), f"{what}: key lists differ:\n{list(a)}\n{list(b)}"
    for k in a:
        x, y = a[k], b[k]
        assert isinstance(y, torch.Tensor), f"{what}.{k}: {type(y)}"
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}.{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        assert torch.equal(x, y), f"{what}.{k}: values differ"
        assert x.numpy().tobytes() == y.numpy().tobytes(), f"{what}.{k}: not bitwise equal"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every fixture converted once through the CLI (in-process); name -> directory."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name in NAMES:
        dst = root / name
        assert main(["checkpoint", "--src", str(FIX / f"{name}.pt"), "--dst", str(dst)]) == 0
        out[name] = dst
    return out


# ----------------------------------------------------------------------------------------------- manifests


def test_manifest_records_source_and_architecture(converted):
    m = read_manifest(converted["wm_small_native"])
    src = m["source"]
    assert src["format"] == "native" and src["layout"] == "native-pwm-save"
    import hashlib

    assert src["sha256"] == hashlib.sha256((FIX / "wm_small_native.pt").read_bytes()).hexdigest()
    assert set(m["modules"]) == {"world_model", "actor", "critic"}
    c = m["modules"]["world_model"]["config"]
    assert (c["kind"], c["obs_dim"], c["action_dim"], c["latent_dim"], c["task_dim"], c["num_tasks"]) == ("mlp", 12, 4, 32, 16, 3)
    assert c["encoder_units"] == [64, 64, 64] and c["units"] == [64, 64] and c["num_bins"] == 101
    assert m["modules"]["world_model"]["preset"]["name"] == "custom"
    assert m["modules"]["actor"]["config"]["units"] == [48, 32, 16]
    assert m["modules"]["critic"]["config"] == {"latent_dim": 32, "units": [48, 32], "num_critics": 3}
    assert m["sizes"] == {"obs_dim": 12, "action_dim": 4, "latent_dim": 32, "task_dim": 16, "num_tasks": 3}

    f = read_manifest(converted["wm_small_native_flow"])
    assert f["modules"]["world_model"]["kind"] == "flow"
    assert f["modules"]["world_model"]["config"]["units"] == [60, 60]
    assert f["modules"]["world_model"]["config"]["velocity_head"] == "simnorm"
    assert f["tasks"] == ["task0", "task1", "task2"]

    t = read_manifest(converted["wm_small_tdmpc2"])
    assert t["source"]["layout"] == "tdmpc2-old"
    ex = t["modules"]["tdmpc2_extras"]
    assert ex["num_q"] == 2 and ex["parts"] == ["_Qs", "_pi", "_target_Qs"]
    assert ex["pi"]["in_dim"] == 32 + 16 and ex["pi"]["out_dim"] == 2 * 4 and ex["q"]["units"] == [64, 64]

    a = read_manifest(converted["actor_flow_small"])
    assert set(a["modules"]) == {"actor"} and a["modules"]["actor"]["kind"] == "flow"


def test_no_temp_dirs_left(converted):
    root = converted["wm_small_native"].parent
    assert sorted(p.name for p in root.iterdir()) == sorted(NAMES)


# ----------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["wm_small_native", "wm_small_native_flow", "actor_flow_small"])
def test_native_round_trip_is_lossless(converted, tmp_path, name):
    src = tload(FIX / f"{name}.pt")
    dst = tmp_path / "back.pt"
    assert main(["export", "--src", str(converted[name]), "--dst", str(dst)]) == 0
    back = tload(dst)  # plain types only: loads with weights_only=True
    for part in ("world_model", "actor", "critic"):
        assert (part in src) == (part in back), part
        if part in src:
            assert_same_state_dict(src[part], back[part], part)
    # plain metadata survives; optimizer states are not carried
    for k, v in src.items():
        if k in ("world_model", "actor", "critic") or k.endswith("_opt"):
            continue
        assert k in back, k
        assert back[k] == v or (isinstance(v, float) and np.isnan(v) and np.isnan(back[k])), (k, v, back[k])
    if "world_model" in src:
        assert back["obs_dim"] == 12 and back["act_dim"] == 4


def test_native_metadata_types_survive(converted, tmp_path):
    dst = tmp_path / "flow.pt"
    api.export_checkpoint(converted["wm_small_native_flow"], dst)
    back, src = tload(dst), tload(FIX / "wm_small_native_flow.pt")
    assert back["cfg"] == src["cfg"] and back["task_set"] == src["task_set"] and back["horizon"] == 4
    assert back["is_best"] is False and back["iter"] == 0
    back = tload(FIX / "wm_small_native.pt")
    assert back["best_reward"] == -float("inf")


def test_tdmpc2_round_trip_is_lossless(converted, tmp_path):
    src = tload(FIX / "wm_small_tdmpc2.pt")
    dst = tmp_path / "back_tdmpc2.pt"
    assert main(["export", "--src", str(converted["wm_small_tdmpc2"]), "--dst", str(dst), "--format", "tdmpc2"]) == 0
    back = tload(dst)
    assert list(back) == ["model"]
    assert_same_state_dict(src["model"], back["model"], "model")


def test_tdmpc2_to_native_equals_reference_load_wm(converted, tmp_path):
    """PWM.load_wm's filter of the TD-MPC2 file is bit-identical to the native world model (fixtures README)."""
    dst = tmp_path / "native.pt"
    path, notes = api.export_checkpoint(converted["wm_small_tdmpc2"], dst)
    assert any("tdmpc2_extras" in n for n in notes)
    back = tload(dst)
    assert_same_state_dict(tload(FIX / "wm_small_native.pt")["world_model"], back["world_model"], "world_model")
    # what PWM.load_wm does to the TD-MPC2 file, spelled out
    model = tload(FIX / "wm_small_tdmpc2.pt")["model"]
    filtered = {k.replace("state.", "") if "_encoder" in k else k: v for k, v in model.items() if "_pi" not in k and "_Qs" not in k}
    assert set(filtered) == set(back["world_model"])
    for k, v in filtered.items():
        assert torch.equal(v, back["world_model"][k])


def test_tdmpc2_extras_are_imported(converted):
    cfg, params, extras = api.load_world_model(converted["wm_small_tdmpc2"])
    ex = extras["tdmpc2_extras"]
    model = tload(FIX / "wm_small_tdmpc2.pt")["model"]
    # _pi: WMMLP layout, kernels transposed
    np.testing.assert_array_equal(ex["_pi"]["0"]["kernel"], model["_pi.0.weight"].numpy().T)
    np.testing.assert_array_equal(ex["_pi"]["1"]["ln"]["scale"], model["_pi.1.ln.weight"].numpy())
    np.testing.assert_array_equal(ex["_pi"]["2"]["bias"], model["_pi.2.bias"].numpy())
    # _Qs: stacked [num_q, in, out]; functorch order weight, bias, ln.weight, ln.bias per layer
    q = ex["_Qs"]
    np.testing.assert_array_equal(q["0"]["kernel"], np.swapaxes(model["_Qs.params.0"].numpy(), 1, 2))
    np.testing.assert_array_equal(q["0"]["ln"]["scale"], model["_Qs.params.2"].numpy())
    np.testing.assert_array_equal(q["1"]["bias"], model["_Qs.params.5"].numpy())
    np.testing.assert_array_equal(q["2"]["kernel"], np.swapaxes(model["_Qs.params.8"].numpy(), 1, 2))
    np.testing.assert_array_equal(ex["_target_Qs"]["2"]["bias"], model["_target_Qs.params.9"].numpy())


def test_q_extras_evaluate_like_the_reward_head(converted):
    """A Q member has the reward head's layout ([z, emb, a] -> bins): check it runs through nets.WMMLP as stacked params."""
    import jax.numpy as jnp

    from fmbpo_jax import nets

    cfg, params, extras = api.load_world_model(converted["wm_small_tdmpc2"])
    q = extras["tdmpc2_extras"]["_Qs"]
    ens = nets.ensemble(nets.WMMLP, 2)((64, 64), 101, "linear", 8)
    x = jnp.ones((5, 32 + 16 + 4)) * 0.1
    out = ens.apply({"params": q}, x)
    assert out.shape == (2, 5, 101)
    model = tload(FIX / "wm_small_tdmpc2.pt")["model"]
    w0, b0 = model["_Qs.params.0"][1].numpy(), model["_Qs.params.1"][1].numpy()
    h = np.asarray(x) @ w0.T + b0
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-5) * model["_Qs.params.2"][1].numpy() + model["_Qs.params.3"][1].numpy()
    h = h * np.tanh(np.log1p(np.exp(h)))
    for li, base in ((1, 4),):
        w, b = model[f"_Qs.params.{base}"][1].numpy(), model[f"_Qs.params.{base + 1}"][1].numpy()
        h = h @ w.T + b
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        h = (h - mu) / np.sqrt(var + 1e-5) * model[f"_Qs.params.{base + 2}"][1].numpy() + model[f"_Qs.params.{base + 3}"][1].numpy()
        h = h * np.tanh(np.log1p(np.exp(h)))
    ref = h @ model["_Qs.params.8"][1].numpy().T + model["_Qs.params.9"][1].numpy()
    np.testing.assert_allclose(np.asarray(out[1]), ref, atol=2e-5)


def _new_tdmpc2_layout(model: dict, num_tasks: int, action_dim: int) -> dict:
    """What TD-MPC2's api_model_conversion() makes of an old-layout state dict (+ the new buffers)."""
    names = ["weight", "bias", "ln.weight", "ln.bias"]
    out = {}
    for k, v in model.items():
        if k.startswith("_Qs.params."):
            n = int(k.rsplit(".", 1)[1])
            out[f"_Qs.params.{n // 4}.{names[n % 4]}"] = v
            out[f"_detach_Qs_params.{n // 4}.{names[n % 4]}"] = v
        elif k.startswith("_target_Qs.params."):
            n = int(k.rsplit(".", 1)[1])
            out[f"_target_Qs_params.{n // 4}.{names[n % 4]}"] = v.clone()
        else:
            out[k] = v
    for p in ("_Qs.params.", "_detach_Qs_params.", "_target_Qs_params."):
        out[p + "__batch_size"] = torch.Size([2])
        out[p + "__device"] = torch.device("cpu")
    out["_action_masks"] = torch.zeros(num_tasks, action_dim)
    out["_action_masks"][:, :2] = 1
    out["log_std_min"] = torch.tensor(-10.0)
    out["log_std_dif"] = torch.tensor(12.0)
    return out


def test_new_tdmpc2_layout_converts_and_round_trips(converted, tmp_path):
    old = tload(FIX / "wm_small_tdmpc2.pt")["model"]
    new = _new_tdmpc2_layout(dict(old), 3, 4)
    src = tmp_path / "new.pt"
    torch.save({"model": new}, src)
    dst = tmp_path / "new_conv"
    m = api.convert_checkpoint(src, dst)
    assert m["source"]["layout"] == "tdmpc2-new"
    cfg_o, p_o, ex_o = api.load_world_model(converted["wm_small_tdmpc2"])
    cfg_n, p_n, ex_n = api.load_world_model(dst)
    assert cfg_o == cfg_n
    for a, b in zip(_leaves(p_o), _leaves(p_n)):
        np.testing.assert_array_equal(a, b)
    for part in ("_pi", "_Qs", "_target_Qs"):
        for a, b in zip(_leaves(ex_o["tdmpc2_extras"][part]), _leaves(ex_n["tdmpc2_extras"][part])):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ex_n["tdmpc2_extras"]["buffers"]["_action_masks"], new["_action_masks"].numpy())
    back = tmp_path / "back_new.pt"
    api.export_checkpoint(dst, back, fmt="tdmpc2")
    got = tload(back)["model"]
    assert list(got) == list(new)
    for k, v in new.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, got[k]) and v.dtype == got[k].dtype, k
        else:
            assert v == got[k], k


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_running_mean_std_is_imported_as_data(tmp_path, monkeypatch):
    """A real PWM.save() pickles a RunningMeanStd in ret_rms: read without importing its class, stats kept."""
    import importlib

    pkg = tmp_path / "flow_mbpo_pwm" / "utils"
    pkg.mkdir(parents=True)
    (tmp_path / "flow_mbpo_pwm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "running_mean_std.py").write_text(
        "import torch\nclass RunningMeanStd(object):\n"
        "    def __init__(self, epsilon=1e-4, shape=()):\n"
        "        self.mean = torch.zeros(shape)\n        self.var = torch.ones(shape)\n        self.count = epsilon\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("flow_mbpo_pwm.utils.running_mean_std")
    rms = mod.RunningMeanStd(shape=(1,))
    rms.mean, rms.var, rms.count = torch.tensor([2.5]), torch.tensor([0.25]), 1234.5
    obj = tload(FIX / "wm_small_native.pt")
    obj["ret_rms"] = rms
    src = tmp_path / "pwm_save.pt"
    torch.save(obj, src)
    with pytest.raises(Exception):
        torch.load(src, weights_only=True)  # why the restricted loader is needed
    marker = tmp_path / "IMPORTED"
    (pkg / "running_mean_std.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    for name in [n for n in sys.modules if n.startswith("flow_mbpo_pwm")]:
        del sys.modules[name]
    dst = tmp_path / "conv"
    assert main(["checkpoint", "--src", str(src), "--dst", str(dst)]) == 0
    assert not marker.exists()
    conv = api.load_checkpoint(dst)
    st = conv.running_stats["ret_rms"]
    np.testing.assert_array_equal(st["mean"], [2.5])
    np.testing.assert_array_equal(st["var"], [0.25])
    assert float(st["count"]) == 1234.5
    back = tmp_path / "back.pt"
    api.export_checkpoint(dst, back)
    b = tload(back)  # exported as plain data: weights_only works
    assert b["ret_rms"] is None and b["ret_rms_stats"]["count"] == 1234.5
    assert torch.equal(b["ret_rms_stats"]["mean"], torch.tensor([2.5]))
    assert_same_state_dict(obj["world_model"], b["world_model"], "world_model")
    # and the exported stats come back in again
    assert api.load_checkpoint(back).running_stats["ret_rms"]["count"] == 1234.5


# ----------------------------------------------------------------------------------------------- API


def test_load_world_model_pt_and_dir_agree(converted, small_models):
    cfg_pt, p_pt, _ = api.load_world_model(FIX / "wm_small_native_flow.pt")
    cfg_dir, p_dir, extras = api.load_world_model(converted["wm_small_native_flow"])
    assert cfg_pt == cfg_dir == small_models[1]
    for a, b in zip(_leaves(p_pt), _leaves(p_dir)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert extras["tdmpc2_extras"] is None and extras["tasks"] == ["task0", "task1", "task2"]
    assert extras["format"] == "native" and extras["preset"]["name"] == "custom"
    # a matching config is accepted, and its free fields (not in the shapes) are used
    cfg2, _, _ = api.load_world_model(converted["wm_small_native_flow"], wm_cfg=WMConfig(**{**small_models[1].__dict__, "substeps": 2, "integrator": "euler"}))
    assert (cfg2.substeps, cfg2.integrator) == (2, "euler")


def test_load_actor_and_critic(converted, small_models):
    acfg, ap = api.load_actor(converted["wm_small_native"])
    assert acfg == small_models[2]
    ccfg, cp = api.load_critic(FIX / "wm_small_native.pt", critic_cfg=small_models[4])
    assert ccfg == small_models[4] and cp["critic"]["0"]["kernel"].shape == (3, 32, 48)
    fcfg, fp = api.load_actor(FIX / "actor_flow_small.pt", actor_cfg=small_models[3])
    assert fcfg == small_models[3]
    with pytest.raises(api.ModuleMissingError, match="no actor"):
        api.load_actor(converted["wm_small_tdmpc2"])
    with pytest.raises(api.ModuleMissingError, match="no world model"):
        api.load_world_model(FIX / "actor_flow_small.pt")


def test_converted_params_compute_goldens(converted, golden):
    import jax

    cfg, p, _ = api.load_world_model(converted["wm_small_tdmpc2"])
    with jax.default_matmul_precision("highest"):
        z = wm.encode(cfg, p, golden["obs"], golden["task_ids"])
    assert float(np.max(np.abs(np.asarray(z) - golden["enc_z"]))) <= 1e-5


# ----------------------------------------------------------------------------------------------- verify


EXPECTED = {
    "wm_small_native": {"enc_z", "enc_z_int_task", "mlp_next_z", "mlp_reward_logits", "mlp_reward_almost_two_hot_inv",
                        "mlp_reward_two_hot_inv", "task_emb_weight_after_renorm", "wml_total_loss", "wml_dyn_loss", "wml_rew_loss",
                        "actor_logstd_raw", "actor_mu", "actor_det_action_tanh", "actor_logstd_clamped", "actor_std", "actor_sample",
                        "actor_log_probs_of_sample", "critic_values", "critic_min", "td_target_values_td_lambda",
                        "td_target_values_one_step"},
    "wm_small_native_flow": {"flow_enc_z", "flow_enc_z2", "flow_velocity", "flow_next_heun4", "flow_next_euler2", "flow_next_default",
                             "flow_reward_logits", "flow_reward_almost_two_hot_inv", "flow_reward_two_hot_inv", "fm_loss_uniform",
                             "fm_loss_midpoint", "flowwml_total_loss", "flowwml_dyn_loss", "flowwml_rew_loss"},
    "wm_small_tdmpc2": {"enc_z", "enc_z_int_task", "mlp_next_z", "mlp_reward_logits", "mlp_reward_almost_two_hot_inv",
                        "mlp_reward_two_hot_inv", "task_emb_weight_after_renorm", "wml_total_loss", "wml_dyn_loss", "wml_rew_loss"},
    "actor_flow_small": {"flow_actor_init_logstd_raw", "flow_actor_det_action", "flow_actor_init_logstd_clamped", "flow_actor_z0",
                         "flow_actor_action_from_z0", "flow_actor_action_from_z0_substeps4"},
}


def _parse_verify(out: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in ("ok", "FAIL", "error", "skipped"):
            rows[parts[0]] = (parts[1], parts[2])
    return rows


@pytest.mark.parametrize("name", NAMES)
def test_verify_converted_reproduces_goldens(converted, name, capsys):
    """Every golden output of the module(s) in each file, recomputed from the converted params within 1e-5
    (the losses and TD targets through fmbpo_jax.pwm)."""
    rc = main(["verify", "--ckpt", str(converted[name]), "--golden", str(FIX / "golden_small.npz"),
               "--config", str(FIX / "config_small.json"), "--atol", "1e-5"])
    out = capsys.readouterr().out
    rows = _parse_verify(out)
    assert rc == 0, out
    assert set(rows) == EXPECTED[name], out
    for k, (err, status) in rows.items():
        assert status == "ok" and float(err) <= 1e-5, out


def test_verify_pt_directly(capsys):
    rc = main(["verify", "--ckpt", str(FIX / "wm_small_tdmpc2.pt"), "--golden", str(FIX / "golden_small.npz")])
    rows = _parse_verify(capsys.readouterr().out)
    assert rc == 0 and set(rows) == EXPECTED["wm_small_tdmpc2"]
    assert all(s == "ok" for _, s in rows.values())


def _golden_subset(tmp_path, names):
    g = tmp_path / "g.npz"
    with np.load(FIX / "golden_small.npz") as f:
        np.savez(g, **{k: f[k] for k in names})
    return g


def test_verify_fails_on_a_perturbed_weight(tmp_path, capsys):
    obj = tload(FIX / "wm_small_native.pt")
    obj["world_model"]["_encoder.0.bias"][0] += 0.5  # (a constant shift of a whole bias is undone by the LayerNorm)
    obj["critic"]["params.9"] = obj["critic"]["params.9"] + 1e-3
    src = tmp_path / "perturbed.pt"
    torch.save(obj, src)
    g = _golden_subset(tmp_path, ["obs", "task_ids", "enc_z", "critic_values", "actor_mu"])
    rc = main(["verify", "--ckpt", str(src), "--golden", str(g), "--config", str(FIX / "config_small.json")])
    rows = _parse_verify(capsys.readouterr().out)
    assert rc == 1
    assert rows["enc_z"][1] == "FAIL" and rows["critic_values"][1] == "FAIL"
    assert rows["actor_mu"][1] == "ok"  # fed the golden latents: unaffected
    assert abs(float(rows["critic_values"][0]) - 1e-3) < 1e-5
    # a tolerance tighter than the float32 noise fails too
    rc = main(["verify", "--ckpt", str(FIX / "wm_small_native.pt"), "--golden", str(g), "--atol", "1e-9"])
    assert rc == 1


def test_verify_with_nothing_to_check_fails(tmp_path, capsys):
    g = _golden_subset(tmp_path, ["obs", "task_ids", "act", "flow_velocity", "tau"])  # flow outputs only
    rc = main(["verify", "--ckpt", str(FIX / "wm_small_tdmpc2.pt"), "--golden", str(g)])
    cap = capsys.readouterr()
    assert rc == 3 and "nothing could be checked" in cap.err


def test_cli_subprocess_verify(converted):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "convert_ckpt", "verify", "--ckpt", str(converted["wm_small_tdmpc2"]),
           "--golden", str(FIX / "golden_small.npz"), "--config", str(FIX / "config_small.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tdmpc2-old" in r.stdout
    rows = _parse_verify(r.stdout)
    assert set(rows) == EXPECTED["wm_small_tdmpc2"] and all(s == "ok" for _, s in rows.values())


def test_inspect_prints_keys_and_format(capsys):
    assert main(["inspect", str(FIX / "wm_small_tdmpc2.pt")]) == 0
    out = capsys.readouterr().out
    assert "_encoder.state.0.weight: (64, 28) float32" in out
    assert "_Qs.params.8: (2, 101, 64) float32" in out
    assert "detected format: tdmpc2 (layout tdmpc2-old)" in out and "num_q" in out
    assert main(["inspect", str(FIX / "wm_small_native.pt")]) == 0
    out = capsys.readouterr().out
    assert "detected format: native (layout native-pwm-save)" in out and "kind='gaussian'" in out


def test_dataset_subcommand_is_wired():
    from convert_ckpt.cli import build_parser

    args = build_parser().parse_args(["dataset", "--src", "a.pt", "--dst", "store"])
    from convert_ckpt import dataset

    assert args.func is dataset.run_dataset


def test_in_memory_conversion_api():
    obj = tload(FIX / "wm_small_native.pt")
    conv = api.convert_object(obj)
    assert conv.modules() == ["world_model", "actor", "critic"]
    again = parse_checkpoint({"world_model": {k: v.numpy() for k, v in obj["world_model"].items()}})  # numpy works too
    for a, b in zip(_leaves(conv.wm), _leaves(again.wm)):
        np.testing.assert_array_equal(a, b)


def test_inspect_converted_directory(converted, capsys):
    assert main(["inspect", str(converted["wm_small_native_flow"])]) == 0
    out = capsys.readouterr().out
    assert "converted checkpoint directory" in out and '"layout": "native-pretrain"' in out and '"kind": "flow"' in out


def test_verify_reports_a_broken_output_without_hiding_the_others(tmp_path, capsys):
    g = tmp_path / "g.npz"
    with np.load(FIX / "golden_small.npz") as f:
        arrays = {k: f[k] for k in ("obs", "task_ids", "enc_z", "mlp_next_z")}
        arrays["act"] = np.zeros((9, 5), np.float32)  # one action column too many for this world model
    np.savez(g, **arrays)
    rc = main(["verify", "--ckpt", str(FIX / "wm_small_tdmpc2.pt"), "--golden", str(g)])
    rows = _parse_verify(capsys.readouterr().out)
    assert rc == 1
    assert rows["enc_z"][1] == "ok" and rows["mlp_next_z"][1] == "error"
