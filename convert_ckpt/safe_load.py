"""Restricted loading of PyTorch ``.pt`` zip files: rebuild tensors and plain data, execute nothing.

``torch.load(weights_only=False)`` runs arbitrary code from the pickle (any global it names is
imported and called). The files we read -- TD-MPC2's MT30 dataset chunks (pickled TensorDicts)
and PWM / Flow-MBPO checkpoints (which pickle ``RunningMeanStd`` objects) -- need a little more than
``weights_only=True`` allows, but nothing that has to execute foreign code. This module:

1. tries ``torch.load(path, weights_only=True)`` (torch's own safe unpickler); if that is enough,
   its result is returned;
2. otherwise unpickles with :class:`_RestrictedUnpickler`, whose ``find_class`` resolves only

   * the globals torch needs to rebuild tensors/storages/dtypes/devices/sizes (torch's own
     weights-only allow-list, restricted to ``torch.*``, ``collections``, ``builtins`` and
     ``_codecs``), a few numpy array-rebuild helpers;
   * a small allow-list of known *data* classes -- tensordict's ``TensorDict`` (and its pickling
     helpers) and the reference's ``RunningMeanStd`` from any module whose path ends in
     ``running_mean_std`` -- which are never imported: a :class:`Stub` records the class name
     and the pickled state (``__setstate__`` argument / ``__dict__`` / constructor args) as data;

   and raises :class:`UnsafePickleError` naming the global and the file for everything else.

Public API: :func:`safe_torch_load`, :class:`UnsafePickleError`, :class:`Stub`,
:func:`tensordict_to_mapping`, :func:`running_mean_std_fields`.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import types
import zipfile
from typing import Any

__all__ = [
    "SafeLoadError",
    "UnsafePickleError",
    "Stub",
    "safe_torch_load",
    "tensordict_to_mapping",
    "running_mean_std_fields",
    "is_stub_of",
]


class SafeLoadError(Exception):
    """The file could not be loaded (not a torch zip file, truncated, corrupt, unexpected layout)."""


class UnsafePickleError(SafeLoadError, pickle.UnpicklingError):
    """The pickle names a global that is not on the allow-list; nothing was executed."""


# --------------------------------------------------------------------------------------------
# Stubs for known data classes
# --------------------------------------------------------------------------------------------


class Stub:
    """Plain stand-in for an instance of a known data class that is not imported.

    Attributes:
      stub_class: ``"module.QualName"`` of the pickled class.
      args: positional args given to the class (``REDUCE``/``NEWOBJ``/``_make_td``).
      state: the object passed to ``__setstate__`` (``BUILD``), usually the ``__dict__``.
      items / listitems: dict/list items appended by the pickle (rare).
    """

    _stub_module = "?"
    _stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["args"] = tuple(args)
        obj.__dict__["kwargs"] = dict(kwargs)
        obj.__dict__["state"] = None
        obj.__dict__["items"] = {}
        obj.__dict__["listitems"] = []
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args): args already recorded in __new__
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    # dict-like/list-like pickles (SETITEM(S)/APPEND(S) on the instance)
    def __setitem__(self, key, value):
        self.__dict__["items"][key] = value

    def append(self, value):
        self.__dict__["listitems"].append(value)

    def extend(self, values):
        self.__dict__["listitems"].extend(values)

    @property
    def stub_class(self) -> str:
        return f"{type(self)._stub_module}.{type(self)._stub_name}"

    def __repr__(self) -> str:
        keys = sorted(self.state) if isinstance(self.state, dict) else type(self.state).__name__
        return f"Stub({self.stub_class}, args={len(self.args)}, state={keys})"


_STUB_CLASSES: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUB_CLASSES:
        _STUB_CLASSES[key] = type(
            f"Stub[{name}]", (Stub,), {"_stub_module": module, "_stub_name": name, "__module__": __name__}
        )
    return _STUB_CLASSES[key]


def is_stub_of(obj: Any, name: str) -> bool:
    """True when ``obj`` is a :class:`Stub` whose class name (last component) equals ``name``."""
    return isinstance(obj, Stub) and type(obj)._stub_name == name


# tensordict classes that are plain data containers (old and new module paths).
_TENSORDICT_CLASSES = {
    "TensorDict",
    "_SubTensorDict",
    "SubTensorDict",
    "LazyStackedTensorDict",
    "_LazyStackedTensorDict",
    "NonTensorData",
    "NonTensorStack",
    "MemoryMappedTensor",
    "_StringKeys",
    "_StringOnlyDict",
}


def _is_tensordict_module(module: str) -> bool:
    return module == "tensordict" or module.startswith("tensordict.")


def _is_running_mean_std(module: str, name: str) -> bool:
    return name == "RunningMeanStd" and (module == "running_mean_std" or module.endswith(".running_mean_std"))


# Functions that tensordict's pickles call to rebuild a TensorDict. They are replaced by safe
# stand-ins returning Stubs.
def _make_td_stub(cls, state):
    """Stand-in for ``tensordict._reductions._make_td(cls, state)``."""
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise UnsafePickleError(f"_make_td called with a non-allow-listed class {cls!r}")
    obj = cls()
    obj.__setstate__(state)
    return obj


def _rebuild_tensordict_files_stub(*args, **kwargs):
    """Stand-in for tensordict's ``_rebuild_tensordict_files*`` helpers (shared-memory pickles)."""
    obj = _stub_class("tensordict._reductions", "_rebuild_tensordict_files")(*args, **kwargs)
    return obj


