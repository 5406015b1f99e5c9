"""convert_ckpt.safe_load: restricted torch.load that rebuilds tensors and data stubs, executes nothing."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from convert_ckpt.safe_load import (
    SafeLoadError,
    Stub,
    UnsafePickleError,
    is_stub_of,
    running_mean_std_fields,
    safe_torch_load,
    tensordict_to_mapping,
)

FIX = Path(__file__).parent / "fixtures" / "data"
CHUNK0 = FIX / "mt30_mini_chunk_0.pt"
CHUNK1 = FIX / "mt30_mini_chunk_1.pt"

# From tests/fixtures/data/README.md
README_SHA = {
    CHUNK0: "a5cffc8218e141b27d1cd1df20dad2327260fda3a613ce77acdf24afd75fd6f3",
    CHUNK1: "d0bff81da3cfcbf8b47ecce0d658cfa5397ef658ec742907cc7e0a5cf81d4288",
}
README_TASKS = {CHUNK0: [0, 3, 4, 0, 3, 4], CHUNK1: [0, 3, 4]}
README_RETURNS = {
    CHUNK0: [142.909027, 11.228600, 227.0, 150.120728, 10.674767, 161.0],
    CHUNK1: [134.110611, 7.689528, 116.0],
}


def _content_sha(mapping):
    h = hashlib.sha256()
    for key in sorted(mapping):
        h.update(key.encode())
        h.update(mapping[key].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("path", [CHUNK0, CHUNK1])
@pytest.mark.parametrize("mmap", [False, True])
def test_fixture_chunks_load(path, mmap):
    obj = safe_torch_load(path, mmap=mmap)
    assert isinstance(obj, Stub) and is_stub_of(obj, "TensorDict")
    assert obj.stub_class.startswith("tensordict.")
    m = tensordict_to_mapping(obj)
    n = len(README_TASKS[path])
    assert set(m) == {"obs", "action", "reward", "task"}
    assert tuple(m["obs"].shape) == (n, 501, 24) and m["obs"].dtype == torch.float32
    assert tuple(m["action"].shape) == (n, 501, 6) and m["action"].dtype == torch.float32
    assert tuple(m["reward"].shape) == (n, 501) and m["reward"].dtype == torch.float32
    assert tuple(m["task"].shape) == (n, 501) and m["task"].dtype == torch.int32
    assert _content_sha(m) == README_SHA[path]
    assert m["task"][:, 0].tolist() == README_TASKS[path]
    assert bool((m["task"] == m["task"][:, :1]).all())
    returns = m["reward"][:, 1:].sum(dim=1).numpy()
    np.testing.assert_allclose(returns, README_RETURNS[path], rtol=0, atol=2e-4)
    assert bool(torch.isnan(m["reward"][:, 0]).all())
    assert not bool(torch.isnan(m["reward"][:, 1:]).any())
    assert tuple(obj.state["_batch_size"]) == (n, 501)


def test_plain_dict_file_uses_weights_only(tmp_path):
    p = tmp_path / "plain.pt"
    data = {"obs": torch.arange(6.0).reshape(1, 2, 3), "task": torch.zeros(1, 2, dtype=torch.int32)}
    torch.save(data, p)
    out = safe_torch_load(p)
    assert isinstance(out, dict) and set(out) == {"obs", "task"}
    assert torch.equal(out["obs"], data["obs"])
    assert tensordict_to_mapping(out).keys() == data.keys()


# ---------------------------------------------------------------- malicious pickles


class _SystemPayload:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _ExecPayload:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.code,))


class _EvalPayload:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.eval, (self.code,))


class _SubprocessPayload:
    def __init__(self, args):
        self.args = args

    def __reduce__(self):
        import subprocess

        return (subprocess.call, (self.args,))


def _payloads(marker: Path):
    return {
        "os.system": _SystemPayload(f"touch {marker}"),
        "builtins.exec": _ExecPayload(f"open({str(marker)!r}, 'w').write('x')"),
        "builtins.eval": _EvalPayload(f"open({str(marker)!r}, 'w').write('x')"),
        "subprocess": _SubprocessPayload(["touch", str(marker)]),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "subprocess"])
@pytest.mark.parametrize("nested", [False, True])
def test_code_execution_is_refused(tmp_path, kind, nested):
    marker = tmp_path / "PWNED"
    payload = _payloads(marker)[kind]
    obj = {"obs": torch.zeros(2, 3), "evil": payload} if nested else payload
    p = tmp_path / "evil.pt"
    torch.save(obj, p)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError) as err:
        safe_torch_load(p)
    msg = str(err.value)
    assert str(p) in msg
    expected = {"os.system": ("posix.system", "nt.system", "os.system"), "builtins.exec": ("builtins.exec",),
                "builtins.eval": ("builtins.eval",), "subprocess": ("subprocess.call",)}[kind]
    assert any(e in msg for e in expected), msg
    assert not marker.exists()


def test_arbitrary_class_is_refused_and_not_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "evilpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "things.py").write_text("class Thing:\n    def __init__(self):\n        self.x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    things = importlib.import_module("evilpkg.things")
    p = tmp_path / "thing.pt"
    torch.save({"t": things.Thing()}, p)
    marker = tmp_path / "IMPORTED"
    (pkg / "things.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Thing: pass\n")
    for name in ["evilpkg.things", "evilpkg"]:
        sys.modules.pop(name, None)
    with pytest.raises(UnsafePickleError, match=r"evilpkg\.things\.Thing"):
        safe_torch_load(p)
    assert not marker.exists()


def test_torch_functions_outside_allowlist_refused(tmp_path):
    class _LoadPayload:
        def __reduce__(self):
            return (torch.load, ("/nonexistent.pt",))

    p = tmp_path / "l.pt"
    torch.save([_LoadPayload()], p)
    with pytest.raises(UnsafePickleError, match="torch.serialization.load"):
        safe_torch_load(p)


# ---------------------------------------------------------------- RunningMeanStd stand-in


RMS_PLAIN = """
import torch
class RunningMeanStd(object):
    def __init__(self, epsilon=1e-4, shape=(), device="cpu"):
        self.mean = torch.zeros(shape, dtype=torch.float32, device=device)
        self.var = torch.ones(shape, dtype=torch.float32, device=device)
        self.count = epsilon
