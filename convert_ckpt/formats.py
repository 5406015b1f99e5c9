"""PyTorch checkpoint objects <-> our params, in memory: detect the layout, infer the architecture, map.

`parse_checkpoint(obj, given)` takes what `safe_torch_load` returned and gives a :class:`Converted`:
world model (MLP or flow), actor (Gaussian or flow), critic ensemble, the TD-MPC2 extras (`_pi`, `_Qs`,
`_target_Qs`, ...), running statistics and plain metadata. `torch_objects(converted, fmt)` goes back.

The architecture comes from tensor shapes; `given` (facts from the user or a config) is checked against
it, field by field, and supplies what shapes cannot tell (SimNorm group, bins range, integrator, ...).
No torch import at module level: arrays may be torch tensors or numpy arrays.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, Mapping

import jax
import numpy as np

from convert_ckpt.errors import KNOWN_LAYOUTS, CheckpointFormatError, ConfigMismatchError, ConvertError, StateDictError
from convert_ckpt.presets import match_preset
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.torch_mapping import (
    actor_params_from_state_dict,
    critic_params_from_state_dict,
    params_from_state_dict,
    state_dict_from_params,
    wm_params_from_state_dict,
)
from fmbpo_jax.world_model import WMConfig
from fmbpo_jax.torch_mapping import _torch_name, check_key_sets  # the one key rule and key check

Params = dict[str, Any]

TDMPC2_BUFFERS = ("_action_masks", "log_std_min", "log_std_dif")
Q_TREES = {"_Qs": ("_Qs.params.", "_Qs.params."), "_target_Qs": ("_target_Qs.params.", "_target_Qs_params."),
           "_detach_Qs": (None, "_detach_Qs_params.")}  # name -> (old prefix, new prefix)


@dataclasses.dataclass
class Converted:
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


# ----------------------------------------------------------------------------------------------- helpers


def to_numpy(x, what: str = "tensor") -> np.ndarray:
    """torch tensor / numpy array / number -> numpy array (half and bfloat16 widened to float32)."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype in (torch.bfloat16, torch.float16):
                x = x.float()
            return x.numpy()
    if isinstance(x, (int, float, np.number)):
        return np.asarray(x)
    raise StateDictError(f"{what}: expected a tensor, found {type(x).__module__}.{type(x).__name__}")


def _is_tensor(x) -> bool:
    if isinstance(x, np.ndarray):
        return True
    try:
        import torch

        return isinstance(x, torch.Tensor)
    except ImportError:  # pragma: no cover
        return False


