"""convert_ckpt refuses bad input with a message that says what is wrong, and never runs code from a file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from convert_ckpt import api
from convert_ckpt.cli import main
from convert_ckpt.errors import CheckpointFormatError, ConfigMismatchError, SafeLoadError, StateDictError, UnsafePickleError
from convert_ckpt.formats import parse_checkpoint
from fmbpo_jax.world_model import WMConfig

FIX = Path(__file__).parent / "fixtures"


def tload(name):
    return torch.load(FIX / name, map_location="cpu", weights_only=True)


def refused(argv, capsys) -> str:
    """Run the CLI, expect exit status 2 (refused), return stderr."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


# ----------------------------------------------------------------------------------------------- unsafe pickles


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path, capsys, payload):
    marker = tmp_path / "PWNED"
    obj = tload("wm_small_native.pt")
    obj["ret_rms"] = payload(marker)  # hidden next to genuine weights
    src = tmp_path / "evil.pt"
    torch.save(obj, src)
    assert not marker.exists()
    dst = tmp_path / "out"
    err = refused(["checkpoint", "--src", str(src), "--dst", str(dst)], capsys)
    assert "refused (unsafe pickle; nothing was executed)" in err and str(src) in err
    assert ("system" in err) or ("exec" in err)
    assert not marker.exists()
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]  # nothing written, no temp dir left
    refused(["inspect", str(src)], capsys)
    refused(["verify", "--ckpt", str(src), "--golden", str(FIX / "golden_small.npz")], capsys)
    with pytest.raises(UnsafePickleError):
        api.load_world_model(src)
    assert not marker.exists()


def test_malicious_tdmpc2_file_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    obj = tload("wm_small_tdmpc2.pt")
    obj["model"]["_pi.0.weight"] = _Payload(marker)
    src = tmp_path / "evil_tdmpc2.pt"
    torch.save(obj, src)
    refused(["checkpoint", "--src", str(src), "--dst", str(tmp_path / "o")], capsys)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- broken files