def _safe_reconstructor(cls, base, state):
    """Stand-in for ``copyreg._reconstructor`` (protocol 0/1 object pickles): Stub classes only."""
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise UnsafePickleError(f"copyreg._reconstructor called with non-allow-listed class {cls!r}")
    obj = cls()
    if state is not None:
        obj.__dict__["args"] = (state,)
    return obj


def _safe_newobj(cls, *args):
    """Stand-in for ``copyreg.__newobj__``: Stub classes only."""
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise UnsafePickleError(f"copyreg.__newobj__ called with non-allow-listed class {cls!r}")
    return cls.__new__(cls, *args)


# --------------------------------------------------------------------------------------------
# Allow-list
# --------------------------------------------------------------------------------------------

_ALLOWED_PREFIXES = ("torch.", "collections.", "builtins.", "_codecs.")
_EXTRA_ALLOWED = {
    # numpy arrays/scalars inside checkpoints (e.g. a RunningMeanStd holding numpy arrays)
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "slice"),
    ("builtins", "frozenset"),
    ("builtins", "range"),
}


def _allowed_globals() -> dict[str, Any]:
    import torch  # noqa: F401  (needed to resolve the objects)

    out: dict[str, Any] = {}
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        for key, obj in _get_allowed_globals().items():
            if key.startswith(_ALLOWED_PREFIXES):
                out[key] = obj
    except Exception:  # pragma: no cover - private torch API changed
        pass
    return out


