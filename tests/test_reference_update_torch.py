"""The independent PyTorch re-implementation of the reference's whole update (reference_update_torch.py) against the
shipped whole-update goldens, and its golden-set generator (reference_update_goldens.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import reference_update_goldens as gen
import reference_update_torch as ref
from conftest import FIXTURES

ATOL = RTOL = 1e-9  # float64 truth; two float64 reference runs differ by <= 1e-14
SHARED = json.loads((FIXTURES / "golden_update_small.json").read_text())


@pytest.fixture(scope="module")
def shared_npz():
    with np.load(FIXTURES / "golden_update_small.npz") as f:
        return {k: f[k] for k in f.files}


def case_outputs(npz: dict, case_name: str) -> dict:
    """The golden arrays of one case (its draws are inputs), without the case prefix."""
    head = case_name + "/"
    return {k[len(head):]: v for k, v in npz.items() if k.startswith(head) and "/draws/" not in k}


def mismatches(got: dict, want: dict) -> list[str]:
    """Every key missing/extra, of another dtype or shape, or beyond ATOL + RTOL * |want|."""
    bad = [f"missing {k}" for k in sorted(set(want) - set(got))] + [f"extra {k}" for k in sorted(set(got) - set(want))]
    for k in sorted(set(want) & set(got)):
        g, w = np.asarray(got[k]), np.asarray(want[k])
        if g.dtype != w.dtype or g.shape != w.shape:
            bad.append(f"{k}: {g.dtype}{g.shape} vs golden {w.dtype}{w.shape}")
        elif not np.allclose(g, w, atol=ATOL, rtol=RTOL):
            bad.append(f"{k}: max abs err {np.max(np.abs(g.astype(np.float64) - w)):.3g}")
    return bad


@pytest.mark.parametrize("case", SHARED["cases"], ids=[c["name"] for c in SHARED["cases"]])
def test_reproduces_the_shared_whole_update_golden_in_float64(case, shared_npz):
    """(a) Fed the shared weights, inputs and recorded draws, every array of the golden is reproduced to 1e-9."""
    batches, draws = ref.golden_case_inputs(shared_npz, case["name"], SHARED["updates"])
    got = ref.run_case(SHARED["config"], SHARED["alg"], case, ref.weights_from_files(FIXTURES), batches, draws)
    want = case_outputs(shared_npz, case["name"])
    assert len(want) > 40
    bad = mismatches(got, want)
    assert not bad, f"{case['name']}: {len(bad)} arrays differ: " + "; ".join(bad[:10])


def test_missing_or_unused_draws_are_named(shared_npz):
    case = SHARED["cases"][2]  # flow WM + flow actor: fm_tau and flow_z0
    batches, draws = ref.golden_case_inputs(shared_npz, case["name"], 1)
    weights = ref.weights_from_files(FIXTURES)
    short = [{**draws[0], "fm_tau": draws[0]["fm_tau"][:-1]}]
    with pytest.raises(ValueError, match="draws/fm_tau: draw 3 requested, 3 recorded"):
        ref.run_case(SHARED["config"], SHARED["alg"], case, weights, batches, short)
    extra = [{**draws[0], "flow_z0": np.concatenate([draws[0]["flow_z0"]] * 2)}]
    with pytest.raises(ValueError, match="left unused.*flow_z0"):
        ref.run_case(SHARED["config"], SHARED["alg"], case, weights, batches, extra)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden_set")
    meta = gen.write_golden_set(out, seed=11, updates=2)
    with np.load(out / "golden_update_small.npz") as f:
        npz = {k: f[k] for k in f.files}
    return out, meta, npz


def test_generated_set_files_load_and_list_their_keys(generated):
    out, meta, npz = generated
    assert json.loads((out / "config_small.json").read_text()) == meta["config"]
    assert json.loads((out / "golden_update_small.json").read_text()) == meta
    assert meta["keys"] == sorted(npz)
    native = torch.load(out / "wm_small_native.pt", map_location="cpu", weights_only=True)
    assert set(native) == {"world_model", "actor", "critic"}
    assert set(torch.load(out / "wm_small_native_flow.pt", weights_only=True)) == {"world_model"}
    assert set(torch.load(out / "actor_flow_small.pt", weights_only=True)) == {"actor"}
    outputs = [k for k in npz if not k.startswith("inputs/") and "/draws/" not in k]
    assert sorted(meta["float32_reference_max_abs_dev"]) == sorted(outputs)
    dev = np.array(list(meta["float32_reference_max_abs_dev"].values()))
    assert np.all(np.isfinite(dev)) and dev.max() < 1e-3 and dev.max() > 0.0


def test_generated_set_has_the_shared_layout_with_its_own_shapes(generated, shared_npz):
    out, meta, npz = generated
    c, u_max = meta["config"], meta["updates"]
    H, B, L, A = c["horizon"], c["batch"], c["latent_dim"], c["action_dim"]
    weights = ref.weights_from_files(out)
    for u in range(u_max):
        assert npz[f"inputs/batch{u}_obs"].shape == (H + 1, B, c["obs_dim"])
        assert npz[f"inputs/batch{u}_task"].shape == (B,) and npz[f"inputs/batch{u}_task"].dtype == np.int64
    for case in meta["cases"]:
        got = case_outputs(npz, case["name"])
        shared_kind = [s["name"] for s in SHARED["cases"] if (s["wm"], s["actor"], s["finetune"]) ==
                       (case["wm"], case["actor"], case["finetune"])]
        if shared_kind:  # the architecture-free keys are exactly the shared golden's for this case kind
            free = {k for k in case_outputs(shared_npz, shared_kind[0]) if "/actor_grad_clipped/" not in k
                    and not k.startswith("delta/")}
            assert {k for k in got if "/actor_grad_clipped/" not in k and not k.startswith("delta/")} == free
        actor, wm = weights[f"actor_{case['actor']}"], weights[f"wm_{case['wm']}"]
        wm_names = wm if case["finetune"] else ["_task_emb.weight"]
        expected = {**{f"delta/actor/{k}": v.shape for k, v in actor.items()},
                    **{f"delta/critic/{k}": v.shape for k, v in weights["critic"].items()},
                    **{f"delta/world_model/{k}": wm[k].shape for k in wm_names},
                    **{f"update{u}/actor_grad_clipped/{k}": v.shape for u in range(u_max) for k, v in actor.items()}}
        assert {k: tuple(got[k].shape) for k in expected} == {k: tuple(v) for k, v in expected.items()}
        assert {k for k in got if k.startswith("delta/")} == {k for k in expected if k.startswith("delta/")}
        for u in range(u_max):
            assert got[f"update{u}/obs_buf"].shape == (H, B, L) and got[f"update{u}/target_values"].shape == (H, B)
            head = f"{case['name']}/update{u}/draws/"
            draws = {k[len(head):]: v.shape for k, v in npz.items() if k.startswith(head)}
            want = {"gauss_eps" if case["actor"] == "gaussian" else "flow_z0": (H, B, A)}
            if case["wm"] == "flow" and case["finetune"]:
                want["fm_tau"] = (H, B, 1)
            assert draws == want


def test_generated_set_reproduces_from_its_files_and_exercises_its_settings(generated):
    out, meta, npz = generated
    c, a = meta["config"], meta["alg"]
    assert {"flow_gauss_finetune"} <= {k["name"] for k in meta["cases"]}
    rows, size = c["horizon"] * c["batch"], c["horizon"] * c["batch"] // a["critic_batches"]
    assert (rows, size, -(-rows // size)) == (15, 7, 3)  # slices of 7, 7 and 1
    weights = ref.weights_from_files(out)
    for case in meta["cases"]:
        batches, draws = ref.golden_case_inputs(npz, case["name"], meta["updates"])
        got = ref.run_case(c, a, case, weights, batches, draws)
        want = case_outputs(npz, case["name"])
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
        norms = [float(want[f"update{u}/metric/actor_grad_norm"]) for u in range(meta["updates"])]
        assert min(norms) > a["actor_grad_norm"]  # the actor clip is active
        if case["finetune"]:  # the WM clip (which scales the never-zeroed task-embedding grad) is active once
            wm_norms = [float(want[f"update{u}/metric/wm_grad_norm"]) for u in range(meta["updates"])]
            assert max(wm_norms) > a["wm_grad_norm"]
