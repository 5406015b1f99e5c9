"""Python API of convert_ckpt (what the CLI calls, and the trainer's reader of `.pt` files).

    from convert_ckpt.api import load_world_model, load_actor, load_critic
    cfg, params, extras = load_world_model("mt30_48M_4900000.pt")          # a .pt file ...
    cfg, params, extras = load_world_model("runs/wm48", wm_cfg=my_cfg)     # ... or a converted directory

A given config is checked against the checkpoint field by field (ConfigMismatchError names the field, the
expected (given) and the found (checkpoint) value); it also supplies what shapes cannot tell (SimNorm group,
bins range, flow integrator and substeps, actor log-std bound), which otherwise take the 48M defaults.
Params are nested dicts of float32 numpy arrays in Flax layout (fmbpo_jax.world_model etc. accept them).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from convert_ckpt.errors import ConvertError
from convert_ckpt.formats import Converted, parse_checkpoint
from convert_ckpt.modules import _check_given
from convert_ckpt.safe_load import safe_torch_load
from convert_ckpt.store import is_converted_dir, read_converted, sha256_file, write_converted, write_torch
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.world_model import WMConfig

Given = dict[str, Any]

WM_INFERABLE = ("kind", "obs_dim", "action_dim", "latent_dim", "task_dim", "num_tasks", "encoder_units", "units", "num_bins")
WM_FREE = ("simnorm_dim", "vmin", "vmax", "integrator", "substeps")
ACTOR_INFERABLE = ("kind", "latent_dim", "action_dim", "units")
ACTOR_FREE = ("min_logstd", "integrator", "substeps", "init_logstd", "init_gain")


class ModuleMissingError(ConvertError, KeyError):
    """The checkpoint has no such module (e.g. no actor in a TD-MPC2 file)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ----------------------------------------------------------------------------------------------- given facts


def given_from_config(cfg: Mapping[str, Any] | str | os.PathLike) -> Given:
    """Facts from a JSON config in the layout of tests/fixtures/config_small.json (a dict or a path)."""
    if not isinstance(cfg, Mapping):
        cfg = json.loads(Path(cfg).read_text())
    c = dict(cfg)

    def pick(*pairs):
        return {ours: c[theirs] for ours, theirs in pairs if c.get(theirs) is not None}

    g: Given = {
        "world_model": pick(("obs_dim", "obs_dim"), ("action_dim", "action_dim"), ("latent_dim", "latent_dim"),
                            ("task_dim", "task_dim"), ("num_tasks", "num_tasks"), ("encoder_units", "encoder_units"),
                            ("simnorm_dim", "simnorm_dim"), ("num_bins", "num_bins"), ("vmin", "vmin"), ("vmax", "vmax")),
        "world_model:mlp": pick(("units", "units")),
        "world_model:flow": pick(("units", "flow_units") if c.get("flow_units") is not None else ("units", "units"),
                                 ("integrator", "flow_integrator"), ("substeps", "flow_substeps")),
        "actor": pick(("latent_dim", "latent_dim"), ("action_dim", "action_dim")),
        "actor:gaussian": pick(("units", "actor_units"), ("min_logstd", "actor_min_logstd")),
        "actor:flow": pick(("units", "flow_actor_units"), ("integrator", "flow_actor_integrator"),
                           ("substeps", "flow_actor_substeps")),
        "critic": pick(("latent_dim", "latent_dim"), ("units", "critic_units"), ("num_critics", "num_critics")),
        "verify": pick(("gamma", "gamma"), ("lam", "lam"), ("horizon", "horizon")),
    }
    if isinstance(c.get("tasks"), list):
        g["tasks"] = list(c["tasks"])
        g["world_model"].setdefault("num_tasks", len(c["tasks"]))
    return g


def merge_given(*parts: Given | None) -> Given:
    out: Given = {}
    for p in parts:
        for k, v in (p or {}).items():
            if isinstance(v, Mapping):
                out.setdefault(k, {}).update({kk: vv for kk, vv in v.items() if vv is not None})
            elif v is not None:
                out[k] = v
    return out


def given_from_wm_cfg(cfg: WMConfig) -> Given:
    return {"world_model": dataclasses.asdict(cfg)}


def _apply_given_to_stored(conv: Converted, given: Given) -> Converted:
    """A converted directory's configs, checked against `given` and completed with its free fields."""
    if conv.wm_cfg is not None:
        c = conv.wm_cfg
        g = {**(given.get("world_model") or {}), **(given.get(f"world_model:{c.kind}") or {})}
        inferred = {f: getattr(c, f) for f in WM_INFERABLE}
        if c.kind == "flow":
            inferred["velocity_head"] = c.velocity_head
        _check_given("world_model", inferred, g)
        free = {f: g[f] for f in WM_FREE if g.get(f) is not None}
        if c.kind == "mlp" and g.get("velocity_head") is not None:
            free["velocity_head"] = g["velocity_head"]
        conv.wm_cfg = dataclasses.replace(c, **free)
    if conv.actor_cfg is not None:
        c = conv.actor_cfg
        g = {**(given.get("actor") or {}), **(given.get(f"actor:{c.kind}") or {})}
        _check_given("actor", {f: getattr(c, f) for f in ACTOR_INFERABLE}, g)
        conv.actor_cfg = dataclasses.replace(c, **{f: g[f] for f in ACTOR_FREE if g.get(f) is not None})
    if conv.critic_cfg is not None:
        c = conv.critic_cfg
        _check_given("critic", dataclasses.asdict(c) | {"units": tuple(c.units)}, given.get("critic") or {})
    tasks = given.get("tasks")
    if tasks and conv.wm_cfg is not None and conv.wm_cfg.task_dim > 0:
        _check_given("world_model", {"num_tasks": conv.wm_cfg.num_tasks}, {"num_tasks": len(tasks)})
        conv.tasks = list(tasks)
    return conv