def _shape(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _tensor_dict(sd: Any, what: str) -> dict[str, Any]:
    if not isinstance(sd, Mapping):
        raise CheckpointFormatError(f"{what}: expected a state_dict (mapping of key -> tensor), found {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not _is_tensor(v)]
    if bad:
        raise StateDictError(f"{what}: non-tensor values under keys {sorted(map(str, bad))}")
    return dict(sd)


def _layers(sd: Mapping[str, Any], prefix: str) -> dict[int, dict[str, Any]]:
    """{layer index: {param name: value}} for keys '<prefix>.<i>.<name>' (prefix '' -> '<i>.<name>')."""
    out: dict[int, dict[str, Any]] = {}
    head = prefix + "." if prefix else ""
    for k, v in sd.items():
        if not k.startswith(head):
            continue
        idx, _, name = k[len(head):].partition(".")
        if idx.isdigit() and name:
            out.setdefault(int(idx), {})[name] = v
    return out


def _mlp_shape(sd: Mapping[str, Any], prefix: str, what: str, lead: int = 0):
    """TD-MPC2 mlp layer shapes: (outs, in0, last_has_ln, lead_shape) from '<prefix>.<i>.weight' [.., out, in]."""
    layers = _layers(sd, prefix)
    head = prefix + "." if prefix else ""
    if not layers:
        raise StateDictError(f"{what}: no '{head}<i>.weight' keys found")
    n = max(layers) + 1
    for i in range(n):
        if "weight" not in layers.get(i, {}):
            raise StateDictError(f"{what}: missing key '{head}{i}.weight'")
    shapes = [_shape(layers[i]["weight"]) for i in range(n)]
    for i, s in enumerate(shapes):
        if len(s) != 2 + lead:
            raise StateDictError(f"{what}: shape mismatch for key '{head}{i}.weight': expected a {2 + lead}-d "
                                 f"{'[num_q, out, in]' if lead else '[out, in]'} matrix, found {s}")
    last = layers[n - 1]
    return [s[-2] for s in shapes], shapes[0][-1], ("ln.weight" in last or "ln.bias" in last), shapes[0][:lead]


def wmmlp_template(in_dim: int, outs: list[int], last_ln: bool, lead: tuple[int, ...] = ()) -> Params:
    """Abstract params of nets.WMMLP (optionally stacked on `lead`): hidden layers NormedLinear, last with/without LN."""

    def sds(*shape):
        return jax.ShapeDtypeStruct(tuple(lead) + shape, np.float32)

    tree, d = {}, in_dim
    for i, o in enumerate(outs):
        layer = {"kernel": sds(d, o), "bias": sds(o)}
        if i < len(outs) - 1 or last_ln:
            layer["ln"] = {"scale": sds(o), "bias": sds(o)}
        tree[str(i)] = layer
        d = o
    return tree


def stacked_params_from_named(sd: Mapping[str, Any], template: Params, what: str) -> Params:
    """Stacked params from TD-MPC2-new names '<layer>.<weight|bias|ln.weight|ln.bias>' [K, ...] (kernels [K, out, in])."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    want = {}
    for path, leaf in flat:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        name, tr = _torch_name(keys)
        s = tuple(leaf.shape)
        want[name] = (s[:-2] + (s[-1], s[-2]) if tr else s, tr)
    check_key_sets(sd, want, what)
    values = []
    for name, (shape, tr) in want.items():
        arr = to_numpy(sd[name], f"{what} '{name}'")
        if _shape(arr) != shape:
            raise StateDictError(f"{what}: shape mismatch for key '{name}': expected {shape}, found {_shape(arr)}")
        arr = arr.astype(np.float32)
        values.append(np.ascontiguousarray(np.swapaxes(arr, -1, -2) if tr else arr))
    return jax.tree_util.tree_unflatten(treedef, values)


def named_from_stacked(params: Params) -> dict[str, np.ndarray]:
    """Inverse of stacked_params_from_named, in TD-MPC2 registration order (layer, weight, bias, ln.weight, ln.bias)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    items = []
    for path, leaf in flat:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        name, tr = _torch_name(keys)
        arr = np.asarray(leaf, np.float32)
        order = (int(keys[0]), {"weight": 0, "bias": 1, "ln.weight": 2, "ln.bias": 3}[name.partition(".")[2]])
        items.append((order, name, np.ascontiguousarray(np.swapaxes(arr, -1, -2) if tr else arr)))
    return {name: arr for _, name, arr in sorted(items, key=lambda t: t[0])}


def _given_section(given: Mapping | None, section: str, kind: str | None = None) -> dict:
    """given[section], updated by the kind-specific given['<section>:<kind>'] (e.g. 'world_model:flow')."""
    out = dict((given or {}).get(section) or {})
    if kind is not None:
        out.update((given or {}).get(f"{section}:{kind}") or {})
    return {k: v for k, v in out.items() if v is not None}


def _check_given(module: str, inferred: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    for field, found in inferred.items():
        if field not in given or given[field] is None:
            continue
        want = given[field]
        if isinstance(found, tuple):
            want = tuple(int(u) for u in want)
        if want != found:
            hint = ""
            if field == "num_tasks":
                hint = "the checkpoint's task embedding has a different number of rows; use a config with the checkpoint's task set"
            raise ConfigMismatchError(module, field, want, found, hint)


# ----------------------------------------------------------------------------------------------- world model


def infer_wm_config(sd: Mapping[str, Any], given: Mapping | None = None, what: str = "world_model") -> WMConfig:
    """WMConfig from the shapes of a (native-named) world-model state dict; `given` fields are checked."""
    has_dyn = any(k.startswith("_dynamics.") for k in sd)
    has_vel = any(k.startswith("_velocity.") for k in sd)
    if has_dyn and has_vel:
        raise StateDictError(f"{what}: has both '_dynamics.*' (MLP WorldModel) and '_velocity.*' (FlowWorldModel) keys")
    if not (has_dyn or has_vel):
        raise StateDictError(f"{what}: neither '_dynamics.*' (MLP WorldModel) nor '_velocity.*' (FlowWorldModel) keys found; "
                             f"keys: {sorted(sd)[:12]}{' ...' if len(sd) > 12 else ''}")
    kind = "flow" if has_vel else "mlp"
    dyn = "_velocity" if has_vel else "_dynamics"
    g = _given_section(given, "world_model", kind)
    emb = sd.get("_task_emb.weight")
    if emb is not None:
        if len(_shape(emb)) != 2:
            raise StateDictError(f"{what}: shape mismatch for key '_task_emb.weight': expected [num_tasks, task_dim], found {_shape(emb)}")
        num_tasks, task_dim = _shape(emb)
    else:
        num_tasks, task_dim = int(g.get("num_tasks") or 1), 0
    enc_outs, enc_in, _, _ = _mlp_shape(sd, "_encoder", what)
    latent = enc_outs[-1]
    obs_dim = enc_in - task_dim
    dyn_outs, dyn_in, dyn_ln, _ = _mlp_shape(sd, dyn, what)
    action_dim = dyn_in - latent - task_dim - (1 if kind == "flow" else 0)
    rew_outs, _, _, _ = _mlp_shape(sd, "_reward", what)
    if obs_dim <= 0 or action_dim <= 0:
        raise StateDictError(f"{what}: inconsistent input widths: encoder input {enc_in}, {dyn} input {dyn_in}, latent {latent}, "
                             f"task_dim {task_dim} give obs_dim {obs_dim}, action_dim {action_dim}")
    if dyn_outs[-1] != latent:
        raise StateDictError(f"{what}: shape mismatch for key '{dyn}.{len(dyn_outs) - 1}.weight': output {dyn_outs[-1]} != latent_dim {latent} (encoder output)")
    units = tuple(dyn_outs[:-1])
    if tuple(rew_outs[:-1]) != units:
        raise StateDictError(f"{what}: the _reward hidden widths {rew_outs[:-1]} differ from the {dyn} hidden widths {list(units)}; "
                             "the reference (and WMConfig) use one `units` for both")
    inferred = dict(kind=kind, obs_dim=obs_dim, action_dim=action_dim, latent_dim=latent, task_dim=task_dim,
                    num_tasks=num_tasks, encoder_units=tuple(enc_outs[:-1]), units=units, num_bins=rew_outs[-1])
    if kind == "flow":
        inferred["velocity_head"] = "simnorm" if dyn_ln else "linear"
    _check_given(what, inferred, g)
    fields = dict(inferred)
    defaults = WMConfig()
    for f in ("simnorm_dim", "vmin", "vmax", "integrator", "substeps", "velocity_head"):
        fields.setdefault(f, g[f] if g.get(f) is not None else getattr(defaults, f))
    try:
        return WMConfig(**fields)
    except ValueError as exc:
        raise ConvertError(f"{what}: the inferred architecture is not valid: {exc} (pass the right value, e.g. --simnorm-dim)") from None


def wm_from_state_dict(sd: Mapping[str, Any], given: Mapping | None = None, what: str = "world_model") -> tuple[WMConfig, Params]:
    sd = _tensor_dict(sd, what)
    cfg = infer_wm_config(sd, given, what)
    return cfg, wm_params_from_state_dict({k: to_numpy(v, what) for k, v in sd.items()}, cfg, what=what)


def _wm_order(cfg: WMConfig) -> list[str]:
    """The reference's state_dict key order for a world model of this config."""
    keys = ["_task_emb.weight"] if cfg.task_dim > 0 else []

    def mlp(prefix, n, last_ln):
        for i in range(n):
            keys.extend(f"{prefix}.{i}.{p}" for p in ("weight", "bias"))
            if i < n - 1 or last_ln:
                keys.extend(f"{prefix}.{i}.ln.{p}" for p in ("weight", "bias"))

    mlp("_encoder", len(cfg.encoder_units) + 1, True)
    mlp(cfg.dyn_name, len(cfg.units) + 1, cfg.kind == "mlp" or cfg.velocity_head == "simnorm")
    mlp("_reward", len(cfg.units) + 1, False)
    return keys


def _ordered(sd: dict[str, np.ndarray], order: list[str] | None) -> "OrderedDict[str, np.ndarray]":
    if order and set(order) == set(sd):
        return OrderedDict((k, sd[k]) for k in order)
    return OrderedDict(sorted(sd.items()))


def wm_state_dict(cfg: WMConfig, params: Params, order: list[str] | None = None) -> "OrderedDict[str, np.ndarray]":
    sd = state_dict_from_params(params)
    return _ordered(sd, order or _wm_order(cfg))


# ----------------------------------------------------------------------------------------------- actor / critic


def infer_actor_config(sd: Mapping[str, Any], given: Mapping | None = None, what: str = "actor") -> ActorConfig:
    if "logstd" in sd or any(k.startswith("mu_net.") for k in sd):
        kind, net, ls = "gaussian", "mu_net", "logstd"
    elif "init_logstd" in sd or any(k.startswith("velocity_net.") for k in sd):
        kind, net, ls = "flow", "velocity_net", "init_logstd"
    else:
        raise StateDictError(f"{what}: neither an ActorStochasticMLP (logstd, mu_net.*) nor an ActorFlowODE "
                             f"(init_logstd, velocity_net.*); keys: {sorted(sd)[:12]}")
    g = _given_section(given, "actor", kind)
    layers = _layers(sd, net)
    lin = sorted(i for i, p in layers.items() if "weight" in p and len(_shape(p["weight"])) == 2)
    if not lin:
        raise StateDictError(f"{what}: no '{net}.<i>.weight' Linear keys found")
    for i in range(0, lin[-1] + 1, 3):
        if i not in lin:
            raise StateDictError(f"{what}: missing key '{net}.{i}.weight' (Linear layers sit at indices 0, 3, 6, ...)")
    outs = [_shape(layers[i]["weight"])[0] for i in lin]
    in0 = _shape(layers[0]["weight"])[1]
    action_dim = outs[-1]
    latent = in0 - (action_dim + 1 if kind == "flow" else 0)
    inferred = dict(kind=kind, latent_dim=latent, action_dim=action_dim, units=tuple(outs[:-1]))
    _check_given(what, inferred, g)
    if ls not in sd:
        raise StateDictError(f"{what}: missing key '{ls}'")
    fields = dict(inferred)
    for f in ("min_logstd", "integrator", "substeps", "init_logstd", "init_gain"):
        if g.get(f) is not None:
            fields[f] = g[f]
    return ActorConfig(**fields)


def actor_from_state_dict(sd, given=None, what="actor") -> tuple[ActorConfig, Params]:
    sd = _tensor_dict(sd, what)
    cfg = infer_actor_config(sd, given, what)
    return cfg, actor_params_from_state_dict({k: to_numpy(v, what) for k, v in sd.items()}, cfg, what=what)


def actor_state_dict(cfg: ActorConfig, params: Params) -> "OrderedDict[str, np.ndarray]":
    sd = state_dict_from_params(params)
    net = "mu_net" if cfg.kind == "gaussian" else "velocity_net"
    order = [cfg.logstd_name]  # a module's own parameters come before its children's in a state_dict
    for j in range(len(cfg.units) + 1):
        order += [f"{net}.{3 * j}.weight", f"{net}.{3 * j}.bias"]
        if j < len(cfg.units):
            order += [f"{net}.{3 * j + 2}.weight", f"{net}.{3 * j + 2}.bias"]
    return _ordered(sd, order)


def infer_critic_config(sd: Mapping[str, Any], given: Mapping | None = None, what: str = "critic") -> CriticConfig:
    g = _given_section(given, "critic")
    idx = sorted(int(k.split(".")[1]) for k in sd if k.startswith("params.") and k.split(".")[1].isdigit())
    if not idx:
        raise StateDictError(f"{what}: no functorch ensemble keys 'params.<i>' found; keys: {sorted(sd)[:12]}")
    n = idx[-1] + 1
    for i in range(n):
        if f"params.{i}" not in sd:
            raise StateDictError(f"{what}: missing key 'params.{i}'")
    if (n - 2) % 4:
        raise StateDictError(f"{what}: {n} stacked parameters do not form CriticMLPs (4 per hidden layer + 2)")
    s0 = _shape(sd["params.0"])
    if len(s0) != 3:
        raise StateDictError(f"{what}: shape mismatch for key 'params.0': expected [num_critics, units0, latent], found {s0}")
    units = tuple(_shape(sd[f"params.{4 * j}"])[1] for j in range((n - 2) // 4))
    inferred = dict(latent_dim=s0[2], units=units, num_critics=s0[0])
    _check_given(what, inferred, g)
    return CriticConfig(**inferred)


def critic_from_state_dict(sd, given=None, what="critic") -> tuple[CriticConfig, Params]:
    sd = _tensor_dict(sd, what)
    cfg = infer_critic_config(sd, given, what)
    return cfg, critic_params_from_state_dict({k: to_numpy(v, what) for k, v in sd.items()}, cfg, what=what)


def critic_state_dict(params: Params) -> "OrderedDict[str, np.ndarray]":
    sd = state_dict_from_params(params, ensemble=True)
    return OrderedDict(sorted(sd.items(), key=lambda kv: int(kv[0].split(".")[1])))


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


def parse_tdmpc2(obj: Mapping[str, Any], given: Mapping | None = None) -> Converted:
    sd = obj["model"]
    if not isinstance(sd, Mapping):
        raise CheckpointFormatError(f"'model' holds a {type(sd).__name__}, expected a state_dict")
    extra_top = sorted(k for k in obj if k != "model")
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
    extras: Params = {}
    info: dict = {"layout": layout}
    if pi:
        outs, in0, last_ln, _ = _mlp_shape(pi, "", "model _pi")
        if in0 != cfg.latent_dim + cfg.task_dim:
            raise StateDictError(f"model _pi: input width {in0} != latent_dim + task_dim = {cfg.latent_dim + cfg.task_dim}")
        extras["_pi"] = params_from_state_dict({k: to_numpy(v, "_pi") for k, v in pi.items()},
                                               wmmlp_template(in0, outs, last_ln), what="model _pi")
        info["pi"] = dict(in_dim=in0, units=outs[:-1], out_dim=outs[-1], last_layer="normedlinear" if last_ln else "linear",
                          input="[z, task_emb]", output="[mu (action_dim), log_std (action_dim)]")
    qs = q_old if has_old else q_new
    for name, src in qs.items():
        if src:
            extras[name] = _q_tree(cfg, src, "old" if has_old else "new", f"model {name}")
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
    conv.extras = extras or None
    conv.extras_info = info
    if extra_top:
        conv.metadata = {k: to_jsonable(obj[k], conv.notes, k) for k in extra_top}
    if cfg.num_tasks == 30 and cfg.task_dim > 0:
        from fmbpo_jax.envs.tasks import MT30_TASKS

        conv.tasks = list(MT30_TASKS)
        conv.notes.append("30 task-embedding rows: assuming TD-MPC2's MT30 task order (fmbpo_jax.envs.tasks.MT30_TASKS)")
    return conv


# ----------------------------------------------------------------------------------------------- native


def _stats_of(value, name: str) -> dict:
    from convert_ckpt.safe_load import running_mean_std_fields

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
