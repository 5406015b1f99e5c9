"""MT30 chunk -> per-task store conversion (convert_ckpt.dataset) and the store reader."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from convert_ckpt.dataset import DatasetError, convert, load_chunk, main
from fmbpo_jax.data.store import StoreError, open_store

FIX = Path(__file__).parent / "fixtures" / "data"
CHUNK0 = FIX / "mt30_mini_chunk_0.pt"
CHUNK1 = FIX / "mt30_mini_chunk_1.pt"

# tests/fixtures/data/README.md: per-episode returns by task, in file order (chunk_0 then chunk_1)
README_RETURNS = {
    0: [142.909027, 150.120728, 134.110611],  # walker-stand
    3: [11.228600, 10.674767, 7.689528],  # cheetah-run
    4: [227.0, 161.0, 116.0],  # reacher-easy
}
README_TOTALS = {0: 427.140366, 3: 29.592895, 4: 504.0}


def quiet(_msg):
    pass


def _chunk_arrays(path):
    return {k: np.array(v) for k, v in load_chunk(str(path), mmap=False).items()}


def _save_plain(path, arrays):
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, path)
    return path


def _snapshot(d: Path):
    """Relative path -> bytes of every file under d (to prove nothing changed)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_convert_fixture_counts_values_and_returns(tmp_path):
    dst = tmp_path / "store"
    store = convert([str(FIX)], str(dst), log=quiet)  # directory: sorted *.pt = chunk_0, chunk_1
    assert store.tasks == [0, 3, 4]
    assert {t: store.episodes(t) for t in store.tasks} == {0: 3, 3: 3, 4: 3}
    assert store.episode_length == 501 and store.obs_dim == 24 and store.action_dim == 6
    c0, c1 = _chunk_arrays(CHUNK0), _chunk_arrays(CHUNK1)
    for tid in (0, 3, 4):
        arr = store.arrays(tid)
        assert isinstance(arr["obs"], np.memmap)
        sel0 = c0["task"][:, 0] == tid
        sel1 = c1["task"][:, 0] == tid
        for key in ("obs", "action", "reward"):
            want = np.concatenate([c0[key][sel0], c1[key][sel1]])
            np.testing.assert_array_equal(np.asarray(arr[key]), want)  # NaN fillers compare equal
        returns = np.asarray(arr["reward"][:, 1:]).sum(axis=1)
        np.testing.assert_allclose(returns, README_RETURNS[tid], atol=2e-4)
        np.testing.assert_allclose(returns.sum(), README_TOTALS[tid], atol=5e-4)
        assert store.segments(tid) == [(0, 2), (1, 1)]
    idx = json.loads((dst / "index.json").read_text())
    assert [s["name"] for s in idx["sources"]] == ["mt30_mini_chunk_0.pt", "mt30_mini_chunk_1.pt"]
    assert idx["sources"][0]["content_sha256"] == "a5cffc8218e141b27d1cd1df20dad2327260fda3a613ce77acdf24afd75fd6f3"
    assert idx["sources"][1]["content_sha256"] == "d0bff81da3cfcbf8b47ecce0d658cfa5397ef658ec742907cc7e0a5cf81d4288"
    assert len(idx["sources"][0]["sha256"]) == 64
    assert idx["sources"][0]["index0"]["reward_nan"] == 6
    assert idx["sources"][0]["per_task"] == {"0": 2, "3": 2, "4": 2}
    assert idx["tasks"]["4"]["name"] == "reacher-easy"
    # only the store and its files: no temp dirs left next to it
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_append_equals_one_shot_and_duplicate_refused(tmp_path):
    one = convert([str(CHUNK0), str(CHUNK1)], str(tmp_path / "one"), log=quiet)
    two = convert([str(CHUNK0)], str(tmp_path / "two"), log=quiet)
    assert two.episodes(0) == 2
    old_data = two.data_dir
    two = convert([str(CHUNK1)], str(tmp_path / "two"), log=quiet)
    assert two.data_dir != old_data and not os.path.exists(old_data)
    for tid in one.tasks:
        for key in ("obs", "action", "reward"):
            np.testing.assert_array_equal(np.asarray(one.arrays(tid)[key]), np.asarray(two.arrays(tid)[key]))
    assert sorted(os.listdir(tmp_path / "two")) == ["data-000002", "index.json"]
    before = _snapshot(tmp_path / "two")
    # same file again
    with pytest.raises(StoreError, match="already converted"):
        convert([str(CHUNK1)], str(tmp_path / "two"), log=quiet)
    # a byte-identical copy under another name
    cp = tmp_path / "copy_of_chunk_0.pt"
    shutil.copyfile(CHUNK0, cp)
    with pytest.raises(StoreError, match="already converted"):
        convert([str(cp)], str(tmp_path / "two"), log=quiet)
    # the same content re-saved as a plain dict (different file bytes, same content hash)
    plain = _save_plain(tmp_path / "plain_chunk_1.pt", _chunk_arrays(CHUNK1))
    with pytest.raises(StoreError, match="already converted"):
        convert([str(plain)], str(tmp_path / "two"), log=quiet)
    assert _snapshot(tmp_path / "two") == before
    # the same file twice in one call
    with pytest.raises(DatasetError, match="given twice"):
        convert([str(CHUNK0), str(CHUNK0)], str(tmp_path / "three"), log=quiet)
    # a copy in one call: second one is a duplicate by hash
    with pytest.raises(StoreError, match="already converted"):
        convert([str(CHUNK0), str(cp)], str(tmp_path / "three"), log=quiet)
    assert not (tmp_path / "three").exists()