"""

RMS_MODULE = """
import torch
class RunningMeanStd(torch.nn.Module):
    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.count = 1e-4
"""


def _write_module(root: Path, dotted: str, source: str):
    parts = dotted.split(".")
    d = root
    for part in parts[:-1]:
        d = d / part
        d.mkdir(exist_ok=True)
        (d / "__init__.py").write_text("")
    (d / f"{parts[-1]}.py").write_text(textwrap.dedent(source))


def _forget(prefix):
    for name in list(sys.modules):
        if name == prefix or name.startswith(prefix + "."):
            del sys.modules[name]


@pytest.mark.parametrize(
    "modpath,source",
    [
        ("flow_mbpo_pwm.utils.running_mean_std", RMS_PLAIN),
        ("pwm.utils.running_mean_std", RMS_MODULE),
    ],
)
def test_running_mean_std_loads_without_import(tmp_path, monkeypatch, modpath, source):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, modpath, source)
    mod = importlib.import_module(modpath)
    rms = mod.RunningMeanStd(shape=(3,))
    rms.mean = torch.tensor([1.0, 2.0, 3.0]) if not isinstance(rms, torch.nn.Module) else rms.mean
    if isinstance(rms, torch.nn.Module):
        rms.mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    rms.var = rms.var * 4 if not isinstance(rms, torch.nn.Module) else rms.var.mul_(4)
    rms.count = 1234.5
    p = tmp_path / "ckpt.pt"
    torch.save({"obs_rms": rms, "ret_rms": None, "iter_count": 7, "actor": {"w": torch.ones(2, 2)}}, p)
    # Make importing the module detectable, then forget it: the loader must not import it.
    marker = tmp_path / "IMPORTED"
    top = modpath.split(".")[0]
    _write_module(tmp_path, modpath, f"open({str(marker)!r}, 'w').write('x')\nraise RuntimeError('imported')\n")
    _forget(top)
    out = safe_torch_load(p)
    assert not marker.exists()
    assert top not in sys.modules
    assert out["ret_rms"] is None and out["iter_count"] == 7
    assert torch.equal(out["actor"]["w"], torch.ones(2, 2))
    assert is_stub_of(out["obs_rms"], "RunningMeanStd")
    assert out["obs_rms"].stub_class == f"{modpath}.RunningMeanStd"
    f = running_mean_std_fields(out["obs_rms"])
    assert torch.equal(f["mean"], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(f["var"], torch.full((3,), 4.0))
    assert f["count"] == 1234.5


def test_running_mean_std_from_other_module_name_refused(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "notrms.stats", RMS_PLAIN)
    mod = importlib.import_module("notrms.stats")
    p = tmp_path / "x.pt"
    torch.save(mod.RunningMeanStd(), p)
    _forget("notrms")
    with pytest.raises(UnsafePickleError, match=r"notrms\.stats\.RunningMeanStd"):
        safe_torch_load(p)


# ---------------------------------------------------------------- old tensordict layout


OLD_TD = """
class TensorDict(object):
    def __init__(self, source, batch_size):
        self._tensordict = dict(source)
        self._batch_size = batch_size
        self._is_shared = False
        self._is_memmap = False
        self._device = None