def test_truncated_file(tmp_path, capsys):
    data = (FIX / "wm_small_native.pt").read_bytes()
    src = tmp_path / "truncated.pt"
    src.write_bytes(data[: len(data) // 2])
    err = refused(["checkpoint", "--src", str(src), "--dst", str(tmp_path / "o")], capsys)
    assert "SafeLoadError" in err and str(src) in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SafeLoadError):
        api.load_checkpoint(src)


def test_corrupt_files(tmp_path, capsys):
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a PyTorch zip archive" in refused(["inspect", str(rnd)], capsys)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty file" in refused(["checkpoint", "--src", str(empty), "--dst", str(tmp_path / "o")], capsys)
    # a valid zip whose tensor data is damaged
    import zipfile

    src = tmp_path / "damaged.pt"
    with zipfile.ZipFile(FIX / "wm_small_native_flow.pt") as zin, zipfile.ZipFile(src, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if "/data/" in item.filename and len(data) > 64:
                data = data[:10]  # storage too short
            zout.writestr(item, data)
    err = refused(["checkpoint", "--src", str(src), "--dst", str(tmp_path / "o")], capsys)
    assert "SafeLoadError" in err
    missing = tmp_path / "nope.pt"
    assert "no such file" in refused(["checkpoint", "--src", str(missing), "--dst", str(tmp_path / "o")], capsys)


# ----------------------------------------------------------------------------------------------- wrong contents


def test_missing_key_is_named(tmp_path, capsys):
    obj = tload("wm_small_native.pt")
    del obj["world_model"]["_reward.1.ln.bias"]
    with pytest.raises(StateDictError, match=r"missing keys: \['_reward\.1\.ln\.bias'\]"):
        parse_checkpoint(obj)
    obj = tload("wm_small_native.pt")
    del obj["world_model"]["_dynamics.1.weight"]
    with pytest.raises(StateDictError, match=r"missing key '_dynamics\.1\.weight'"):
        parse_checkpoint(obj)
    obj = tload("wm_small_native.pt")
    del obj["critic"]["params.4"]
    with pytest.raises(StateDictError, match=r"missing key 'params\.4'"):
        parse_checkpoint(obj)
    obj = tload("actor_flow_small.pt")
    del obj["actor"]["init_logstd"]
    with pytest.raises(StateDictError, match="init_logstd"):
        parse_checkpoint(obj)
    src = tmp_path / "missing.pt"
    obj = tload("wm_small_tdmpc2.pt")
    del obj["model"]["_encoder.state.2.ln.weight"]
    torch.save(obj, src)
    err = refused(["checkpoint", "--src", str(src), "--dst", str(tmp_path / "o")], capsys)
    assert "_encoder.2.ln.weight" in err and "missing" in err


def test_extra_unknown_keys_are_listed(tmp_path, capsys):
    obj = tload("wm_small_native.pt")
    obj["world_model"]["_encoder.0.extra"] = torch.zeros(3)
    obj["world_model"]["_bogus.weight"] = torch.zeros(3)
    with pytest.raises(StateDictError) as e:
        parse_checkpoint(obj)
    assert "unexpected keys: ['_bogus.weight', '_encoder.0.extra']" in str(e.value)
    obj = tload("wm_small_tdmpc2.pt")
    obj["model"]["_mystery.0.weight"] = torch.zeros(2, 2)
    obj["model"]["_Qx.params.0"] = torch.zeros(2, 2)
    src = tmp_path / "extra.pt"
    torch.save(obj, src)
    err = refused(["checkpoint", "--src", str(src), "--dst", str(tmp_path / "o")], capsys)
    assert "['_Qx.params.0', '_mystery.0.weight']" in err
    assert "tdmpc2-old" in err and "tdmpc2-new" in err and "native" in err  # the known layouts are listed


def test_unknown_layouts_say_which_are_known(tmp_path, capsys):
    src = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, src)
    err = refused(["checkpoint", "--src", str(src), "--dst", str(tmp_path / "o")], capsys)
    assert "match no known layout" in err and "'epoch', 'state_dict'" in err
    assert "tdmpc2-old" in err and "tdmpc2-new" in err and "pretrain_multitask_wm" in err
    with pytest.raises(CheckpointFormatError, match="expected a dict"):
        parse_checkpoint([1, 2, 3])
    # a forced format that disagrees with the file
    err = refused(["checkpoint", "--src", str(FIX / "wm_small_native.pt"), "--dst", str(tmp_path / "o"), "--format", "tdmpc2"], capsys)
    assert "--format tdmpc2 given, but the file is in the native layout" in err
    # a TD-MPC2 file mixing the old and the new Q layouts
    obj = tload("wm_small_tdmpc2.pt")
    obj["model"]["_detach_Qs_params.0.weight"] = obj["model"]["_Qs.params.0"]
    with pytest.raises(CheckpointFormatError, match="mixes old"):
        parse_checkpoint(obj)


def test_shape_mismatch_names_key_expected_and_found(tmp_path, capsys):
    obj = tload("wm_small_native.pt")
    obj["world_model"]["_encoder.1.weight"] = torch.zeros(64, 63)
    with pytest.raises(StateDictError, match=r"shape mismatch for key '_encoder\.1\.weight': expected \(64, 64\), found \(64, 63\)"):
        parse_checkpoint(obj)
    obj = tload("wm_small_native.pt")
    obj["world_model"]["_reward.0.weight"] = torch.zeros(64, 53)  # one input column too many
    with pytest.raises(StateDictError, match=r"'_reward\.0\.weight': expected \(64, 52\), found \(64, 53\)"):
        parse_checkpoint(obj)
    obj = tload("wm_small_native.pt")
    obj["critic"]["params.5"] = torch.zeros(3, 31)
    with pytest.raises(StateDictError, match=r"'params\.5': expected \(3, 32\), found \(3, 31\)"):
        parse_checkpoint(obj)
    obj = tload("wm_small_tdmpc2.pt")
    obj["model"]["_Qs.params.4"] = torch.zeros(2, 64, 65)
    src = tmp_path / "bad_q.pt"
    torch.save(obj, src)
    err = refused(["checkpoint", "--src", str(src), "--dst", str(tmp_path / "o")], capsys)
    assert "params.4" in err and "expected (2, 64, 64), found (2, 64, 65)" in err


def test_task_count_differs_from_config(tmp_path, capsys, small_models):
    mlp = small_models[0]
    five = WMConfig(**{**mlp.__dict__, "num_tasks": 5})
    with pytest.raises(ConfigMismatchError) as e:
        api.load_world_model(FIX / "wm_small_native.pt", wm_cfg=five)
    assert (e.value.field, e.value.expected, e.value.found) == ("num_tasks", 5, 3)
    assert "'num_tasks'" in str(e.value) and "expected 5" in str(e.value) and "found 3" in str(e.value)
    # same from a converted directory
    dst = tmp_path / "conv"
    api.convert_checkpoint(FIX / "wm_small_native.pt", dst)
    with pytest.raises(ConfigMismatchError, match="num_tasks"):
        api.load_world_model(dst, wm_cfg=five)
    # CLI flag and config file
    err = refused(["checkpoint", "--src", str(FIX / "wm_small_tdmpc2.pt"), "--dst", str(tmp_path / "o"), "--num-tasks", "30"], capsys)
    assert "'num_tasks'" in err and "expected 30" in err and "found 3" in err
    assert not (tmp_path / "o").exists()
    err = refused(["checkpoint", "--src", str(FIX / "wm_small_native_flow.pt"), "--dst", str(tmp_path / "o"),
                   "--tasks", "a,b,c,d"], capsys)
    assert "num_tasks" in err and "expected 4" in err
    import json

    cfg = json.loads((FIX / "config_small.json").read_text())
    cfg["tasks"] = cfg["tasks"] + ["task3"]
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps(cfg))
    err = refused(["verify", "--ckpt", str(FIX / "wm_small_tdmpc2.pt"), "--golden", str(FIX / "golden_small.npz"), "--config", str(bad)], capsys)
    assert "num_tasks" in err