def test_plain_dict_chunk_and_task_filter(tmp_path):
    arrays = _chunk_arrays(CHUNK0)
    arrays["task"] = arrays["task"].astype(np.int64)  # int64 task ids are accepted too
    plain = _save_plain(tmp_path / "plain.pt", arrays)
    store = convert([str(plain)], str(tmp_path / "s"), tasks=["cheetah-run", "4"], log=quiet)
    assert store.tasks == [3, 4]
    np.testing.assert_array_equal(np.asarray(store.arrays(3)["obs"]), arrays["obs"][arrays["task"][:, 0] == 3])
    idx = store.index
    assert idx["task_filter"] == [3, 4]
    assert idx["sources"][0]["skipped_episodes"] == 2
    with pytest.raises(StoreError, match="no episodes of task 0"):
        store.arrays(0)
    # appending with another task filter is refused
    with pytest.raises(StoreError, match="built with tasks"):
        convert([str(CHUNK1)], str(tmp_path / "s"), tasks=["walker-stand"], log=quiet)
    with pytest.raises(StoreError, match="unknown task"):
        convert([str(CHUNK1)], str(tmp_path / "t"), tasks=["walker-fly"], log=quiet)


# ------------------------------------------------------------------------------- bad inputs


def _bad_chunks(tmp_path):
    base = _chunk_arrays(CHUNK1)

    def variant(name, fn):
        a = {k: v.copy() for k, v in base.items()}
        out = fn(a)
        return _save_plain(tmp_path / f"{name}.pt", out if out is not None else a)

    cases = {}
    cases["missing_keys"] = (variant("missing", lambda a: {k: a[k] for k in ("obs", "action")}), r"missing keys \['reward', 'task'\]")
    cases["wrong_length"] = (variant("short", lambda a: {k: v[:, :400] for k, v in a.items()}), "wrong episode length 400, expected 501")

    def nan_obs(a):
        a["obs"][1, 7, 3] = np.nan
        a["obs"][2, 9, :2] = np.inf
    cases["nan_obs"] = (variant("nanobs", nan_obs), r"3 NaN/inf value\(s\) in obs in 2 episode\(s\), first episodes \[1, 2\]")

    def nan_action(a):
        a["action"][0, 5, 0] = np.nan
    cases["nan_action"] = (variant("nanact", nan_action), r"1 NaN/inf value\(s\) in action\[:, 1:\]")

    def nan_reward(a):
        a["reward"][2, 500] = np.nan
    cases["nan_reward"] = (variant("nanrew", nan_reward), r"in reward\[:, 1:\] in 1 episode\(s\), first episodes \[2\]")

    def bad_task(a):
        a["task"][1, :] = 30
    cases["task_outside"] = (variant("task30", bad_task), "task id 30 of episode 1 is outside the MT30 task set")

    def neg_task(a):
        a["task"][2, :] = -1
    cases["task_negative"] = (variant("taskneg", neg_task), "task id -1 of episode 2 is outside")

    def nonconst(a):
        a["task"][2, 250:] = 5
    cases["task_nonconst"] = (variant("nonconst", nonconst), r"not constant along episode 2 \(values \[4, 5\]\)")

    def wrong_dtype(a):
        a["obs"] = a["obs"].astype(np.float64)
    cases["dtype"] = (variant("f64", wrong_dtype), "obs has dtype float64")

    def wrong_shape(a):
        a["reward"] = a["reward"][:, :, None].repeat(2, axis=2)
    cases["shape"] = (variant("shape", wrong_shape), "reward has shape")

    p = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.ones(3, 3)}, p)
    cases["not_a_chunk_dict"] = (p, "not a chunk: missing keys")
    p = tmp_path / "list.pt"
    torch.save([torch.ones(3)], p)
    cases["not_a_chunk_list"] = (p, "not a chunk: holds a list")
    p = tmp_path / "random.pt"
    p.write_bytes(np.random.default_rng(0).bytes(5000))
    cases["random_bytes"] = (p, "not a loadable chunk")
    p = tmp_path / "truncated.pt"
    p.write_bytes(CHUNK1.read_bytes()[:150_000])
    cases["truncated"] = (p, "not a loadable chunk")
    return cases


