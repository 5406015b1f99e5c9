"""fmbpo_jax.data.generate: real dm_control rollouts in the chunk format; full path chunk -> store -> sampler."""

from __future__ import annotations

import numpy as np
import pytest

from convert_ckpt.dataset import content_sha256, convert, load_chunk
from fmbpo_jax.data.generate import generate, generate_chunk, random_actions
from fmbpo_jax.data.sampler import HostSampler, load_device_data, sample_windows

# tests/fixtures/data/README.md: content SHA-256 of the two fixture chunks
SHA0 = "a5cffc8218e141b27d1cd1df20dad2327260fda3a613ce77acdf24afd75fd6f3"
SHA1 = "d0bff81da3cfcbf8b47ecce0d658cfa5397ef658ec742907cc7e0a5cf81d4288"


def test_reproduces_fixture_chunks_bit_exactly():
    # The fixture build: rng(101) and one seed-1 env per task for the whole build, chunk_0 then chunk_1.
    a = generate_chunk([0, 3, 4, 0, 3, 4, 0, 3, 4], seed=101, env_seed=1)
    c0 = {k: v[:6] for k, v in a.items()}
    c1 = {k: v[6:] for k, v in a.items()}
    assert content_sha256(c0) == SHA0
    assert content_sha256(c1) == SHA1


def test_short_episodes_policy_full_path(tmp_path):
    L = 30

    def policy(obs, tid, rng):
        assert obs.shape == (24,) and obs.dtype == np.float32
        a = np.full(6, 0.5 if tid == 4 else -0.25, np.float32)
        return a if tid != 4 else a[:2]  # reacher: its own 2 dims are accepted too

    p = tmp_path / "gen" / "chunk_0.pt"
    arrays = generate(p, ["reacher-easy", "cheetah-run"], 3, interleave=False, seed=7, episode_length=L, policy=policy)
    assert arrays["task"][:, 0].tolist() == [4, 4, 4, 3, 3, 3]
    # index-0 convention
    assert np.isnan(arrays["reward"][:, 0]).all()
    assert np.isnan(arrays["action"][:3, 0, :2]).all() and (arrays["action"][:3, 0, 2:] == 0).all()
    assert np.isnan(arrays["action"][3:, 0]).all()
    assert (arrays["action"][:3, 1:, :2] == 0.5).all() and (arrays["action"][:3, 1:, 2:] == 0).all()
    assert (arrays["action"][3:, 1:] == -0.25).all()
    assert (arrays["obs"][:3, :, 6:] == 0).all() and (arrays["obs"][3:, :, 17:] == 0).all()
    assert np.isfinite(arrays["reward"][:, 1:]).all() and (arrays["reward"][:, 1:] >= 0).all()
    # the same env and policy twice: deterministic episodes differ only by the env's reset randomness
    assert not np.array_equal(arrays["obs"][0, 0], arrays["obs"][1, 0])

    loaded = load_chunk(str(p), mmap=False)
    for k in arrays:
        np.testing.assert_array_equal(np.asarray(loaded[k]), arrays[k])

    store = convert([str(p.parent)], str(tmp_path / "store"), episode_length=L, log=lambda m: None)
    assert store.episode_length == L and store.tasks == [3, 4]
    assert store.episodes(3) == 3 and store.episodes(4) == 3
    np.testing.assert_array_equal(np.asarray(store.arrays(4)["obs"]), arrays["obs"][:3])

    H, B = 8, 64
    data = load_device_data(store, [4, 3])
    batch, (ep, start) = sample_windows(data, __import__("jax").random.key(0), B, H, return_index=True)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    ep, start = np.asarray(ep), np.asarray(start)
    assert (start <= L - (H + 1)).all() and start.max() > 0
    src = {4: arrays_slice(arrays, slice(0, 3)), 3: arrays_slice(arrays, slice(3, 6))}
    for i, tid in enumerate([4, 3]):
        for b in range(B):
            e, s = ep[i, b], start[i, b]
            np.testing.assert_array_equal(batch["obs"][i, b], src[tid]["obs"][e, s : s + H + 1])
            np.testing.assert_array_equal(batch["action"][i, b], src[tid]["action"][e, s + 1 : s + H + 1])
            np.testing.assert_array_equal(batch["reward"][i, b], src[tid]["reward"][e, s + 1 : s + H + 1])
    with HostSampler(store, [4, 3], batch_size=B, horizon=H, chunk_epochs=2) as hs:
        chunk = hs.next_chunk()
    assert chunk["obs"].shape == (2, 2, B, H + 1, 24)
    assert np.isfinite(np.asarray(chunk["action"])).all() and np.isfinite(np.asarray(chunk["reward"])).all()
    # host windows are real windows of the source episodes
    o = np.asarray(chunk["obs"])[0, 1]  # task 3
    for b in range(B):
        hits = [(e, s) for e in range(3) for s in range(L - H)
                if np.array_equal(src[3]["obs"][e, s : s + H + 1], o[b])]
        assert hits, "host window not found in the source episodes"


def arrays_slice(arrays, sl):
    return {k: v[sl] for k, v in arrays.items()}


def test_ou_exploration_is_correlated_and_in_range():
    # 'uniform' is the fixtures' stream (one rng.uniform call); 'ou' stays in [-1, 1], spreads over the whole
    # range and is strongly autocorrelated (lag-1 ~ 1 - theta before the clip), unlike i.i.d. noise.
    u = random_actions(np.random.default_rng(3), 20_000, "uniform")
    assert np.array_equal(u, np.random.default_rng(3).uniform(-1, 1, (20_000, 6)).astype(np.float32))
    a = random_actions(np.random.default_rng(3), 20_000, "ou", ou_theta=0.15, ou_sigma=0.4)
    assert a.shape == (20_000, 6) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0 and 0.5 < a.std() < 0.8
    lag1 = lambda x: np.mean([np.corrcoef(x[:-1, d], x[1:, d])[0, 1] for d in range(6)])
    assert lag1(a) > 0.75 and abs(lag1(u)) < 0.05
    ep = generate_chunk(["pendulum-spin"], seed=3, episode_length=40, noise="ou")
    assert np.abs(ep["action"][0, 1:, :1]).max() <= 1.0 and (ep["action"][0, 1:, 1:] == 0).all()
    with pytest.raises(ValueError, match="noise"):
        generate_chunk([0], episode_length=5, noise="pink")


def test_bad_arguments():
    with pytest.raises(ValueError, match="episode_length"):
        generate_chunk([0], episode_length=502)
    with pytest.raises(ValueError, match="action dims"):
        generate_chunk([4], episode_length=5, policy=lambda o, t, r: np.zeros(3))
    with pytest.raises(ValueError):
        generate_chunk([])
