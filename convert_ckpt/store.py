"""Converted checkpoints on disk: the project's bundle directories (`fmbpo_jax.bundle`), under the converter's
error types, and PyTorch .pt files written back from them.

    DST/
      manifest.json   what is inside: modules and their configs, sizes, tasks, preset, source file + SHA-256
      params/         orbax checkpoint of {'world_model', 'actor', 'critic', 'tdmpc2_extras', 'running_stats'}

The format itself (atomic writes, the manifest, shape checks on reading) is `fmbpo_jax.bundle`'s; here its
errors become the converter's (`ConvertError`, `CheckpointFormatError`), which the CLI reports.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from convert_ckpt.errors import CheckpointFormatError, ConvertError
from convert_ckpt.formats import Converted, torch_objects
from fmbpo_jax import bundle
from fmbpo_jax.bundle import build_manifest
from fmbpo_jax.bundle import is_bundle_dir as is_converted_dir


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def converter_errors():
    """A bundle error as the converter's own: a bad manifest is a CheckpointFormatError, the rest ConvertError."""
    try:
        yield
    except bundle.BundleFormatError as exc:
        raise CheckpointFormatError(str(exc), with_layouts=False) from None
    except bundle.BundleError as exc:
        raise ConvertError(str(exc)) from None


def write_converted(conv: Converted, dst: str | os.PathLike, source: dict | None = None, overwrite: bool = False) -> dict:
    """Write `conv` to the directory dst atomically; returns the manifest."""
    with converter_errors():
        return bundle.write_bundle(conv, dst, source, overwrite)


def read_manifest(path: str | os.PathLike) -> dict:
    with converter_errors():
        return bundle.read_manifest(path)


def read_converted(path: str | os.PathLike) -> Converted:
    """Restore a directory written by write_converted (numpy float32 leaves), shapes checked against the manifest."""
    with converter_errors():
        return bundle.read_bundle(path)


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
           "build_manifest"]
