"""The project's own model bundle: world model / actor / critic params on disk, with a JSON manifest.

    DST/
      manifest.json   what is inside: modules and their configs, sizes, tasks, preset, source file + SHA-256
      params/         orbax checkpoint of {'world_model', 'actor', 'critic', 'tdmpc2_extras', 'running_stats'}
                      (only the parts present; nested dicts of float32 arrays in Flax layout)

WM pretraining writes bundles (`save_world_model`), `--config.checkpoint` reads them (`load_world_model`), and
the PyTorch converter (`convert_ckpt`, which imports this module, never the reverse) writes them from `.pt` files
and exports them back. A bundle is written into a temporary sibling directory that is renamed to DST at the end,
so DST either does not exist or is complete; `read_bundle` checks the stored shapes against the manifest.

A `--config.checkpoint` that is a file (not a bundle directory) is read by a reader registered for its suffix:
the converter registers its PyTorch reader for `.pt` as the entry point `pt` of the group
`fmbpo_jax.checkpoint_readers` (pyproject.toml), so this package needs neither torch nor the converter.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmbpo_jax import actors, critic, world_model
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.world_model import WMConfig

Params = dict[str, Any]
MANIFEST = "manifest.json"
PARAMS = "params"
MANIFEST_FORMAT = "fmbpo_jax.convert_ckpt/1"  # the name bundles were first written under; kept so old ones read
READER_GROUP = "fmbpo_jax.checkpoint_readers"


class BundleError(ValueError):
    """A bundle cannot be written or read; the message names the directory and what is wrong."""


class BundleFormatError(BundleError):
    """A directory whose manifest is missing, unreadable or of another format."""


# ============================================================================================ named sizes

# TD-MPC2 presets: nicklashansen/tdmpc2 `tdmpc2/common/__init__.py` MODEL_SIZE (read from the source). The encoder
# has num_enc_layers - 1 hidden layers of enc_dim; dynamics, reward, _pi and each Q have 2 hidden layers of mlp_dim.
# The size is the TD-MPC2 agent total (WM + _pi + num_q Qs), so the world model alone is smaller (48M: WM 18,983,909).
TDMPC2_MODEL_SIZE = {
    1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2),
    5: dict(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2, num_q=5),
    19: dict(enc_dim=1024, mlp_dim=1024, latent_dim=768, num_enc_layers=3, num_q=5),
    48: dict(enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4, num_q=5),
    317: dict(enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8),
}

# Flow WM widths of Flow-MBPO's flow configs (latent/encoder as the TD-MPC2 size of the same name): the flow WM at
# 48M uses units [1788, 1788] for both _velocity and _reward (parameter parity with the MLP WM), at 5M [510, 510]
# or [512, 512].
FLOW_UNITS = {5: ((510, 510), (512, 512)), 48: ((1788, 1788),)}

MT30 = dict(num_tasks=30, task_dim=64, obs_dim=24, action_dim=6)


def match_preset(cfg: WMConfig, num_q: int | None = None) -> dict:
    """Name the preset a WMConfig matches: {'name': 'tdmpc2-48M' | 'flow-mbpo-48M-flow' | 'custom', 'mt30': bool, 'why': str}."""
    enc = tuple(cfg.encoder_units)
    units = tuple(cfg.units)
    mt30 = all(getattr(cfg, k) == v for k, v in MT30.items())
    for size, p in TDMPC2_MODEL_SIZE.items():
        if cfg.latent_dim != p["latent_dim"] or enc != (p["enc_dim"],) * max(p["num_enc_layers"] - 1, 1) or cfg.num_bins != 101:
            continue
        if cfg.kind == "mlp" and units == (p["mlp_dim"],) * 2:
            if num_q is not None and num_q != p["num_q"]:
                return dict(name="custom", mt30=mt30,
                            why=f"world model matches TD-MPC2 {size}M but num_q={num_q} (preset {p['num_q']})")
            return dict(name=f"tdmpc2-{size}M", mt30=mt30, why=f"TD-MPC2 MODEL_SIZE[{size}]")
        if cfg.kind == "flow" and units in FLOW_UNITS.get(size, ()):
            return dict(name=f"flow-mbpo-{size}M-flow", mt30=mt30, why=f"Flow-MBPO {size}M flow WM (units {list(units)})")
    return dict(name="custom", mt30=mt30, why="no known preset has these widths")


# ============================================================================================ the bundle


@dataclasses.dataclass
class Bundle:
    """One checkpoint in our terms. Params are nested dicts of float32 numpy arrays (Flax layout)."""

    format: str  # 'tdmpc2' | 'native'
    layout: str  # 'tdmpc2-old' | 'tdmpc2-new' | 'tdmpc2-wm-only' | 'native-pwm-save' | 'native-pretrain' | 'native'
    wm_cfg: WMConfig | None = None
    wm: Params | None = None
    actor_cfg: ActorConfig | None = None
    actor: Params | None = None
    critic_cfg: CriticConfig | None = None
    critic: Params | None = None
    extras: Params | None = None  # tdmpc2_extras: {'_pi', '_Qs', '_target_Qs', ['_detach_Qs'], ['buffers']}
    extras_info: dict = dataclasses.field(default_factory=dict)
    running_stats: dict = dataclasses.field(default_factory=dict)  # name -> {'mean','var','count'} arrays
    metadata: dict = dataclasses.field(default_factory=dict)  # plain (JSON-able) top-level values
    tasks: list | None = None
    notes: list = dataclasses.field(default_factory=list)
    key_orders: dict = dataclasses.field(default_factory=dict)  # state dict name -> source key order

    def modules(self) -> list[str]:
        return [n for n in ("world_model", "actor", "critic", "tdmpc2_extras") if self.tree().get(n) is not None]

    def tree(self) -> dict:
        """The params pytree we store: only the parts present."""
        out = {"world_model": self.wm, "actor": self.actor, "critic": self.critic, "tdmpc2_extras": self.extras}
        if self.running_stats:
            out["running_stats"] = self.running_stats
        return {k: v for k, v in out.items() if v is not None}

    def preset(self) -> dict | None:
        if self.wm_cfg is None:
            return None
        return match_preset(self.wm_cfg, self.extras_info.get("num_q"))


def _num_params(tree) -> int:
    return int(sum(np.asarray(x).size for x in jax.tree_util.tree_leaves(tree)))


def _architecture(cfg) -> dict:
    """A model config as stored in the manifest: the architecture only (the matmul dtype is the run's choice)."""
    d = dataclasses.asdict(cfg)
    d.pop("compute_dtype", None)
    return d


def build_manifest(bundle: Bundle, source: dict | None = None) -> dict:
    mods: dict[str, Any] = {}
    if bundle.wm is not None:
        mods["world_model"] = dict(kind=bundle.wm_cfg.kind, config=_architecture(bundle.wm_cfg),
                                   num_params=_num_params(bundle.wm), preset=bundle.preset())
    if bundle.actor is not None:
        mods["actor"] = dict(kind=bundle.actor_cfg.kind, config=_architecture(bundle.actor_cfg),
                             num_params=_num_params(bundle.actor))
    if bundle.critic is not None:
        mods["critic"] = dict(config=_architecture(bundle.critic_cfg), num_params=_num_params(bundle.critic))
    if bundle.extras:
        mods["tdmpc2_extras"] = dict(bundle.extras_info, parts=sorted(bundle.extras), num_params=_num_params(bundle.extras))
    sizes = {}
    if bundle.wm_cfg is not None:
        c = bundle.wm_cfg
        sizes = dict(obs_dim=c.obs_dim, action_dim=c.action_dim, latent_dim=c.latent_dim, task_dim=c.task_dim, num_tasks=c.num_tasks)
    return {
        "format": MANIFEST_FORMAT,
        "source": dict(source or {}, format=bundle.format, layout=bundle.layout),
        "modules": mods,
        "sizes": sizes,
        "tasks": bundle.tasks,
        "running_stats": sorted(bundle.running_stats),
        "metadata": bundle.metadata,
        "notes": list(bundle.notes),
        "key_orders": bundle.key_orders,
    }


def _plain_tree(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, order="C"), tree)  # (ascontiguousarray makes 0-d 1-d)


