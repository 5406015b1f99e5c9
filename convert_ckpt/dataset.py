"""Convert MT30 dataset chunks (TD-MPC2 ``chunk_*.pt``) into the per-task store of ``fmbpo_jax.data``.

    python -m convert_ckpt dataset --src /data/mt30 --dst /data/mt30_store [--tasks walker-stand 3 ...]

* ``--src``: directories (every ``*.pt`` inside, sorted by name, like TD-MPC2's loader) and/or files.
* Chunks are read one at a time with :func:`convert_ckpt.safe_load.safe_torch_load` (memory-mapped,
  executes nothing; no ``tensordict`` needed). A chunk is either a pickled TensorDict or a plain
  dict with the keys ``obs``/``action``/``reward``/``task`` (what ``fmbpo_jax.data.generate`` writes).
* Every chunk is fully validated before any of it is written: keys, shapes, dtypes, episode length,
  task id constant along each episode and inside the MT30 task set, no NaN/inf in ``obs`` nor in
  ``action``/``reward`` at t >= 1 (index 0 is TD-MPC2's filler: NaN there is expected and recorded).
* Output is written to a temp directory and renamed at the end; appending to an existing store
  writes a new data directory and switches ``index.json`` atomically (see ``fmbpo_jax.data.store``).
  A source whose file SHA-256 or content SHA-256 is already in the store is refused.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from fmbpo_jax.data.store import (
    DEFAULT_EPISODE_LENGTH,
    MT30_TASKS,
    Store,
    StoreError,
    StoreWriter,
    resolve_tasks,
    task_dims,
)

from .safe_load import SafeLoadError, Stub, safe_torch_load, tensordict_to_mapping

__all__ = [
    "DatasetError",
    "CHUNK_KEYS",
    "find_sources",
    "load_chunk",
    "validate_chunk",
    "file_sha256",
    "content_sha256",
    "convert",
    "add_dataset_parser",
    "run_dataset",
    "main",
]

CHUNK_KEYS = ("obs", "action", "reward", "task")
_BLOCK = 1024  # episodes per processing block (bounds temporaries: ~64 MB of obs per block)


class DatasetError(StoreError):
    """A source file is not a valid MT30 chunk, or the conversion request is invalid."""


# --------------------------------------------------------------------------------------------
# Reading and checking one chunk
# --------------------------------------------------------------------------------------------


def find_sources(src: Sequence[str] | str) -> list[str]:
    """Files and directories -> list of ``.pt`` files (directories: sorted ``*.pt``)."""
    if isinstance(src, (str, os.PathLike)):
        src = [src]
    out: list[str] = []
    for s in src:
        s = os.fspath(s)
        if os.path.isdir(s):
            files = sorted(glob.glob(os.path.join(s, "*.pt")))
            if not files:
                raise DatasetError(f"{s}: directory holds no *.pt files")
            out.extend(files)
        elif os.path.isfile(s):
            out.append(s)
        else:
            raise DatasetError(f"{s}: no such file or directory")
    seen = set()
    for f in out:
        real = os.path.realpath(f)
        if real in seen:
            raise DatasetError(f"{f}: given twice")
        seen.add(real)
    return out


def _to_numpy(x, key: str, path: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, np.ndarray):
        return x
    raise DatasetError(f"{path}: key {key!r} is a {type(x).__name__}, not a tensor")


def load_chunk(path: str, mmap: bool = True) -> dict[str, np.ndarray]:
    """Load one chunk file as ``{obs, action, reward, task}`` numpy arrays (views of a mmap when possible).

    ``reward`` [N, L, 1] is squeezed to [N, L]. Raises DatasetError for anything that is not a chunk.
    """
    try:
        obj = safe_torch_load(path, mmap=mmap)
    except SafeLoadError as exc:
        raise DatasetError(f"{path}: not a loadable chunk: {exc}") from None
    if isinstance(obj, Stub) or isinstance(obj, dict):
        try:
            mapping = tensordict_to_mapping(obj)
        except SafeLoadError as exc:
            raise DatasetError(f"{path}: not a chunk ({exc})") from None
    else:
        raise DatasetError(f"{path}: not a chunk: holds a {type(obj).__name__}, expected a TensorDict or dict")
    missing = [k for k in CHUNK_KEYS if k not in mapping]
    if missing:
        raise DatasetError(f"{path}: not a chunk: missing keys {missing} (has {sorted(mapping)})")
    out = {k: _to_numpy(mapping[k], k, path) for k in CHUNK_KEYS}
    if out["reward"].ndim == 3 and out["reward"].shape[-1] == 1:
        out["reward"] = out["reward"][..., 0]
    return out


def _shape_check(arrays: dict[str, np.ndarray], path: str, episode_length: int | None) -> tuple[int, int, int, int]:
    obs, action, reward, task = (arrays[k] for k in CHUNK_KEYS)
    if obs.ndim != 3:
        raise DatasetError(f"{path}: obs has shape {obs.shape}, expected [N, L, obs_dim]")
    n, L, do = obs.shape
    if action.ndim != 3 or action.shape[:2] != (n, L):
        raise DatasetError(f"{path}: action has shape {action.shape}, expected [{n}, {L}, action_dim]")
    da = action.shape[2]
    if reward.shape != (n, L):
        raise DatasetError(f"{path}: reward has shape {reward.shape}, expected [{n}, {L}]")
    if task.shape != (n, L):
        raise DatasetError(f"{path}: task has shape {task.shape}, expected [{n}, {L}]")
    for k in ("obs", "action", "reward"):
        if arrays[k].dtype != np.float32:
            raise DatasetError(f"{path}: {k} has dtype {arrays[k].dtype}, expected float32")
    if not np.issubdtype(task.dtype, np.integer):
        raise DatasetError(f"{path}: task has dtype {task.dtype}, expected an integer type")
    if n == 0:
        raise DatasetError(f"{path}: chunk holds no episodes")
    if episode_length is not None and L != episode_length:
        raise DatasetError(f"{path}: wrong episode length {L}, expected {episode_length}")
    if L < 2:
        raise DatasetError(f"{path}: episode length {L} is too short")
    if do != 24 or da != 6:
        raise DatasetError(f"{path}: obs/action dims {do}/{da}, expected the MT30 padded dims 24/6")
    return n, L, do, da


def _count_nonfinite(rep: dict, key: str, x: np.ndarray, b0: int) -> None:
    """Add the NaN/inf values of a block of episodes x [n, ...] (first episode b0) to rep['nan_<key>_*']."""
    nf = ~np.isfinite(x)
    if nf.any():
        per_ep = nf.reshape(x.shape[0], -1).sum(axis=1)
        rep[f"nan_{key}_values"] += int(per_ep.sum())
        rep[f"nan_{key}_episodes"].extend((b0 + np.nonzero(per_ep)[0]).tolist())


def _raise_bad_episodes(rep: dict, ep_task: np.ndarray, task, path: str) -> None:
    """DatasetError for what the scan of a chunk found: a task id changing within an episode, outside MT30, NaN/inf."""
    n_tasks = len(MT30_TASKS)
    if rep["nonconst"]:
        e = rep["nonconst"][0]
        vals = sorted(set(np.asarray(task[e]).tolist()))
        raise DatasetError(
            f"{path}: task id is not constant along episode {e} (values {vals[:8]}); "
            f"{len(rep['nonconst'])} such episode(s): {rep['nonconst'][:10]}"
        )
    outside = np.nonzero((ep_task < 0) | (ep_task >= n_tasks))[0]
    if outside.size:
        raise DatasetError(
            f"{path}: task id {int(ep_task[outside[0]])} of episode {int(outside[0])} is outside the MT30 task set "
            f"0..{n_tasks - 1}; {outside.size} such episode(s): {outside[:10].tolist()}"
        )
    for key, label in (("obs", "obs"), ("act", "action[:, 1:]"), ("rew", "reward[:, 1:]")):
        if rep[f"nan_{key}_values"]:
            eps = rep[f"nan_{key}_episodes"]
            raise DatasetError(
                f"{path}: {rep[f'nan_{key}_values']} NaN/inf value(s) in {label} in {len(eps)} episode(s), "
                f"first episodes {eps[:10]} (NaN is only allowed in the index-0 filler action/reward)"
            )


def validate_chunk(arrays: dict[str, np.ndarray], path: str, episode_length: int | None = DEFAULT_EPISODE_LENGTH) -> dict:
    """Check one loaded chunk; return a report (per-episode task ids, index-0 and padding statistics).

    Raises DatasetError naming the file, the episode indices and counts.
    """
    n, L, do, da = _shape_check(arrays, path, episode_length)
    obs, action, reward, task = (arrays[k] for k in CHUNK_KEYS)
    ep_task = np.empty(n, np.int64)
    rep = {
        "nonconst": [], "nan_obs_values": 0, "nan_obs_episodes": [], "nan_act_values": 0, "nan_act_episodes": [],
        "nan_rew_values": 0, "nan_rew_episodes": [],
    }
    index0 = {"reward_nan": 0, "reward_finite": 0, "action_nan": 0, "action_finite": 0}
    obs_pad_nonzero = 0
    act_pad_nonzero = 0
    n_tasks = len(MT30_TASKS)
    obs_lim = np.array([task_dims(t)[0] for t in range(n_tasks)])
    act_lim = np.array([task_dims(t)[1] for t in range(n_tasks)])
    for b0 in range(0, n, _BLOCK):
        b1 = min(n, b0 + _BLOCK)
        tk = np.asarray(task[b0:b1])
        first = tk[:, 0]
        bad = np.nonzero((tk != first[:, None]).any(axis=1))[0]
        rep["nonconst"].extend((b0 + bad).tolist())
        ep_task[b0:b1] = first
        o, a, r = np.asarray(obs[b0:b1]), np.asarray(action[b0:b1]), np.asarray(reward[b0:b1])
        _count_nonfinite(rep, "obs", o, b0)
        _count_nonfinite(rep, "act", a[:, 1:], b0)
        _count_nonfinite(rep, "rew", r[:, 1:], b0)
        index0["reward_nan"] += int(np.isnan(r[:, 0]).sum())
        index0["reward_finite"] += int(np.isfinite(r[:, 0]).sum())
        index0["action_nan"] += int(np.isnan(a[:, 0]).sum())
        index0["action_finite"] += int(np.isfinite(a[:, 0]).sum())
        # padding statistics (recorded, not enforced: the released files' padding is unverified, A3)
        valid = (first >= 0) & (first < n_tasks)
        if valid.any():
            ft = np.clip(first, 0, n_tasks - 1)
            omask = (np.arange(do)[None, :] >= obs_lim[ft][:, None]) & valid[:, None]
            amask = (np.arange(da)[None, :] >= act_lim[ft][:, None]) & valid[:, None]
            obs_pad_nonzero += int(((o != 0) & omask[:, None, :]).sum())
            act_pad_nonzero += int(((a[:, 1:] != 0) & amask[:, None, :]).sum())
    _raise_bad_episodes(rep, ep_task, task, path)
    return {
        "episodes": n,
        "episode_length": L,
        "obs_dim": do,
        "action_dim": da,
        "episode_task": ep_task,
        "index0": index0,
        "obs_padding_nonzero": obs_pad_nonzero,
        "action_padding_nonzero": act_pad_nonzero,
    }


def file_sha256(path: str, bufsize: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the keys in sorted order: key name + raw tensor bytes (the fixture README's recipe)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = arrays[key]
        h.update(key.encode())
        n = arr.shape[0] if arr.ndim else 1
        if arr.ndim == 0:
            h.update(np.ascontiguousarray(arr).tobytes())
            continue
        for b0 in range(0, n, _BLOCK):
            h.update(memoryview(np.ascontiguousarray(arr[b0 : b0 + _BLOCK])).cast("B"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def convert(
    src: Sequence[str] | str,
    dst: str,
    *,
    tasks: Iterable[int | str] | None = None,
    episode_length: int | None = DEFAULT_EPISODE_LENGTH,
    mmap: bool = True,
    log: Callable[[str], None] | None = print,
) -> Store:
    """Convert chunk files into (or append them to) the store at ``dst``; return the opened store.

    ``episode_length``: the required episode length (501 for MT30; None = take it from the first
    chunk, or from the existing store when appending).
    """
    log = log or (lambda _msg: None)
    files = find_sources(src)
    task_filter = resolve_tasks(tasks)
    t0 = time.time()
    with StoreWriter(dst, episode_length=episode_length, task_filter=task_filter) as writer:
        if episode_length is None:
            episode_length = writer.index["episode_length"]
        keep_filter = writer.task_filter
        for path in files:
            name = os.path.basename(path)
            sha = file_sha256(path)
            if sha in writer.known_hashes:
                raise DatasetError(
                    f"{path}: already converted (same file SHA-256 as source {writer.known_hashes[sha]!r} in {dst}); refusing"
                )
            arrays = load_chunk(path, mmap=mmap)
            report = validate_chunk(arrays, path, episode_length)
            if episode_length is None:
                episode_length = report["episode_length"]
            writer.check_dims(report["episode_length"], report["obs_dim"], report["action_dim"], path)
            csha = content_sha256(arrays)
            ep_task = report["episode_task"]
            per_task = {int(t): int(c) for t, c in zip(*np.unique(ep_task, return_counts=True))}
            kept = [t for t in sorted(per_task) if keep_filter is None or t in keep_filter]
            skipped = sum(c for t, c in per_task.items() if t not in kept)
            meta = {
                "path": os.path.abspath(path),
                "bytes": os.path.getsize(path),
                "chunk_episodes": int(report["episodes"]),
                "chunk_per_task": {str(t): c for t, c in per_task.items()},
                "skipped_episodes": int(skipped),
                "index0": report["index0"],
                "obs_padding_nonzero": report["obs_padding_nonzero"],
                "action_padding_nonzero": report["action_padding_nonzero"],
            }
            sidx = writer.begin_source(name, sha, csha, meta)
            for tid in kept:
                idx = np.nonzero(ep_task == tid)[0]
                for b0 in range(0, idx.size, _BLOCK):
                    sel = idx[b0 : b0 + _BLOCK]
                    if sel[-1] - sel[0] == sel.size - 1:  # contiguous run: a slice, no fancy-index copy
                        sl = slice(int(sel[0]), int(sel[-1]) + 1)
                        o, a, r = arrays["obs"][sl], arrays["action"][sl], arrays["reward"][sl]
                    else:
                        o, a, r = arrays["obs"][sel], arrays["action"][sel], arrays["reward"][sel]
                    writer.add_episodes(sidx, tid, o, a, r)
            summary = ", ".join(f"{MT30_TASKS[t]}:{per_task[t]}" for t in kept)
            log(f"[dataset] {name}: {report['episodes']} episodes (kept {sum(per_task[t] for t in kept)}, "
                f"skipped {skipped}) -> {summary}  [{time.time() - t0:.1f}s]")
            if report["obs_padding_nonzero"] or report["action_padding_nonzero"]:
                log(f"[dataset] note {name}: non-zero padding values: obs {report['obs_padding_nonzero']}, "
                    f"action (t>=1) {report['action_padding_nonzero']}")
            del arrays
        if not any(int(v["episodes"]) for v in writer.index["tasks"].values()):
            raise DatasetError(f"no episodes of the requested tasks {task_filter} in {files}")
        store = writer.commit()
    log(f"[dataset] store {dst}: " + ", ".join(f"{MT30_TASKS[t]}={store.episodes(t)}" for t in store.tasks)
        + f"  [{time.time() - t0:.1f}s]")
    return store


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--src", nargs="+", required=True, help="chunk files and/or directories (all *.pt, sorted)")
    p.add_argument("--dst", required=True, help="store directory (created, or appended to if it is a store)")
    p.add_argument("--tasks", nargs="+", default=None, help="keep only these MT30 tasks (names or ids)")
    p.add_argument(
        "--episode-length", type=int, default=DEFAULT_EPISODE_LENGTH,
        help="required episode length (501 for MT30; 0 = take it from the data)",
    )
    p.add_argument("--no-mmap", action="store_true", help="read chunks into memory instead of memory-mapping them")
    p.add_argument("--quiet", action="store_true")
    return p


def add_dataset_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``dataset`` on an ``argparse`` subparsers object; sets ``func=run_dataset``."""
    p = subparsers.add_parser(
        "dataset", help="convert MT30 chunk_*.pt files into the per-task store", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    p.set_defaults(func=run_dataset)
    return p


def run_dataset(args: argparse.Namespace) -> int:
    try:
        convert(
            args.src, args.dst, tasks=args.tasks,
            episode_length=None if args.episode_length == 0 else args.episode_length,
            mmap=not args.no_mmap, log=None if args.quiet else print,
        )
    except (StoreError, SafeLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = _configure(argparse.ArgumentParser(prog="python -m convert_ckpt.dataset", description=__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_dataset(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
