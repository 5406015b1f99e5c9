"""The project's bundle format (fmbpo_jax.bundle) and the one-way dependency: convert_ckpt imports fmbpo_jax, never
the reverse; `--config.checkpoint=FILE.pt` reaches the converter through an entry point, not an import."""
from __future__ import annotations

import ast
import pathlib
import tomllib

import jax
import numpy as np
import pytest

from fmbpo_jax import bundle
from fmbpo_jax import world_model as wm
from fmbpo_jax.world_model import WMConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = pathlib.Path(__file__).parent / "fixtures"


def _imports(path: pathlib.Path) -> set[str]:
    """Every module name an import statement of the file names (wherever the statement is)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_fmbpo_jax_never_imports_the_converter():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "convert_ckpt")
                 for p in (ROOT / "fmbpo_jax").rglob("*.py")}
    assert {p: m for p, m in offenders.items() if m} == {}
    assert "fmbpo_jax.bundle" in _imports(ROOT / "convert_ckpt" / "store.py")  # the converter uses the project's format


def _tiny_wm() -> tuple[WMConfig, dict]:
    cfg = WMConfig(obs_dim=5, action_dim=2, latent_dim=8, task_dim=0, num_tasks=1, encoder_units=(16,), units=(16, 16),
                   simnorm_dim=4, num_bins=11)
    return cfg, jax.tree_util.tree_map(np.asarray, wm.init(cfg, jax.random.PRNGKey(0)))


def test_world_model_bundle_round_trip_and_readers(tmp_path):
    cfg, params = _tiny_wm()
    bundle.save_world_model(cfg, params, str(tmp_path / "wm"), ["cartpole-swingup"], {"iter": 3})
    got_cfg, got = bundle.load_world_model(str(tmp_path / "wm"))
    assert got_cfg == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)
    m = bundle.read_manifest(tmp_path / "wm")
    assert m["metadata"] == {"iter": 3} and m["source"]["layout"] == "native-pretrain" and m["modules"]["world_model"]["preset"]["name"] == "custom"
    # a file goes to the reader registered for its suffix; an unknown suffix names the converter's way in
    seen = []
    assert bundle.load_world_model("x.pt", readers={"pt": lambda p: seen.append(p) or (cfg, params)})[0] == cfg
    assert seen == ["x.pt"]
    with pytest.raises(bundle.BundleError, match=r"no reader for '\.ckpt'.*python -m convert_ckpt checkpoint"):
        bundle.load_world_model("x.ckpt", readers={"pt": None})
    with pytest.raises(bundle.BundleFormatError, match="not a converted checkpoint"):
        bundle.load_world_model(str(tmp_path))


def test_the_pytorch_reader_entry_point_resolves_to_the_converter():
    """pyproject.toml names convert_ckpt.api.read_world_model for .pt/.pth; it reads a fixture like the converter's API."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][bundle.READER_GROUP]
    assert set(eps) == {"pt", "pth"}
    module, _, name = eps["pt"].partition(":")
    reader = getattr(__import__(module, fromlist=[name]), name)
    from convert_ckpt.api import load_world_model

    cfg, params = bundle.load_world_model(str(FIX / "wm_small_native.pt"), readers={"pt": reader})
    want_cfg, want, _ = load_world_model(FIX / "wm_small_native.pt")
    assert cfg == want_cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
