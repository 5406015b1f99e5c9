"""Converted checkpoints on disk: a directory with Flax params (orbax) and a JSON manifest, written atomically.

    DST/
      manifest.json   what is inside: modules and their configs, sizes, tasks, preset, source file + SHA-256
      params/         orbax checkpoint of {'world_model', 'actor', 'critic', 'tdmpc2_extras', 'running_stats'}
                      (only the parts present; nested dicts of float32 arrays in Flax layout)

Everything is written into a temporary sibling directory which is renamed to DST at the end, so DST either
does not exist or is complete. `read_converted(DST)` restores it and checks the shapes against the manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convert_ckpt.errors import CheckpointFormatError, ConvertError
from convert_ckpt.formats import Converted, from_jsonable, to_jsonable, torch_objects, wmmlp_template
from fmbpo_jax import actors, critic, world_model
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.world_model import WMConfig

MANIFEST = "manifest.json"
PARAMS = "params"
MANIFEST_FORMAT = "fmbpo_jax.convert_ckpt/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _num_params(tree) -> int:
    return int(sum(np.asarray(x).size for x in jax.tree_util.tree_leaves(tree)))


def _architecture(cfg) -> dict:
    """A model config as stored in the manifest: the architecture only (the matmul dtype is the run's choice)."""
    d = dataclasses.asdict(cfg)
    d.pop("compute_dtype", None)
    return d


def build_manifest(conv: Converted, source: dict | None = None) -> dict:
    mods: dict[str, Any] = {}
    if conv.wm is not None:
        mods["world_model"] = dict(kind=conv.wm_cfg.kind, config=_architecture(conv.wm_cfg),
                                   num_params=_num_params(conv.wm), preset=conv.preset())
    if conv.actor is not None:
        mods["actor"] = dict(kind=conv.actor_cfg.kind, config=_architecture(conv.actor_cfg), num_params=_num_params(conv.actor))
    if conv.critic is not None:
        mods["critic"] = dict(config=_architecture(conv.critic_cfg), num_params=_num_params(conv.critic))
    if conv.extras:
        mods["tdmpc2_extras"] = dict(conv.extras_info, parts=sorted(conv.extras), num_params=_num_params(conv.extras))
    sizes = {}
    if conv.wm_cfg is not None:
        c = conv.wm_cfg
        sizes = dict(obs_dim=c.obs_dim, action_dim=c.action_dim, latent_dim=c.latent_dim, task_dim=c.task_dim, num_tasks=c.num_tasks)
    return {
        "format": MANIFEST_FORMAT,
        "source": dict(source or {}, format=conv.format, layout=conv.layout),
        "modules": mods,
        "sizes": sizes,
        "tasks": conv.tasks,
        "running_stats": sorted(conv.running_stats),
        "metadata": conv.metadata,
        "notes": list(conv.notes),
        "key_orders": conv.key_orders,
    }


def _plain_tree(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, order="C"), tree)  # (ascontiguousarray makes 0-d 1-d)


def write_converted(conv: Converted, dst: str | os.PathLike, source: dict | None = None, overwrite: bool = False) -> dict:
    """Write `conv` to the directory dst atomically; returns the manifest."""
    import orbax.checkpoint as ocp

    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(conv, source)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS, _plain_tree(conv.tree()))
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


def is_converted_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file() and (p / PARAMS).is_dir()


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{p}: cannot read the manifest: {exc}", with_layouts=False) from None
    if m.get("format") != MANIFEST_FORMAT:
        raise CheckpointFormatError(f"{p}: not a convert_ckpt manifest (format {m.get('format')!r}, expected {MANIFEST_FORMAT!r})",
                                    with_layouts=False)
    return m


def _check_shapes(what: str, got, template) -> None:
    a = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    b = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(template)[0]}
    if a != b:
        diff = sorted(set(a) ^ set(b)) or [k for k in b if a[k] != b[k]]
        detail = "; ".join(f"{k}: stored {a.get(k)}, expected {b.get(k)}" for k in diff[:5])
        raise ConvertError(f"{what}: stored params do not match the manifest's config: {detail}")


def read_converted(path: str | os.PathLike) -> Converted:
    """Restore a directory written by write_converted (numpy float32 leaves), shapes checked against the manifest."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    m = read_manifest(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        tree = ckptr.restore(path / PARAMS)
    finally:
        ckptr.close()
    tree = jax.tree_util.tree_map(np.asarray, tree)
    mods = m["modules"]
    conv = Converted(format=m["source"].get("format", "?"), layout=m["source"].get("layout", "?"))
    if "world_model" in mods:
        conv.wm_cfg = WMConfig(**mods["world_model"]["config"])
        conv.wm = tree["world_model"]
        _check_shapes("world_model", conv.wm, jax.eval_shape(lambda: world_model.init(conv.wm_cfg, jax.random.key(0))))
    if "actor" in mods:
        conv.actor_cfg = ActorConfig(**mods["actor"]["config"])
        conv.actor = tree["actor"]
        _check_shapes("actor", conv.actor, jax.eval_shape(lambda: actors.init(conv.actor_cfg, jax.random.key(0))))
    if "critic" in mods:
        conv.critic_cfg = CriticConfig(**mods["critic"]["config"])
        conv.critic = tree["critic"]
        _check_shapes("critic", conv.critic, jax.eval_shape(lambda: critic.init(conv.critic_cfg, jax.random.key(0))))
    if "tdmpc2_extras" in mods:
        info = dict(mods["tdmpc2_extras"])
        info.pop("parts", None)
        info.pop("num_params", None)
        conv.extras = tree["tdmpc2_extras"]
        conv.extras_info = info
    conv.running_stats = tree.get("running_stats", {})
    conv.metadata = m.get("metadata", {})
    conv.tasks = m.get("tasks")
    conv.notes = list(m.get("notes", []))
    conv.key_orders = m.get("key_orders", {})
    return conv


# ----------------------------------------------------------------------------------------------- export


def _to_torch(obj):
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, dtype=obj.dtype, copy=True, order="C"))
    if isinstance(obj, dict):
        t = type(obj)
        return t((k, _to_torch(v)) for k, v in obj.items()) if t is not dict else {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def write_torch(conv: Converted, dst: str | os.PathLike, fmt: str = "native", notes: list | None = None) -> Path:
    """Write conv as a PyTorch .pt file (atomically: temp file + rename) in the native or TD-MPC2 layout."""
    import torch

    obj = _to_torch(torch_objects(conv, fmt, notes))
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dst


__all__ = ["write_converted", "read_converted", "read_manifest", "is_converted_dir", "write_torch", "sha256_file",
           "build_manifest", "wmmlp_template", "to_jsonable", "from_jsonable"]