def write_bundle(bundle: Bundle, dst: str | os.PathLike, source: dict | None = None, overwrite: bool = False) -> dict:
    """Write `bundle` to the directory dst atomically; returns the manifest."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise BundleError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(bundle, source)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS, _plain_tree(bundle.tree()))
        ckptr.wait_until_finished()
        ckptr.close()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def is_bundle_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file() and (p / PARAMS).is_dir()


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleFormatError(f"{p}: cannot read the manifest: {exc}") from None
    if m.get("format") != MANIFEST_FORMAT:
        raise BundleFormatError(f"{p}: not a convert_ckpt manifest (format {m.get('format')!r}, expected {MANIFEST_FORMAT!r})")
    return m


def _check_shapes(what: str, got, template) -> None:
    a = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    b = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(template)[0]}
    if a != b:
        diff = sorted(set(a) ^ set(b)) or [k for k in b if a[k] != b[k]]
        detail = "; ".join(f"{k}: stored {a.get(k)}, expected {b.get(k)}" for k in diff[:5])
        raise BundleError(f"{what}: stored params do not match the manifest's config: {detail}")


def _restore_params(path: Path) -> dict:
    ckptr = ocp.StandardCheckpointer()
    try:
        tree = ckptr.restore(path / PARAMS)
    finally:
        ckptr.close()
    return jax.tree_util.tree_map(np.asarray, tree)


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Restore a directory written by write_bundle (numpy float32 leaves), shapes checked against the manifest."""
    path = Path(path).absolute()
    m = read_manifest(path)
    tree = _restore_params(path)
    mods = m["modules"]
    b = Bundle(format=m["source"].get("format", "?"), layout=m["source"].get("layout", "?"))
    if "world_model" in mods:
        b.wm_cfg = WMConfig(**mods["world_model"]["config"])
        b.wm = tree["world_model"]
        _check_shapes("world_model", b.wm, jax.eval_shape(lambda: world_model.init(b.wm_cfg, jax.random.key(0))))
    if "actor" in mods:
        b.actor_cfg = ActorConfig(**mods["actor"]["config"])
        b.actor = tree["actor"]
        _check_shapes("actor", b.actor, jax.eval_shape(lambda: actors.init(b.actor_cfg, jax.random.key(0))))
    if "critic" in mods:
        b.critic_cfg = CriticConfig(**mods["critic"]["config"])
        b.critic = tree["critic"]
        _check_shapes("critic", b.critic, jax.eval_shape(lambda: critic.init(b.critic_cfg, jax.random.key(0))))
    if "tdmpc2_extras" in mods:
        info = dict(mods["tdmpc2_extras"])
        info.pop("parts", None)
        info.pop("num_params", None)
        b.extras = tree["tdmpc2_extras"]
        b.extras_info = info
    b.running_stats = tree.get("running_stats", {})
    b.metadata = m.get("metadata", {})
    b.tasks = m.get("tasks")
    b.notes = list(m.get("notes", []))
    b.key_orders = m.get("key_orders", {})
    return b


