"""PyTorch state_dict (key -> array) <-> our params pytree, by rule.

Rule (paths mirror the reference's module names):
  torch `a.b.weight` of a Linear [out, in]   <-> params[a][b]['kernel'] [in, out] (transposed)
  torch `a.b.weight` of a LayerNorm [n]      <-> params[a][b]['scale']
  torch `a.b.bias`                           <-> params[a][b]['bias']
  any other leaf name (e.g. `_task_emb.weight`, `logstd`) maps to itself unchanged.
Ensembles (the critic) are stored by the reference as functorch stacks `params.0 .. params.N-1`, one per
parameter of a member in registration order (Linear weight, bias, LayerNorm weight, bias, ...).

No torch import here: any array-like (numpy, torch tensor) is accepted. Every mismatch raises one
StateDictError naming the missing / unexpected keys or the key with its expected and found shapes.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

Params = dict[str, Any]


class StateDictError(ValueError):
    """A state_dict does not match the expected architecture."""


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def _torch_name(keys: tuple[str, ...]) -> tuple[str, bool]:
    """Flax leaf path -> (torch key, transpose?)."""
    *mods, leaf = keys
    if leaf == "kernel":
        return ".".join(mods + ["weight"]), True
    if leaf == "scale":
        return ".".join(mods + ["weight"]), False
    return ".".join(mods + [leaf]), False


def _leaves(template: Params) -> list[tuple[tuple[str, ...], Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(template)
    return [(_path_keys(p), leaf) for p, leaf in flat]


def _member_order(keys: tuple[str, ...]) -> tuple:
    """Registration order of a member's parameters: by module index, then weight before bias."""
    *mods, leaf = keys
    idx = tuple(int(m) if m.isdigit() else 10**6 for m in mods)
    return idx, 0 if leaf in ("kernel", "scale", "weight") else 1


def expected_keys(template: Params, ensemble: bool = False) -> dict[str, tuple[int, ...]]:
    """torch key -> torch shape that a state_dict for this template must have."""
    out = {}
    leaves = _leaves(template)
    if ensemble:
        leaves = sorted(leaves, key=lambda kv: _member_order(kv[0]))
        for i, (keys, leaf) in enumerate(leaves):
            shape = tuple(leaf.shape)
            out[f"params.{i}"] = shape[:-2] + shape[-2:][::-1] if keys[-1] == "kernel" else shape
        return out
    for keys, leaf in leaves:
        name, transpose = _torch_name(keys)
        out[name] = tuple(leaf.shape)[::-1] if transpose else tuple(leaf.shape)
    return out


def check_key_sets(have, want, what: str) -> None:
    """One StateDictError listing the missing and the unexpected keys of a state_dict (`have` vs `want`)."""
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        msg = [f"{what}: keys do not match the expected architecture"]
        if missing:
            msg.append(f"missing keys: {missing}")
        if unexpected:
            msg.append(f"unexpected keys: {unexpected}")
        raise StateDictError("; ".join(msg))


def params_from_state_dict(sd: Mapping[str, Any], template: Params, *, what: str = "state_dict", ensemble: bool = False) -> Params:
    """Build params shaped like `template` (arrays or ShapeDtypeStructs) from a torch state_dict.

    Raises StateDictError listing missing keys, unexpected keys, or a shape mismatch (key, expected, found).
    """
    want = expected_keys(template, ensemble)
    check_key_sets(sd, want, what)
    arrays = {}
    for key, shape in want.items():
        arr = np.asarray(sd[key])
        if tuple(arr.shape) != shape:
            raise StateDictError(f"{what}: shape mismatch for key '{key}': expected {shape}, found {tuple(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise StateDictError(f"{what}: key '{key}' has dtype {arr.dtype}, expected a floating-point tensor")
        arrays[key] = arr.astype(np.float32)

    leaves = _leaves(template)
    if ensemble:
        order = sorted(range(len(leaves)), key=lambda i: _member_order(leaves[i][0]))
        names = {leaf_i: f"params.{pos}" for pos, leaf_i in enumerate(order)}
    values = []
    for i, (keys, _) in enumerate(leaves):
        if ensemble:
            arr = arrays[names[i]]
            values.append(np.swapaxes(arr, -1, -2) if keys[-1] == "kernel" else arr)
        else:
            name, transpose = _torch_name(keys)
            values.append(arrays[name].T if transpose else arrays[name])
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [np.ascontiguousarray(v) for v in values])


def state_dict_from_params(params: Params, *, ensemble: bool = False, dtype=np.float32) -> dict[str, np.ndarray]:
    """Inverse of params_from_state_dict: params -> {torch key: numpy array in torch layout} (float32, or the
    params' own dtype with dtype=None)."""
    leaves = _leaves(params)
    out: dict[str, np.ndarray] = {}
    if ensemble:
        for i, (keys, leaf) in enumerate(sorted(leaves, key=lambda kv: _member_order(kv[0]))):
            arr = np.asarray(leaf, dtype)
            out[f"params.{i}"] = np.ascontiguousarray(np.swapaxes(arr, -1, -2) if keys[-1] == "kernel" else arr)
        return out
    for keys, leaf in leaves:
        name, transpose = _torch_name(keys)
        arr = np.asarray(leaf, dtype)
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


# ------------------------------------------------------------------------------ per-module convenience


def wm_params_from_state_dict(sd: Mapping[str, Any], cfg, what: str = "world_model") -> Params:
    from fmbpo_jax import world_model

    template = jax.eval_shape(lambda: world_model.init(cfg, jax.random.key(0)))
    return params_from_state_dict(sd, template, what=what)


def actor_params_from_state_dict(sd: Mapping[str, Any], cfg, what: str = "actor") -> Params:
    from fmbpo_jax import actors

    template = jax.eval_shape(lambda: actors.init(cfg, jax.random.key(0)))
    return params_from_state_dict(sd, template, what=what)


def critic_params_from_state_dict(sd: Mapping[str, Any], cfg, what: str = "critic") -> Params:
    from fmbpo_jax import critic

    template = jax.eval_shape(lambda: critic.init(cfg, jax.random.key(0)))
    return params_from_state_dict(sd, template, what=what, ensemble=True)