"""


def test_old_tensordict_layout_and_nesting(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "tensordict.tensordict", OLD_TD)
    _forget("tensordict")
    try:
        mod = importlib.import_module("tensordict.tensordict")
        inner = mod.TensorDict({"x": torch.ones(2, 3)}, torch.Size([2]))
        td = mod.TensorDict({"obs": torch.arange(4.0).reshape(2, 2), "nested": inner}, torch.Size([2]))
        p = tmp_path / "old.pt"
        torch.save(td, p)
    finally:
        _forget("tensordict")
    out = safe_torch_load(p)
    assert "tensordict" not in sys.modules
    m = tensordict_to_mapping(out)
    assert set(m) == {"obs", "nested.x"}
    assert torch.equal(m["obs"], torch.arange(4.0).reshape(2, 2))
    assert torch.equal(m["nested.x"], torch.ones(2, 3))


def test_dict_layout_variant():
    from convert_ckpt.safe_load import _stub_class

    obj = _stub_class("tensordict._td", "TensorDict")()
    obj.__setstate__({"_dict": {"a": torch.zeros(1)}, "batch_size": torch.Size([1])})
    assert set(tensordict_to_mapping(obj)) == {"a"}


# ---------------------------------------------------------------- broken files


def test_truncated_file(tmp_path):
    data = CHUNK1.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 100):
        p = tmp_path / f"trunc_{cut}.pt"
        p.write_bytes(data[:cut])
        with pytest.raises(SafeLoadError):
            safe_torch_load(p)


def test_random_bytes_and_empty(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "rand.pt"
    p.write_bytes(rng.bytes(4096))
    with pytest.raises(SafeLoadError, match="not a PyTorch zip"):
        safe_torch_load(p)
    e = tmp_path / "empty.pt"
    e.write_bytes(b"")
    with pytest.raises(SafeLoadError, match="empty"):
        safe_torch_load(e)
    with pytest.raises(SafeLoadError, match="no such file"):
        safe_torch_load(tmp_path / "missing.pt")


def test_legacy_non_zip_refused(tmp_path):
    p = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(1)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(SafeLoadError):
        safe_torch_load(p)


def test_running_mean_std_fields_errors():
    with pytest.raises(SafeLoadError):
        running_mean_std_fields(None)
    with pytest.raises(SafeLoadError, match="lacks"):
        running_mean_std_fields({"mean": 1})
    assert running_mean_std_fields({"mean": 1, "var": 2, "count": 3}) == {"mean": 1, "var": 2, "count": 3}