# ============================================================================================ world models


def save_world_model(wm_cfg: WMConfig, params: Params, dst: str, tasks: list[str], metadata: dict) -> None:
    """Write a trained WM (WM pretraining's wm_best/ and wm_last/) as a native bundle, replacing dst."""
    b = Bundle(format="native", layout="native-pretrain", wm_cfg=wm_cfg,
               wm=jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params), metadata=metadata, tasks=tasks)
    write_bundle(b, dst, overwrite=True)


Reader = Callable[[str], tuple[WMConfig, Params]]


def checkpoint_readers() -> dict[str, Reader]:
    """{suffix without the dot: reader(path) -> (WMConfig, params)} of the installed readers (entry points)."""
    return {ep.name: ep.load() for ep in importlib.metadata.entry_points(group=READER_GROUP)}


def load_world_model(path: str, readers: dict[str, Reader] | None = None) -> tuple[WMConfig, Params]:
    """(WMConfig, numpy params) of a bundle directory, or of a file read by the reader for its suffix.

    readers: {suffix: reader}; None = the installed ones (`checkpoint_readers`). The architecture is the stored
    one; facts shapes cannot tell (integrator, substeps, ...) are the bundle's or the 48M defaults.
    """
    if os.path.isdir(path):
        if not is_bundle_dir(path):
            raise BundleFormatError(f"{path} is a directory but not a converted checkpoint (no manifest.json + params/)")
        b = read_bundle(path)
        if b.wm is None:
            raise BundleError(f"{path}: the checkpoint has no world model (modules: {b.modules()})")
        return b.wm_cfg, b.wm
    suffix = os.path.splitext(path)[1].lstrip(".")
    readers = checkpoint_readers() if readers is None else readers
    if suffix not in readers:
        raise BundleError(f"{path}: no reader for '.{suffix}' files is installed (readers: {sorted(readers) or 'none'}). "
                          "PyTorch files are read by convert_ckpt's entry point (reinstall the package: pip install -e "
                          f"'.[convert]'), or convert it once: python -m convert_ckpt checkpoint --src {path} --dst DIR")
    return readers[suffix](path)