# ----------------------------------------------------------------------------------------------- loading


def load_checkpoint(path: str | os.PathLike, given: Given | None = None, fmt: str = "auto") -> Converted:
    """A .pt file (TD-MPC2 or native; loaded without executing code) or a converted directory -> Converted."""
    path = Path(path)
    if path.is_dir():
        if not is_converted_dir(path):
            raise ConvertError(f"{path} is a directory but not a converted checkpoint (no manifest.json + params/)")
        return _apply_given_to_stored(read_converted(path), given or {})
    obj = safe_torch_load(path)
    return parse_checkpoint(obj, given, fmt)


def load_world_model(path: str | os.PathLike, wm_cfg: WMConfig | None = None, given: Given | None = None):
    """-> (WMConfig, params, extras). extras: {'tdmpc2_extras', 'tdmpc2_extras_info', 'running_stats', 'tasks',
    'metadata', 'preset', 'format', 'layout'} (tdmpc2_extras is None when the file has no _pi/_Qs)."""
    g = merge_given(given, given_from_wm_cfg(wm_cfg) if wm_cfg is not None else None)
    conv = load_checkpoint(path, g)
    if conv.wm is None:
        raise ModuleMissingError(f"{path}: the checkpoint has no world model (modules: {conv.modules()})")
    extras = dict(tdmpc2_extras=conv.extras, tdmpc2_extras_info=conv.extras_info, running_stats=conv.running_stats,
                  tasks=conv.tasks, metadata=conv.metadata, preset=conv.preset(), format=conv.format, layout=conv.layout)
    return conv.wm_cfg, conv.wm, extras


def read_world_model(path: str | os.PathLike):
    """(WMConfig, params) of a PyTorch file: the reader `fmbpo_jax.bundle` finds for `--config.checkpoint=FILE.pt`
    (entry point `pt` of the group fmbpo_jax.checkpoint_readers, pyproject.toml)."""
    cfg, params, _ = load_world_model(path)
    return cfg, params


def load_actor(path: str | os.PathLike, actor_cfg: ActorConfig | None = None, given: Given | None = None):
    """-> (ActorConfig, params) of the Gaussian or flow actor stored in a native checkpoint."""
    g = merge_given(given, {"actor": dataclasses.asdict(actor_cfg)} if actor_cfg is not None else None)
    conv = load_checkpoint(path, g)
    if conv.actor is None:
        raise ModuleMissingError(f"{path}: the checkpoint has no actor (modules: {conv.modules()})")
    return conv.actor_cfg, conv.actor


def load_critic(path: str | os.PathLike, critic_cfg: CriticConfig | None = None, given: Given | None = None):
    """-> (CriticConfig, params) of the critic ensemble stored in a native checkpoint."""
    g = merge_given(given, {"critic": dataclasses.asdict(critic_cfg)} if critic_cfg is not None else None)
    conv = load_checkpoint(path, g)
    if conv.critic is None:
        raise ModuleMissingError(f"{path}: the checkpoint has no critic (modules: {conv.modules()})")
    return conv.critic_cfg, conv.critic


# ----------------------------------------------------------------------------------------------- converting


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "auto", given: Given | None = None,
                       overwrite: bool = False) -> dict:
    """.pt -> converted directory (orbax params + manifest.json, written atomically). Returns the manifest."""
    src = Path(src)
    conv = load_checkpoint(src, given, fmt)
    source = dict(path=str(src.absolute()), sha256=sha256_file(src), bytes=src.stat().st_size)
    return write_converted(conv, dst, source, overwrite=overwrite)


def convert_object(obj: Any, dst: str | os.PathLike | None = None, *, fmt: str = "auto", given: Given | None = None,
                   overwrite: bool = False) -> Converted:
    """In-memory variant: an already loaded checkpoint object (dict of tensors/arrays) -> Converted (written if dst)."""
    conv = parse_checkpoint(obj, given, fmt)
    if dst is not None:
        write_converted(conv, dst, dict(path=None, sha256=None), overwrite=overwrite)
    return conv


def export_checkpoint(src: str | os.PathLike | Converted, dst: str | os.PathLike, *, fmt: str = "native") -> tuple[Path, list[str]]:
    """Converted directory (or .pt, or a Converted) -> PyTorch .pt in the native (default) or TD-MPC2 layout."""
    conv = src if isinstance(src, Converted) else load_checkpoint(src)
    notes: list[str] = []
    return write_torch(conv, dst, fmt, notes), notes


__all__ = ["load_checkpoint", "load_world_model", "read_world_model", "load_actor", "load_critic", "convert_checkpoint", "convert_object",
           "export_checkpoint", "given_from_config", "given_from_wm_cfg", "merge_given", "ModuleMissingError", "Converted"]