def test_other_config_mismatches_name_the_field(small_models):
    mlp, flow = small_models[0], small_models[1]
    with pytest.raises(ConfigMismatchError, match="'kind'.*expected 'mlp'.*found 'flow'"):
        api.load_world_model(FIX / "wm_small_native_flow.pt", wm_cfg=mlp)
    with pytest.raises(ConfigMismatchError, match="'units'.*expected \\(64, 64\\).*found \\(60, 60\\)"):
        api.load_world_model(FIX / "wm_small_native_flow.pt", wm_cfg=WMConfig(**{**flow.__dict__, "units": (64, 64)}))
    with pytest.raises(ConfigMismatchError, match="'velocity_head'.*expected 'linear'.*found 'simnorm'"):
        api.load_world_model(FIX / "wm_small_native_flow.pt", wm_cfg=WMConfig(**{**flow.__dict__, "velocity_head": "linear"}))
    with pytest.raises(ConfigMismatchError, match="'latent_dim'"):
        api.load_world_model(FIX / "wm_small_tdmpc2.pt", wm_cfg=WMConfig(**{**mlp.__dict__, "latent_dim": 64}))
    from fmbpo_jax.critic import CriticConfig

    with pytest.raises(ConfigMismatchError, match="critic: config field 'num_critics'"):
        api.load_critic(FIX / "wm_small_native.pt", critic_cfg=CriticConfig(latent_dim=32, units=(48, 32), num_critics=2))


def test_free_fields_come_from_the_config(tmp_path, small_models):
    """Facts the shapes cannot tell: SimNorm group etc. are taken from the given config, else the 48M defaults."""
    cfg, _, _ = api.load_world_model(FIX / "wm_small_tdmpc2.pt", given={"world_model": {"simnorm_dim": 4, "vmin": -5.0}})
    assert (cfg.simnorm_dim, cfg.vmin, cfg.vmax) == (4, -5.0, 10.0)
    with pytest.raises(Exception, match="simnorm"):
        api.load_world_model(FIX / "wm_small_tdmpc2.pt", given={"world_model": {"simnorm_dim": 5}})  # 32 % 5 != 0


def test_destination_is_not_clobbered(tmp_path, capsys):
    dst = tmp_path / "conv"
    assert main(["checkpoint", "--src", str(FIX / "actor_flow_small.pt"), "--dst", str(dst)]) == 0
    capsys.readouterr()
    err = refused(["checkpoint", "--src", str(FIX / "wm_small_tdmpc2.pt"), "--dst", str(dst)], capsys)
    assert "exists" in err and "--overwrite" in err
    assert api.load_checkpoint(dst).modules() == ["actor"]
    assert main(["checkpoint", "--src", str(FIX / "wm_small_tdmpc2.pt"), "--dst", str(dst), "--overwrite"]) == 0
    assert api.load_checkpoint(dst).modules() == ["world_model", "tdmpc2_extras"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no temp or backup directories left


def test_converted_dir_is_checked_on_load(tmp_path):
    dst = tmp_path / "conv"
    api.convert_checkpoint(FIX / "wm_small_native_flow.pt", dst)
    import json

    m = json.loads((dst / "manifest.json").read_text())
    m["modules"]["world_model"]["config"]["latent_dim"] = 40
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception, match="do not match the manifest"):
        api.load_checkpoint(dst)
    (dst / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="not a convert_ckpt manifest"):
        api.load_checkpoint(dst)
    with pytest.raises(Exception, match="not a converted checkpoint"):
        api.load_checkpoint(tmp_path)


def test_export_flow_wm_to_tdmpc2_is_refused(tmp_path, capsys):
    dst = tmp_path / "conv"
    api.convert_checkpoint(FIX / "wm_small_native_flow.pt", dst)
    err = refused(["export", "--src", str(dst), "--dst", str(tmp_path / "x.pt"), "--format", "tdmpc2"], capsys)
    assert "cannot hold a flow WM" in err
    assert not (tmp_path / "x.pt").exists()


def test_metadata_disagreeing_with_shapes_is_noted():
    obj = tload("wm_small_native_flow.pt")
    obj["obs_dim"] = 24
    conv = parse_checkpoint(obj)
    assert conv.wm_cfg.obs_dim == 12
    assert any("'obs_dim'=24 disagrees" in n for n in conv.notes)
