"""One module's PyTorch state_dict <-> our params, with its architecture inferred from tensor shapes.

`wm_from_state_dict`, `actor_from_state_dict`, `critic_from_state_dict` read the world model (MLP or flow), the
actor (Gaussian or flow) and the critic ensemble; `wm_state_dict`, `actor_state_dict`, `critic_state_dict` go back.
`given` (facts from the user or a config) is checked against the shapes field by field and supplies what shapes
cannot tell (SimNorm group, bins range, integrator, ...). The layouts around them (TD-MPC2, native): formats.py.
No torch import at module level: arrays may be torch tensors or numpy arrays.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import jax
import numpy as np

from convert_ckpt.errors import CheckpointFormatError, ConfigMismatchError, ConvertError, StateDictError
from convert_ckpt.torch_mapping import (
    _torch_name,  # the one key rule
    actor_params_from_state_dict,
    check_key_sets,
    critic_params_from_state_dict,
    state_dict_from_params,
    wm_params_from_state_dict,
)
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.world_model import WMConfig

Params = dict[str, Any]

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