BAD = ["missing_keys", "wrong_length", "nan_obs", "nan_action", "nan_reward", "task_outside", "task_negative",
       "task_nonconst", "dtype", "shape", "not_a_chunk_dict", "not_a_chunk_list", "random_bytes", "truncated"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_new_store_writes_nothing(tmp_path, case):
    path, msg = _bad_chunks(tmp_path)[case]
    dst = tmp_path / "out" / "store"
    with pytest.raises(DatasetError, match=msg):
        convert([str(CHUNK0), str(path)], str(dst), log=quiet)  # the good chunk first: still nothing written
    assert not dst.exists()
    assert os.listdir(tmp_path / "out") == []  # no temp dir left behind


@pytest.mark.parametrize("case", ["nan_obs", "task_nonconst", "wrong_length", "random_bytes"])
def test_bad_input_append_leaves_store_unchanged(tmp_path, case):
    path, msg = _bad_chunks(tmp_path)[case]
    dst = tmp_path / "store"
    convert([str(CHUNK0)], str(dst), log=quiet)
    before = _snapshot(dst)
    good = _save_plain(tmp_path / "good_extra.pt", {**_chunk_arrays(CHUNK1)})
    # make `good` differ in content from CHUNK1 so that it is not a duplicate of anything
    arrays = _chunk_arrays(CHUNK1)
    arrays["obs"][:, 1:, 0] += 1.0
    good = _save_plain(good, arrays)
    with pytest.raises(DatasetError, match=msg):
        convert([str(good), str(path)], str(dst), log=quiet)
    assert _snapshot(dst) == before
    open_store(dst)  # still valid


def test_nan_fillers_at_index0_are_fine(tmp_path):
    arrays = _chunk_arrays(CHUNK1)
    assert np.isnan(arrays["reward"][:, 0]).all()
    arrays["action"][:, 0, :] = np.nan  # all six dims NaN at index 0, even padded ones
    arrays["obs"][:, :, 0] += 0.5  # new content
    p = _save_plain(tmp_path / "fill.pt", arrays)
    store = convert([str(p)], str(tmp_path / "s"), log=quiet)
    assert store.index["sources"][0]["index0"]["action_nan"] == 18


def test_episode_length_from_data_and_cli(tmp_path, capsys):
    arrays = {k: v[:, :101] for k, v in _chunk_arrays(CHUNK0).items()}
    p = _save_plain(tmp_path / "short.pt", arrays)
    assert main(["--src", str(p), "--dst", str(tmp_path / "bad")]) == 2
    assert "wrong episode length 101, expected 501" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["--src", str(p), "--dst", str(tmp_path / "ok"), "--episode-length", "101", "--quiet"]) == 0
    st = open_store(tmp_path / "ok")
    assert st.episode_length == 101 and st.episodes(0) == 2
    # appending a 501-step chunk to the 101-step store is refused
    assert main(["--src", str(CHUNK1), "--dst", str(tmp_path / "ok"), "--episode-length", "0"]) == 2
    assert "wrong episode length 501, expected 101" in capsys.readouterr().err
    assert main(["--src", str(CHUNK1), "--dst", str(tmp_path / "ok")]) == 2  # default 501 vs the store's 101
    assert "existing store has episode_length=101, new data has 501" in capsys.readouterr().err
    assert main(["--src", str(tmp_path / "nothing_here"), "--dst", str(tmp_path / "x")]) == 2


