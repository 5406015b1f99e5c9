"""PyTorch checkpoint objects <-> our params, in memory: detect the layout, parse it, and go back.

`parse_checkpoint(obj, given)` takes what `safe_torch_load` returned and gives a `Converted` (the project's
`fmbpo_jax.bundle.Bundle`): world model (MLP or flow), actor (Gaussian or flow), critic ensemble, the TD-MPC2
extras (`_pi`, `_Qs`, `_target_Qs`, ...), running statistics and plain metadata. `torch_objects(converted, fmt)`
goes back. One module's state_dict <-> params (the architecture inferred from tensor shapes, `given` checked
against it): modules.py.
No torch import at module level: arrays may be torch tensors or numpy arrays.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Mapping

import jax
import numpy as np

from convert_ckpt.errors import KNOWN_LAYOUTS, CheckpointFormatError, ConfigMismatchError, ConvertError, StateDictError
from convert_ckpt.modules import (
    _is_tensor,
    _mlp_shape,
    _shape,
    actor_from_state_dict,
    actor_state_dict,
    critic_from_state_dict,
    critic_state_dict,
    named_from_stacked,
    stacked_params_from_named,
    to_numpy,
    wm_from_state_dict,
    wm_state_dict,
    wmmlp_template,
)
from convert_ckpt.safe_load import running_mean_std_fields
from convert_ckpt.torch_mapping import params_from_state_dict
from fmbpo_jax.bundle import Bundle
from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.world_model import WMConfig

Params = dict[str, Any]
Converted = Bundle  # the converter's name for the project's bundle (one checkpoint in our terms)

TDMPC2_BUFFERS = ("_action_masks", "log_std_min", "log_std_dif")
Q_TREES = {"_Qs": ("_Qs.params.", "_Qs.params."), "_target_Qs": ("_target_Qs.params.", "_target_Qs_params."),
           "_detach_Qs": (None, "_detach_Qs_params.")}  # name -> (old prefix, new prefix)


# ----------------------------------------------------------------------------------------------- TD-MPC2


def _old_q_structure(q: Mapping[str, Any], what: str) -> tuple[list[int], int, bool, int]:
    """Layer widths of a functorch-stacked Q (params.<n> in named_parameters order): outs, in0, last_ln, K."""
    n = len(q)
    for i in range(n):
        if str(i) not in q:
            raise StateDictError(f"{what}: missing key 'params.{i}'")
    groups: list[int] = []  # number of params per layer
    outs, in0, lead = [], None, None
    for i in range(n):
        s = _shape(q[str(i)])
        if len(s) == 3:
            groups.append(1)
            outs.append(s[1])
            in0 = s[2] if in0 is None else in0
            lead = s[0] if lead is None else lead
        elif len(s) == 2 and groups:
            groups[-1] += 1
        else:
            raise StateDictError(f"{what}: unexpected shape {s} for key 'params.{i}'")
    for j, c in enumerate(groups):
        if c not in (2, 4) or (c == 2 and j < len(groups) - 1):
            raise StateDictError(f"{what}: stacked parameters do not form a TD-MPC2 mlp (layer {j} has {c} tensors)")
    return outs, in0, groups[-1] == 4, lead


def _q_tree(cfg: WMConfig, src: Mapping[str, Any], layout: str, what: str) -> Params:
    if layout == "old":
        outs, in0, last_ln, k = _old_q_structure(src, what)
        template = wmmlp_template(in0, outs, last_ln, (k,))
        sd = {f"params.{i}": to_numpy(v, what) for i, v in ((int(i), v) for i, v in src.items())}
        params = params_from_state_dict(sd, template, what=what, ensemble=True)
    else:
        outs, in0, last_ln, lead = _mlp_shape(src, "", what, lead=1)
        template = wmmlp_template(in0, outs, last_ln, lead)
        params = stacked_params_from_named(src, template, what)
    want_in = cfg.latent_dim + cfg.action_dim + cfg.task_dim
    if in0 != want_in:
        raise StateDictError(f"{what}: input width {in0} != latent_dim + action_dim + task_dim = {want_in}")
    return params


def _split_tdmpc2_keys(sd: Mapping[str, Any]) -> tuple[dict, dict, dict, dict, dict, dict]:
    """(world-model keys, _pi keys, old-layout Q trees, new-layout Q trees, buffers, non-tensor Q entries) of a
    TD-MPC2 'model' state dict; a key no known layout has is an error."""
    wm_sd, pi = {}, {}
    q_old = {"_Qs": {}, "_target_Qs": {}}
    q_new = {"_Qs": {}, "_target_Qs": {}, "_detach_Qs": {}}
    buffers, nontensor, unknown = {}, {}, []
    for k, v in sd.items():
        if k.startswith("_encoder."):
            rest = k[len("_encoder."):]
            if rest.startswith("state."):
                wm_sd["_encoder." + rest[len("state."):]] = v
            elif rest.split(".")[0].isdigit():
                wm_sd[k] = v
            else:
                unknown.append(k)  # e.g. an 'rgb' encoder: not supported
            continue
        if k.startswith(("_dynamics.", "_reward.", "_task_emb.")):
            wm_sd[k] = v
        elif k.startswith("_pi."):
            pi[k[len("_pi."):]] = v
        elif k in TDMPC2_BUFFERS:
            buffers[k] = v
        else:
            for name, (old, new) in Q_TREES.items():
                if old and k.startswith(old) and k[len(old):].isdigit():
                    q_old[name][k[len(old):]] = v
                    break
                if k.startswith(new):
                    rest = k[len(new):]
                    if rest.startswith("__"):
                        nontensor[k] = v
                    else:
                        q_new[name][rest] = v
                    break
            else:
                unknown.append(k)
    if unknown:
        raise StateDictError(f"model: unexpected keys (none of the known TD-MPC2 layouts has them): {sorted(unknown)}\n{KNOWN_LAYOUTS}")
    return wm_sd, pi, q_old, q_new, buffers, nontensor


def _tdmpc2_extras(cfg: WMConfig, pi: dict, qs: dict, q_layout: str, buffers: dict, nontensor: dict) -> tuple[Params, dict]:
    """(tdmpc2_extras, their info): _pi, the Q ensembles, buffers, and what each holds."""
    extras: Params = {}
    info: dict = {}
    if pi:
        outs, in0, last_ln, _ = _mlp_shape(pi, "", "model _pi")
        if in0 != cfg.latent_dim + cfg.task_dim:
            raise StateDictError(f"model _pi: input width {in0} != latent_dim + task_dim = {cfg.latent_dim + cfg.task_dim}")
        extras["_pi"] = params_from_state_dict({k: to_numpy(v, "_pi") for k, v in pi.items()},
                                               wmmlp_template(in0, outs, last_ln), what="model _pi")
        info["pi"] = dict(in_dim=in0, units=outs[:-1], out_dim=outs[-1], last_layer="normedlinear" if last_ln else "linear",
                          input="[z, task_emb]", output="[mu (action_dim), log_std (action_dim)]")
    for name, src in qs.items():
        if src:
            extras[name] = _q_tree(cfg, src, q_layout, f"model {name}")
    if "_Qs" in extras:
        q = extras["_Qs"]
        info["num_q"] = int(q["0"]["kernel"].shape[0])
        info["q"] = dict(units=[int(q[str(i)]["kernel"].shape[-1]) for i in range(len(q) - 1)],
                         num_bins=int(q[str(len(q) - 1)]["kernel"].shape[-1]), input="[z, task_emb, a]")
    if "_detach_Qs" in extras and "_Qs" in extras:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(extras["_Qs"]),
                                                        jax.tree_util.tree_leaves(extras["_detach_Qs"])))
        if same:  # TD-MPC2-new stores the same tensors twice; keep one copy, re-create on export
            del extras["_detach_Qs"]
            info["detach_Qs"] = "same as _Qs"
    if buffers:
        extras["buffers"] = {k: to_numpy(v, k).astype(np.float32) for k, v in buffers.items()}
    if nontensor:
        info["nontensor"] = {k: to_jsonable(v) for k, v in nontensor.items()}
    return extras, info


def parse_tdmpc2(obj: Mapping[str, Any], given: Mapping | None = None) -> Converted:
    sd = obj["model"]
    if not isinstance(sd, Mapping):
        raise CheckpointFormatError(f"'model' holds a {type(sd).__name__}, expected a state_dict")
    extra_top = sorted(k for k in obj if k != "model")
    wm_sd, pi, q_old, q_new, buffers, nontensor = _split_tdmpc2_keys(sd)
    has_old = any(q_old.values())
    has_new = any(q_new.values()) or bool(buffers)
    if has_old and has_new:
        raise CheckpointFormatError("model: mixes old ('_Qs.params.<n>', '_target_Qs.params.<n>') and new "
                                    "('_Qs.params.<layer>.<name>', '_detach_Qs_params', '_target_Qs_params', buffers) TD-MPC2 keys")
    layout = "tdmpc2-old" if has_old else "tdmpc2-new" if has_new else "tdmpc2-wm-only"
    for k, v in wm_sd.items():
        if not _is_tensor(v):
            raise StateDictError(f"model: non-tensor value under key '{k}'")
    cfg, wm = wm_from_state_dict(wm_sd, given, what="model (TD-MPC2 world model; '_encoder.state.' shown as '_encoder.')")
    if cfg.kind != "mlp":
        raise CheckpointFormatError("model: a TD-MPC2 file holds an MLP world model; found '_velocity.*' keys")
    conv = Converted(format="tdmpc2", layout=layout, wm_cfg=cfg, wm=wm)
    conv.key_orders["model"] = [str(k) for k in sd]
    extras, info = _tdmpc2_extras(cfg, pi, q_old if has_old else q_new, "old" if has_old else "new", buffers, nontensor)
    conv.extras = extras or None
    conv.extras_info = {"layout": layout, **info}
    if extra_top:
        conv.metadata = {k: to_jsonable(obj[k], conv.notes, k) for k in extra_top}
    if cfg.num_tasks == 30 and cfg.task_dim > 0:
        conv.tasks = list(MT30_TASKS)
        conv.notes.append("30 task-embedding rows: assuming TD-MPC2's MT30 task order (fmbpo_jax.envs.tasks.MT30_TASKS)")
    return conv


# ----------------------------------------------------------------------------------------------- native


def _stats_of(value, name: str) -> dict:
    f = running_mean_std_fields(value)
    return {k: np.asarray(to_numpy(v, f"{name}.{k}") if _is_tensor(v) else v) for k, v in f.items()}


def parse_native(obj: Mapping[str, Any], given: Mapping | None = None) -> Converted:
    keys = set(obj)
    if {"actor_opt", "critic_opt", "iter_count"} & keys:
        layout = "native-pwm-save"
    elif {"world_model_opt", "iter", "task_set"} & keys:
        layout = "native-pretrain"
    else:
        layout = "native"
    conv = Converted(format="native", layout=layout)
    conv.key_orders["top"] = [str(k) for k in obj]
    if obj.get("world_model") is not None:
        conv.wm_cfg, conv.wm = wm_from_state_dict(obj["world_model"], given, "world_model")
        conv.key_orders["world_model"] = [str(k) for k in obj["world_model"]]
    if obj.get("actor") is not None:
        conv.actor_cfg, conv.actor = actor_from_state_dict(obj["actor"], given, "actor")
    if obj.get("critic") is not None:
        conv.critic_cfg, conv.critic = critic_from_state_dict(obj["critic"], given, "critic")
    for k, v in obj.items():
        if k in ("world_model", "actor", "critic"):
            if v is None:
                conv.metadata[k] = None
            continue
        if k.endswith("_opt"):
            conv.notes.append(f"'{k}' (PyTorch optimizer state) is not converted")
            continue
        if k.endswith("_rms_stats") and isinstance(v, Mapping):
            conv.running_stats[k[: -len("_stats")]] = _stats_of(dict(v), k)
            continue
        if k.endswith("_rms") and v is not None:
            conv.running_stats[k] = _stats_of(v, k)
            conv.metadata[k] = None  # the object itself is re-created as None + '<k>_stats' on export
            continue
        conv.metadata[k] = to_jsonable(v, conv.notes, k)
    if conv.wm_cfg is not None:
        for meta_key, field in (("obs_dim", "obs_dim"), ("act_dim", "action_dim")):
            v = obj.get(meta_key)
            if isinstance(v, int) and not isinstance(v, bool) and v != getattr(conv.wm_cfg, field):
                conv.notes.append(f"the file's '{meta_key}'={v} disagrees with the world model's {field}={getattr(conv.wm_cfg, field)} "
                                  "(from the tensor shapes, which are used)")
    tasks = obj.get("task_set")
    if tasks is None and isinstance(obj.get("cfg"), Mapping):
        tasks = obj["cfg"].get("tasks")
    if isinstance(tasks, (list, tuple)) and all(isinstance(t, str) for t in tasks):
        conv.tasks = list(tasks)
        if conv.wm_cfg is not None and conv.wm_cfg.task_dim > 0 and len(tasks) != conv.wm_cfg.num_tasks:
            raise ConfigMismatchError("world_model", "num_tasks", len(tasks), conv.wm_cfg.num_tasks,
                                      "the file's task_set/cfg.tasks disagrees with its task embedding")
    if conv.wm is None and conv.actor is None and conv.critic is None:
        raise CheckpointFormatError("native checkpoint without any of 'world_model', 'actor', 'critic' state dicts")
    return conv


# ----------------------------------------------------------------------------------------------- entry points


def detect_format(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"top level is a {type(obj).__module__}.{type(obj).__name__}, expected a dict")
    if any(k in obj for k in ("world_model", "actor", "critic")):
        return "native"
    if "model" in obj:
        return "tdmpc2"
    raise CheckpointFormatError(f"top-level keys {sorted(map(str, obj))[:20]} match no known layout "
                                "(need 'model' for TD-MPC2 or 'world_model'/'actor'/'critic' for native)")


def parse_checkpoint(obj: Any, given: Mapping | None = None, fmt: str = "auto") -> Converted:
    """A loaded checkpoint object -> Converted. fmt: 'auto' | 'tdmpc2' | 'native'."""
    found = detect_format(obj)
    if fmt not in ("auto", "tdmpc2", "native"):
        raise ValueError(f"unknown format {fmt!r}; known: auto, tdmpc2, native")
    if fmt != "auto" and fmt != found:
        raise CheckpointFormatError(f"--format {fmt} given, but the file is in the {found} layout")
    conv = parse_tdmpc2(obj, given) if found == "tdmpc2" else parse_native(obj, given)
    g_tasks = (given or {}).get("tasks")
    if g_tasks and conv.wm_cfg is not None and conv.wm_cfg.task_dim > 0 and len(g_tasks) != conv.wm_cfg.num_tasks:
        raise ConfigMismatchError("world_model", "num_tasks", len(g_tasks), conv.wm_cfg.num_tasks,
                                  f"the given task list has {len(g_tasks)} tasks")
    if g_tasks:
        conv.tasks = list(g_tasks)
    return conv


# ----------------------------------------------------------------------------------------------- plain data


def to_jsonable(x, notes: list | None = None, where: str = "") -> Any:
    """Plain metadata -> JSON-able value (lossless for the types checkpoints hold; see from_jsonable)."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else {"__float__": repr(x)}
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        if isinstance(x, torch.Size):
            return {"__torch_size__": [int(s) for s in x]}
        if isinstance(x, torch.device):
            return {"__torch_device__": str(x)}
        if isinstance(x, torch.Tensor) and x.numel() <= 4096:
            return {"__tensor__": x.detach().cpu().reshape(-1).tolist(), "dtype": str(x.dtype).replace("torch.", ""),
                    "shape": list(x.shape)}
    if isinstance(x, np.ndarray) and x.size <= 4096:
        return {"__ndarray__": x.reshape(-1).tolist(), "dtype": str(x.dtype), "shape": list(x.shape)}
    if isinstance(x, tuple):
        return {"__tuple__": [to_jsonable(v, notes, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [to_jsonable(v, notes, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, Mapping) and all(isinstance(k, str) for k in x):
        return {str(k): to_jsonable(v, notes, f"{where}.{k}") for k, v in x.items()}
    if notes is not None:
        notes.append(f"metadata '{where}' ({mod}.{type(x).__name__}) dropped: not plain data")
    return {"__dropped__": f"{mod}.{type(x).__name__}"}


def from_jsonable(x) -> Any:
    """Inverse of to_jsonable (torch types re-created; needs torch only for them)."""
    if isinstance(x, list):
        return [from_jsonable(v) for v in x]
    if not isinstance(x, dict):
        return x
    if "__float__" in x:
        return float(x["__float__"])
    if "__tuple__" in x:
        return tuple(from_jsonable(v) for v in x["__tuple__"])
    if "__torch_size__" in x:
        import torch

        return torch.Size(x["__torch_size__"])
    if "__torch_device__" in x:
        import torch

        return torch.device(x["__torch_device__"])
    if "__tensor__" in x:
        import torch

        return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"])).reshape(x["shape"])
    if "__ndarray__" in x:
        return np.asarray(x["__ndarray__"], dtype=x["dtype"]).reshape(x["shape"])
    if "__dropped__" in x:
        return None
    return {k: from_jsonable(v) for k, v in x.items()}


# ----------------------------------------------------------------------------------------------- back to torch


def torch_objects(conv: Converted, fmt: str = "native", notes: list | None = None) -> dict:
    """Converted -> the object torch.save should write (tensors as numpy; the caller makes torch tensors).

    native: {'world_model', 'actor', 'critic' (those present), plain metadata, '<name>_stats' for running
    statistics, obs_dim/act_dim/task_set when known}. tdmpc2: {'model': state_dict} in the source layout
    (old or new TD-MPC2 names; new when the source was new).
    """
    notes = notes if notes is not None else []
    if fmt == "tdmpc2":
        if conv.wm_cfg is None or conv.wm_cfg.kind != "mlp":
            raise ConvertError("export --format tdmpc2 needs an MLP world model (a TD-MPC2 file cannot hold a flow WM)")
        if conv.actor is not None or conv.critic is not None:
            notes.append("actor/critic are not part of the TD-MPC2 format: not exported")
        model = OrderedDict()
        for k, v in wm_state_dict(conv.wm_cfg, conv.wm).items():
            model["_encoder.state." + k[len("_encoder."):] if k.startswith("_encoder.") else k] = v
        ex = conv.extras or {}
        layout = conv.extras_info.get("layout", "tdmpc2-old")
        if "_pi" in ex:
            model.update((f"_pi.{k}", v) for k, v in named_from_stacked(ex["_pi"]).items())
        if layout == "tdmpc2-new":
            q_names = {"_Qs": "_Qs.params.", "_detach_Qs": "_detach_Qs_params.", "_target_Qs": "_target_Qs_params."}
            trees = dict(ex)
            if "_detach_Qs" not in trees and conv.extras_info.get("detach_Qs") == "same as _Qs" and "_Qs" in trees:
                trees["_detach_Qs"] = trees["_Qs"]
            for name, prefix in q_names.items():
                if name in trees:
                    model.update((prefix + k, v) for k, v in named_from_stacked(trees[name]).items())
            for k, v in (conv.extras_info.get("nontensor") or {}).items():
                model[k] = from_jsonable(v)
            for k, v in (ex.get("buffers") or {}).items():
                model[k] = v
        else:
            for name, prefix in (("_Qs", "_Qs.params."), ("_target_Qs", "_target_Qs.params.")):
                if name in ex:
                    model.update((prefix + k[len("params."):], v) for k, v in critic_state_dict(ex[name]).items())
        order = conv.key_orders.get("model")
        if order and set(order) == set(model):
            model = OrderedDict((k, model[k]) for k in order)
        return {"model": model}
    if fmt != "native":
        raise ValueError(f"unknown export format {fmt!r}; known: native, tdmpc2")
    if conv.extras:
        notes.append("tdmpc2_extras (_pi, _Qs, ...) have no place in the native format: not exported (use --format tdmpc2)")
    out: dict = {}
    meta = {k: from_jsonable(v) for k, v in conv.metadata.items()}
    if conv.actor is not None:
        out["actor"] = actor_state_dict(conv.actor_cfg, conv.actor)
    if conv.critic is not None:
        out["critic"] = critic_state_dict(conv.critic)
    if conv.wm is not None:
        out["world_model"] = wm_state_dict(conv.wm_cfg, conv.wm, conv.key_orders.get("world_model"))
    for k, v in meta.items():
        if k not in out:
            out[k] = v
    for name, st in conv.running_stats.items():
        out.setdefault(name, None)
        out[f"{name}_stats"] = {"mean": st["mean"], "var": st["var"], "count": float(np.asarray(st["count"]))}
    if conv.wm_cfg is not None:
        out.setdefault("obs_dim", conv.wm_cfg.obs_dim)
        out.setdefault("act_dim", conv.wm_cfg.action_dim)
        if conv.tasks:
            out.setdefault("task_set", list(conv.tasks))
    # key order: the source's top level where known
    order = conv.key_orders.get("top")
    if order:
        out = {k: out[k] for k in order if k in out} | {k: v for k, v in out.items() if k not in order}
    return out
