"""The independent PyTorch re-implementation of the reference's whole update (reference_update_torch.py) against the
shipped whole-update goldens."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