def _resolve_extra(module: str, name: str):
    import importlib

    mod = importlib.import_module(module)
    return getattr(mod, name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only returns allow-listed objects or Stub classes."""

    _filename = "<unknown>"
    _allowed: dict[str, Any] = {}

    def find_class(self, module: str, name: str):  # noqa: D401
        # protocol-2 pickles (torch's default) name Python-2 modules (__builtin__, copy_reg);
        # map them like pickle.Unpickler(fix_imports=True) does before checking the allow-list.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        if key in self._allowed:
            return self._allowed[key]
        if (module, name) in _EXTRA_ALLOWED:
            try:
                return _resolve_extra(module, name)
            except (ImportError, AttributeError) as exc:
                raise UnsafePickleError(f"{self._filename}: cannot resolve allowed global {key}: {exc}") from None
        if module == "copyreg" and name == "_reconstructor":
            return _safe_reconstructor
        if module == "copyreg" and name == "__newobj__":
            return _safe_newobj
        if _is_tensordict_module(module):
            if name == "_make_td":
                return _make_td_stub
            if name.startswith("_rebuild_tensordict_files"):
                return _rebuild_tensordict_files_stub
            if name in _TENSORDICT_CLASSES:
                return _stub_class(module, name)
        if _is_running_mean_std(module, name):
            return _stub_class(module, name)
        raise UnsafePickleError(
            f"{self._filename}: refusing to load forbidden global '{key}' "
            "(safe_torch_load only rebuilds tensors, TensorDicts and RunningMeanStd; nothing was executed)"
        )


def _make_pickle_module(filename: str) -> types.ModuleType:
    """A module object torch.load can use as ``pickle_module`` (it only uses ``.Unpickler``)."""
    allowed = _allowed_globals()

    class Unpickler(_RestrictedUnpickler):
        _filename = filename
        _allowed = allowed

    def _refuse(*_a, **_k):  # torch's legacy (non-zip) path would call pickle_module.load
        raise SafeLoadError(f"{filename}: legacy (non-zip) torch files are not supported")

    mod = types.ModuleType("fmbpo_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = _refuse
    mod.loads = _refuse
    mod.__version__ = "restricted"
    return mod


# --------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------


def _check_zip(path: str) -> None:
    if not os.path.isfile(path):
        raise SafeLoadError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise SafeLoadError(f"{path}: empty file")
    if not zipfile.is_zipfile(path):
        raise SafeLoadError(
            f"{path}: not a PyTorch zip archive (truncated, corrupt, random bytes or a legacy torch file); "
            f"size {size} bytes"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SafeLoadError(f"{path}: corrupt zip archive: {exc}") from None
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise SafeLoadError(f"{path}: zip archive without data.pkl: not a torch.save file")
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnsafePickleError(f"{path}: TorchScript archive (contains code); refusing to load")


def safe_torch_load(path: str | os.PathLike, *, mmap: bool = False, try_weights_only: bool = True) -> Any:
    """Load a ``torch.save`` zip file without executing code from it.

    Returns the object tree: dict / list / tuple / torch tensors / numpy arrays / primitives /
    :class:`Stub` (for TensorDicts and RunningMeanStd objects).

    Args:
      path: the ``.pt`` file.
      mmap: memory-map tensor storages instead of reading them (for the 13 GB dataset chunks).
      try_weights_only: first try ``torch.load(weights_only=True)``.

    Raises:
      UnsafePickleError: the pickle names a global outside the allow-list (message names it).
      SafeLoadError: not a torch zip file, truncated, corrupt.
    """
    import torch

    path = os.fspath(path)
    _check_zip(path)
    if try_weights_only:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            pass  # needs more than weights_only: fall back to the restricted unpickler
        except Exception as exc:  # corrupt storage records etc.
            raise SafeLoadError(f"{path}: cannot load: {type(exc).__name__}: {exc}") from None
    module = _make_pickle_module(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module, mmap=mmap)
    except UnsafePickleError:
        raise
    except SafeLoadError:
        raise
    except Exception as exc:
        # an UnsafePickleError raised inside torch may be wrapped; unwrap it
        cause = exc
        while cause is not None:
            if isinstance(cause, UnsafePickleError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise SafeLoadError(f"{path}: cannot load: {type(exc).__name__}: {exc}") from None


def safe_torch_loads(data: bytes, name: str = "<bytes>") -> Any:
    """Like :func:`safe_torch_load` for in-memory bytes (writes nothing)."""
    import torch

    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise SafeLoadError(f"{name}: not a PyTorch zip archive")
    module = _make_pickle_module(name)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=module)


# --------------------------------------------------------------------------------------------
# Helpers for the stubs
# --------------------------------------------------------------------------------------------


def _is_tensor_like(x: Any) -> bool:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return True
    except ImportError:  # pragma: no cover
        pass
    import numpy as np

    return isinstance(x, np.ndarray)


_TD_CONTAINER_KEYS = ("_tensordict", "_dict", "tensordict", "_source")


def _td_container(obj: Any) -> Any:
    """Find the key->value container of a (stubbed) TensorDict in any known layout."""
    if isinstance(obj, Stub):
        candidates = []
        if isinstance(obj.state, dict):
            candidates.append(obj.state)
        elif isinstance(obj.state, tuple):  # (dict_state, slots_state)
            candidates.extend(s for s in obj.state if isinstance(s, dict))
        candidates.extend(a for a in obj.args if isinstance(a, dict))
        if obj.items:
            candidates.append(obj.items)
        for cand in candidates:
            for key in _TD_CONTAINER_KEYS:
                if key in cand:
                    inner = cand[key]
                    if isinstance(inner, Stub):  # e.g. a _StringKeys / _StringOnlyDict wrapper
                        return _td_container(inner)
                    return inner
        # _StringOnlyDict-like stubs: data lives in items or a dict arg
        if obj.items:
            return obj.items
        for cand in candidates:
            if cand and all(isinstance(k, str) for k in cand) and any(
                _is_tensor_like(v) or isinstance(v, Stub) for v in cand.values()
            ):
                return cand
        raise SafeLoadError(f"cannot find the tensors of {obj!r}")
    if isinstance(obj, dict):
        return obj
    raise SafeLoadError(f"not a TensorDict or mapping: {type(obj).__name__}")


def tensordict_to_mapping(obj: Any, *, sep: str = ".") -> dict[str, Any]:
    """Rebuild the key -> tensor mapping of a stubbed (or plain-dict) TensorDict.

    Nested TensorDicts are flattened with ``sep`` (``"a.b"``). Non-tensor leaves (e.g. NonTensorData)
    are returned as their stub/data. Works on the layouts of old (``__dict__`` state with
    ``_tensordict``) and new (``_make_td(cls, {"_tensordict": ...})``) tensordict versions, and on
    plain ``dict`` chunks.
    """
    container = _td_container(obj)
    out: dict[str, Any] = {}
    for key, value in container.items():
        if not isinstance(key, str):
            key = sep.join(map(str, key)) if isinstance(key, tuple) else str(key)
        if (isinstance(value, Stub) and type(value)._stub_name in {"TensorDict", "_SubTensorDict", "SubTensorDict"}) or (
            isinstance(value, dict) and not _is_tensor_like(value)
        ):
            for sub_key, sub_value in tensordict_to_mapping(value, sep=sep).items():
                out[f"{key}{sep}{sub_key}"] = sub_value
        else:
            out[key] = value
    return out


def tensordict_batch_size(obj: Any) -> tuple[int, ...] | None:
    """The recorded batch size of a stubbed TensorDict, or None."""
    if isinstance(obj, Stub) and isinstance(obj.state, dict):
        bs = obj.state.get("_batch_size", obj.state.get("batch_size"))
        if bs is not None:
            return tuple(int(x) for x in bs)
    return None


def running_mean_std_fields(obj: Any) -> dict[str, Any]:
    """``dict(mean=..., var=..., count=...)`` of a stubbed (or plain-dict) RunningMeanStd.

    Accepts the plain-object layout (``__dict__`` with mean/var/count) and the ``nn.Module`` layout
    (mean/var in ``_buffers`` or ``_parameters``, count in ``__dict__`` or ``_buffers``).
    """
    if obj is None:
        raise SafeLoadError("RunningMeanStd is None")
    if isinstance(obj, Stub):
        state = obj.state
        if isinstance(state, tuple):
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if not isinstance(state, dict):
            raise SafeLoadError(f"RunningMeanStd stub without a state dict: {obj!r}")
    elif isinstance(obj, dict):
        state = obj
    else:
        raise SafeLoadError(f"not a RunningMeanStd: {type(obj).__name__}")
    flat = dict(state)
    for sub in ("_buffers", "_parameters"):
        if isinstance(state.get(sub), dict):
            for k, v in state[sub].items():
                flat.setdefault(k, v)
    missing = [k for k in ("mean", "var", "count") if k not in flat]
    if missing:
        raise SafeLoadError(f"RunningMeanStd state lacks {missing}; has {sorted(flat)}")
    return {"mean": flat["mean"], "var": flat["var"], "count": flat["count"]}
