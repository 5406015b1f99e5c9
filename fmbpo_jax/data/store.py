"""Per-task MT30 store: memory-mappable ``.npy`` arrays plus a JSON index.

Layout of a store directory ``DST``::

    DST/index.json                 the index (below); replaced atomically on every write
    DST/data-000001/t00_obs.npy    float32 [E_0, L, obs_dim]   (task id 0)
    DST/data-000001/t00_action.npy float32 [E_0, L, action_dim]
    DST/data-000001/t00_reward.npy float32 [E_0, L]
    ...

``index.json``::

    {"format": "fmbpo_jax.mt30_store", "version": 1,
     "episode_length": 501, "obs_dim": 24, "action_dim": 6,
     "task_names": [... the 30 MT30 names ...], "task_filter": null | [ids],
     "data_dir": "data-000001",
     "tasks": {"0": {"name": "walker-stand", "episodes": 3,
                     "files": {"obs": "t00_obs.npy", "action": ..., "reward": ...},
                     "segments": [[source_index, n_episodes], ...]}, ...},
     "sources": [{"name": "chunk_0.pt", "sha256": ..., "content_sha256": ..., "episodes": 6,
                  "per_task": {"0": 2, ...}, "skipped_episodes": 0, "index0": {...}, ...}, ...]}

Episode layout (TD-MPC2): ``obs[e, 0]`` is the reset observation, ``action[e, t]``/``reward[e, t]``
(t >= 1) belong to the transition ``obs[e, t-1] -> obs[e, t]``; ``action[e, 0]``/``reward[e, 0]``
are fillers copied verbatim from the source (NaN in the fixtures, possibly garbage in the released
files) and are never read by the samplers.

Appends never modify a data directory that the index points to: a new ``data-NNNNNN`` directory is
written (unchanged task files hard-linked, grown ones copied and extended), then ``index.json`` is
replaced with ``os.replace`` and the old directory removed. A crash leaves the old store intact.

This module needs only numpy; reading torch chunk files is ``convert_ckpt.dataset``'s job.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, MT30_TASKS, OBS_DIMS_BY_ID

STORE_FORMAT = "fmbpo_jax.mt30_store"
STORE_VERSION = 1
INDEX_NAME = "index.json"
DEFAULT_EPISODE_LENGTH = 501
FIELDS = ("obs", "action", "reward")

__all__ = [
    "StoreError",
    "Store",
    "StoreWriter",
    "open_store",
    "resolve_tasks",
    "MT30_TASKS",
]


class StoreError(Exception):
    """Bad store (index/array mismatch, missing files) or bad input to the writer."""


def resolve_tasks(tasks: Iterable[int | str] | None) -> list[int] | None:
    """Task names or ids (ints or digit strings) -> sorted unique MT30 ids; None stays None."""
    if tasks is None:
        return None
    out = []
    for t in tasks:
        if isinstance(t, (int, np.integer)):
            tid = int(t)
        elif isinstance(t, str) and t.strip().lstrip("-").isdigit():
            tid = int(t)
        elif isinstance(t, str) and t in MT30_TASKS:
            tid = MT30_TASKS.index(t)
        else:
            raise StoreError(f"unknown task {t!r} (expected an MT30 task name or an id in 0..{len(MT30_TASKS) - 1})")
        if not 0 <= tid < len(MT30_TASKS):
            raise StoreError(f"task id {tid} outside the MT30 task set 0..{len(MT30_TASKS) - 1}")
        out.append(tid)
    return sorted(set(out))


def _task_file(tid: int, field: str) -> str:
    return f"t{tid:02d}_{field}.npy"


# --------------------------------------------------------------------------------------------
# .npy files that can be appended to (fixed-size header rewritten at close)
# --------------------------------------------------------------------------------------------

_NPY_HEADER_TOTAL = 256  # bytes, multiple of 64; room for any shape we write


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    text = repr(d)
    # magic(6) + version(2) + header_len(2) + text + padding + '\n' == _NPY_HEADER_TOTAL
    hlen = _NPY_HEADER_TOTAL - 10
    body = text.ljust(hlen - 1) + "\n"
    if len(body) != hlen:
        raise StoreError(f"npy header too long for shape {shape}")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", hlen) + body.encode("latin1")


class NpyAppender:
    """Write a C-ordered ``.npy`` file by appending blocks along axis 0."""

    def __init__(self, path: str, dtype: Any, inner_shape: tuple[int, ...], existing: str | None = None):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.inner_shape = tuple(inner_shape)
        self.rows = 0
        if existing is not None:
            arr = np.load(existing, mmap_mode="r")
            if arr.dtype != self.dtype or tuple(arr.shape[1:]) != self.inner_shape:
                raise StoreError(f"{existing}: has {arr.dtype}{arr.shape}, expected {self.dtype}[*, {self.inner_shape}]")
            self.rows = int(arr.shape[0])
            offset = arr.offset
            del arr
            with open(existing, "rb") as src, open(path, "wb") as dst:
                dst.write(_npy_header(self.dtype, (0,) + self.inner_shape))
                src.seek(offset)
                shutil.copyfileobj(src, dst, length=16 << 20)
            self._f = open(path, "r+b")
            self._f.seek(0, os.SEEK_END)
        else:
            self._f = open(path, "wb")
            self._f.write(_npy_header(self.dtype, (0,) + self.inner_shape))

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if tuple(block.shape[1:]) != self.inner_shape:
            raise StoreError(f"{self.path}: block shape {block.shape} does not fit [*, {self.inner_shape}]")
        self._f.write(memoryview(block).cast("B"))
        self.rows += int(block.shape[0])

    def close(self) -> None:
        self._f.seek(0)
        self._f.write(_npy_header(self.dtype, (self.rows,) + self.inner_shape))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass
class Store:
    """A validated, opened store. Arrays are memory-mapped read-only (``np.memmap``)."""

    path: str
    index: dict

    @property
    def episode_length(self) -> int:
        return int(self.index["episode_length"])

    @property
    def obs_dim(self) -> int:
        return int(self.index["obs_dim"])

    @property
    def action_dim(self) -> int:
        return int(self.index["action_dim"])

    @property
    def tasks(self) -> list[int]:
        """Task ids that have at least one episode, ascending."""
        return sorted(int(k) for k, v in self.index["tasks"].items() if int(v["episodes"]) > 0)

    @property
    def data_dir(self) -> str:
        return os.path.join(self.path, self.index["data_dir"])

    def episodes(self, task: int | str) -> int:
        tid = resolve_tasks([task])[0]
        entry = self.index["tasks"].get(str(tid))
        return 0 if entry is None else int(entry["episodes"])

    def segments(self, task: int | str) -> list[tuple[int, int]]:
        """Per source file, in store order: (source index, number of this task's episodes)."""
        tid = resolve_tasks([task])[0]
        entry = self.index["tasks"].get(str(tid))
        if entry is None:
            return []
        return [(int(s), int(n)) for s, n in entry["segments"]]

    def arrays(self, task: int | str, mmap_mode: str | None = "r") -> dict[str, np.ndarray]:
        """``dict(obs [E,L,obs_dim], action [E,L,action_dim], reward [E,L])`` of one task."""
        tid = resolve_tasks([task])[0]
        entry = self.index["tasks"].get(str(tid))
        if entry is None or int(entry["episodes"]) == 0:
            have = ", ".join(f"{t} ({MT30_TASKS[t]})" for t in self.tasks)
            raise StoreError(f"{self.path}: no episodes of task {tid} ({MT30_TASKS[tid]}); store has: {have}")
        return {f: np.load(os.path.join(self.data_dir, entry["files"][f]), mmap_mode=mmap_mode) for f in FIELDS}

    def validate(self) -> None:
        """Check that the index agrees with the arrays on disk (raises StoreError)."""
        idx = self.index
        L, do, da = self.episode_length, self.obs_dim, self.action_dim
        sources = idx.get("sources", [])
        for key, entry in idx["tasks"].items():
            tid = int(key)
            if not 0 <= tid < len(MT30_TASKS):
                raise StoreError(f"{self.path}: index lists task id {tid} outside the MT30 task set")
            n = int(entry["episodes"])
            seg_total = sum(int(c) for _, c in entry["segments"])
            if seg_total != n:
                raise StoreError(f"{self.path}: index says task {tid} has {n} episodes but its segments sum to {seg_total}")
            src_total = sum(int(s.get("per_task", {}).get(key, 0)) for s in sources)
            if src_total != n:
                raise StoreError(f"{self.path}: index says task {tid} has {n} episodes but its sources list {src_total}")
            expected = {"obs": (n, L, do), "action": (n, L, da), "reward": (n, L)}
            for f in FIELDS:
                fp = os.path.join(self.data_dir, entry["files"][f])
                if not os.path.isfile(fp):
                    raise StoreError(f"{self.path}: missing array file {fp} (task {tid}, {f})")
                try:
                    arr = np.load(fp, mmap_mode="r")
                except Exception as exc:
                    raise StoreError(f"{self.path}: unreadable array {fp}: {exc}") from None
                if arr.dtype != np.float32 or tuple(arr.shape) != expected[f]:
                    raise StoreError(
                        f"{self.path}: index disagrees with arrays: task {tid} {f} is {arr.dtype}{tuple(arr.shape)}, "
                        f"index says float32{expected[f]}"
                    )
                want_bytes = arr.offset + int(np.prod(expected[f])) * 4
                if os.path.getsize(fp) != want_bytes:
                    raise StoreError(f"{self.path}: {fp} has {os.path.getsize(fp)} bytes, expected {want_bytes}")


def open_store(path: str | os.PathLike, validate: bool = True) -> Store:
    """Open (and by default validate) a store written by :class:`StoreWriter`."""
    path = os.fspath(path)
    ip = os.path.join(path, INDEX_NAME)
    if not os.path.isfile(ip):
        raise StoreError(f"{path}: not a store (no {INDEX_NAME})")
    try:
        with open(ip) as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{ip}: unreadable index: {exc}") from None
    if index.get("format") != STORE_FORMAT or index.get("version") != STORE_VERSION:
        raise StoreError(f"{ip}: not a {STORE_FORMAT} v{STORE_VERSION} index")
    for k in ("episode_length", "obs_dim", "action_dim", "data_dir", "tasks", "sources"):
        if k not in index:
            raise StoreError(f"{ip}: index lacks {k!r}")
    store = Store(path, index)
    if validate:
        store.validate()
    return store


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json_atomic(path: str, obj: dict) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".json.tmp", dir=d)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)