def test_dst_not_a_store_refused(tmp_path):
    d = tmp_path / "occupied"
    d.mkdir()
    (d / "something.txt").write_text("x")
    with pytest.raises(StoreError, match="not a store"):
        convert([str(CHUNK0)], str(d), log=quiet)
    e = tmp_path / "empty"
    e.mkdir()
    assert convert([str(CHUNK0)], str(e), log=quiet).episodes(3) == 2


# ------------------------------------------------------------------------------- reader checks


@pytest.fixture()
def store_dir(tmp_path):
    d = tmp_path / "store"
    convert([str(CHUNK0), str(CHUNK1)], str(d), log=quiet)
    return d


def _edit_index(d: Path, fn):
    p = d / "index.json"
    idx = json.loads(p.read_text())
    fn(idx)
    p.write_text(json.dumps(idx))


def test_reader_detects_episode_count_mismatch(store_dir):
    def more(idx):
        idx["tasks"]["3"]["episodes"] = 4
        idx["tasks"]["3"]["segments"][-1][1] = 2
        idx["sources"][1]["per_task"]["3"] = 2
    _edit_index(store_dir, more)
    with pytest.raises(StoreError, match=r"index disagrees with arrays: task 3 obs is float32\(3, 501, 24\)"):
        open_store(store_dir)


def test_reader_detects_segment_and_source_mismatch(store_dir):
    _edit_index(store_dir, lambda idx: idx["tasks"]["0"].__setitem__("episodes", 2))
    with pytest.raises(StoreError, match="task 0 has 2 episodes but its segments sum to 3"):
        open_store(store_dir)


def test_reader_detects_swapped_or_missing_arrays(store_dir):
    idx = json.loads((store_dir / "index.json").read_text())
    data = store_dir / idx["data_dir"]
    np.save(data / "t04_reward.npy", np.zeros((3, 500), np.float32))
    with pytest.raises(StoreError, match="task 4 reward"):
        open_store(store_dir)
    (data / "t04_reward.npy").unlink()
    with pytest.raises(StoreError, match="missing array file"):
        open_store(store_dir)


def test_reader_detects_truncated_array_and_bad_index(store_dir):
    idx = json.loads((store_dir / "index.json").read_text())
    f = store_dir / idx["data_dir"] / "t00_obs.npy"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(StoreError):
        open_store(store_dir)
    (store_dir / "index.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable index"):
        open_store(store_dir)
    with pytest.raises(StoreError, match="not a store"):
        open_store(store_dir / "nope")