class StoreWriter:
    """Create a store or append to one; nothing becomes visible until :meth:`commit`.

    Usage::

        with StoreWriter(dst, episode_length=501, obs_dim=24, action_dim=6, task_filter=None) as w:
            src = w.begin_source(name, sha256, content_sha256, meta)   # raises on a duplicate
            w.add_episodes(src, task_id, obs, action, reward)          # any number of blocks
            ...
            w.commit()

    Leaving the ``with`` block without ``commit`` (e.g. on an exception) removes all temp files and
    leaves ``dst`` exactly as it was.
    """

    def __init__(
        self,
        dst: str | os.PathLike,
        *,
        episode_length: int | None = None,
        obs_dim: int | None = None,
        action_dim: int | None = None,
        task_filter: Sequence[int] | None = None,
    ):
        self.dst = os.path.abspath(os.fspath(dst))
        self._committed = False
        self._appenders: dict[tuple[int, str], NpyAppender] = {}
        self._tmp_root: str | None = None
        self._old: Store | None = None
        task_filter = resolve_tasks(task_filter)
        if os.path.isdir(self.dst) and os.path.isfile(os.path.join(self.dst, INDEX_NAME)):
            self._old = open_store(self.dst, validate=True)
            idx = self._old.index
            for name, want in (("episode_length", episode_length), ("obs_dim", obs_dim), ("action_dim", action_dim)):
                if want is not None and int(idx[name]) != int(want):
                    raise StoreError(f"{self.dst}: existing store has {name}={idx[name]}, new data has {want}")
            old_filter = idx.get("task_filter")
            if task_filter is not None and old_filter != task_filter:
                raise StoreError(f"{self.dst}: existing store was built with tasks {old_filter}, not {task_filter}")
            self.index = json.loads(json.dumps(idx))
            gen = int(idx["data_dir"].split("-")[-1]) + 1
            self.index["data_dir"] = f"data-{gen:06d}"
            self._tmp_root = tempfile.mkdtemp(prefix=".tmp-append-", dir=self.dst)
            self._data_tmp = os.path.join(self._tmp_root, self.index["data_dir"])
            os.mkdir(self._data_tmp)
        else:
            if os.path.exists(self.dst):
                if not os.path.isdir(self.dst) or os.listdir(self.dst):
                    raise StoreError(f"{self.dst}: exists and is not a store (no {INDEX_NAME}); refusing to write into it")
            parent = os.path.dirname(self.dst) or "."
            os.makedirs(parent, exist_ok=True)
            self.index = {
                "format": STORE_FORMAT,
                "version": STORE_VERSION,
                "episode_length": None if episode_length is None else int(episode_length),
                "obs_dim": None if obs_dim is None else int(obs_dim),
                "action_dim": None if action_dim is None else int(action_dim),
                "task_names": list(MT30_TASKS),
                "task_filter": task_filter,
                "data_dir": "data-000001",
                "tasks": {},
                "sources": [],
            }
            self._tmp_root = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.tmp-", dir=parent)
            os.chmod(self._tmp_root, 0o777 & ~_umask())  # mkdtemp creates 0700; this becomes the store dir
            self._data_tmp = os.path.join(self._tmp_root, self.index["data_dir"])
            os.mkdir(self._data_tmp)
        self._new_sources: list[int] = []

    # -- context manager
    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    @property
    def task_filter(self) -> list[int] | None:
        return self.index.get("task_filter")

    @property
    def known_hashes(self) -> dict[str, str]:
        """sha256 / content_sha256 of every source already in the store (or added) -> its name."""
        out = {}
        for s in self.index["sources"]:
            for k in ("sha256", "content_sha256"):
                if s.get(k):
                    out[s[k]] = s["name"]
        return out

    def check_dims(self, episode_length: int, obs_dim: int, action_dim: int, what: str) -> None:
        for name, val in (("episode_length", episode_length), ("obs_dim", obs_dim), ("action_dim", action_dim)):
            have = self.index[name]
            if have is None:
                self.index[name] = int(val)
            elif int(have) != int(val):
                raise StoreError(f"{what}: {name} {val} differs from the store's {have}")

    def begin_source(self, name: str, sha256: str, content_sha256: str | None, meta: dict | None = None) -> int:
        known = self.known_hashes
        for h in (sha256, content_sha256):
            if h and h in known:
                raise StoreError(
                    f"{name}: already converted (same SHA-256 {h[:16]}... as source {known[h]!r} in {self.dst}); refusing"
                )
        entry = {"name": name, "sha256": sha256, "content_sha256": content_sha256, "episodes": 0, "per_task": {}}
        entry.update(meta or {})
        self.index["sources"].append(entry)
        sidx = len(self.index["sources"]) - 1
        self._new_sources.append(sidx)
        return sidx

    def _appender(self, tid: int, field: str, inner: tuple[int, ...]) -> NpyAppender:
        key = (tid, field)
        if key not in self._appenders:
            fname = _task_file(tid, field)
            existing = None
            if self._old is not None and str(tid) in self._old.index["tasks"]:
                existing = os.path.join(self._old.data_dir, self._old.index["tasks"][str(tid)]["files"][field])
            self._appenders[key] = NpyAppender(os.path.join(self._data_tmp, fname), np.float32, inner, existing)
        return self._appenders[key]

    def add_episodes(self, source: int, tid: int, obs: np.ndarray, action: np.ndarray, reward: np.ndarray) -> None:
        """Append a block of episodes of one task (arrays [n, L, ...]) coming from source ``source``."""
        if self._committed:
            raise StoreError("writer already committed")
        n = int(obs.shape[0])
        if n == 0:
            return
        L, do, da = self.index["episode_length"], self.index["obs_dim"], self.index["action_dim"]
        if obs.shape != (n, L, do) or action.shape != (n, L, da) or reward.shape != (n, L):
            raise StoreError(
                f"episode block shapes obs{obs.shape} action{action.shape} reward{reward.shape} do not match "
                f"L={L}, obs_dim={do}, action_dim={da}"
            )
        self._appender(tid, "obs", (L, do)).append(obs)
        self._appender(tid, "action", (L, da)).append(action)
        self._appender(tid, "reward", (L,)).append(reward)
        key = str(tid)
        entry = self.index["tasks"].setdefault(
            key,
            {"name": MT30_TASKS[tid], "episodes": 0, "files": {f: _task_file(tid, f) for f in FIELDS}, "segments": []},
        )
        entry["episodes"] += n
        if entry["segments"] and entry["segments"][-1][0] == source:
            entry["segments"][-1][1] += n
        else:
            entry["segments"].append([source, n])
        src = self.index["sources"][source]
        src["episodes"] += n
        src["per_task"][key] = src["per_task"].get(key, 0) + n

    def commit(self) -> Store:
        """Finish the files, then make the new store state visible atomically. Returns the opened store."""
        if self._committed:
            raise StoreError("writer already committed")
        if not self._new_sources:
            raise StoreError("nothing to commit: no source was added")
        for app in self._appenders.values():
            app.close()
        self._appenders.clear()
        # Untouched tasks of an existing store: hard-link (or copy) their files into the new data dir.
        if self._old is not None:
            for key, entry in self._old.index["tasks"].items():
                for f in FIELDS:
                    target = os.path.join(self._data_tmp, entry["files"][f])
                    if not os.path.exists(target):
                        src = os.path.join(self._old.data_dir, entry["files"][f])
                        try:
                            os.link(src, target)
                        except OSError:
                            shutil.copyfile(src, target)
        for key, entry in self.index["tasks"].items():
            entry["episodes"] = int(entry["episodes"])
        # Validate what we are about to publish, from the temp location.
        Store(self._tmp_root, self.index).validate()
        if self._old is None:
            _write_json_atomic(os.path.join(self._tmp_root, INDEX_NAME), self.index)
            _fsync_dir(self._data_tmp)
            if os.path.isdir(self.dst):
                os.rmdir(self.dst)  # empty (checked in __init__)
            os.rename(self._tmp_root, self.dst)
            _fsync_dir(os.path.dirname(self.dst) or ".")
        else:
            final_data = os.path.join(self.dst, self.index["data_dir"])
            if os.path.exists(final_data):  # leftover of a crashed earlier append
                shutil.rmtree(final_data)
            os.rename(self._data_tmp, final_data)
            _fsync_dir(self.dst)
            old_data = self._old.data_dir
            _write_json_atomic(os.path.join(self.dst, INDEX_NAME), self.index)  # the atomic switch
            shutil.rmtree(old_data, ignore_errors=True)
            shutil.rmtree(self._tmp_root, ignore_errors=True)
        self._committed = True
        self._tmp_root = None
        return open_store(self.dst)

    def abort(self) -> None:
        for app in self._appenders.values():
            try:
                app._f.close()
            except Exception:  # pragma: no cover
                pass
        self._appenders.clear()
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)
            self._tmp_root = None


def task_dims(tid: int) -> tuple[int, int]:
    """(own obs dim, own action dim) of an MT30 task id."""
    return OBS_DIMS_BY_ID[tid], ACTION_DIMS_BY_ID[tid]
