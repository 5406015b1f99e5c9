"""Window samplers: contract (windows inside one episode, action/reward follow obs, index 0 never read),
distribution (uniform episodes and starts, same in both modes), episode subsampling, prefetch thread."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert_ckpt.dataset import convert
from fmbpo_jax.data.sampler import (
    DeviceSampler,
    HostSampler,
    load_device_data,
    make_sampler,
    sample_windows,
    select_episodes,
)
from fmbpo_jax.data.store import StoreError
from fmbpo_jax.data.synthetic import write_synthetic_store

L = 40  # a short episode length: the samplers must use the store's recorded length
EPISODES = {0: 5, 3: 2, 4: 7}
TASKS = [4, 0, 3]  # caller's order is kept


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn") / "store"
    return write_synthetic_store(d, EPISODES, episode_length=L, sources=2, seed=1)


def check_contract(batch, tasks, B, H, episodes=EPISODES, allowed=None):
    """Every window obeys the contract; returns (episode [T,B], start [T,B]) decoded from the values."""
    obs, act, rew = (np.asarray(batch[k]) for k in ("obs", "action", "reward"))
    T = len(tasks)
    assert obs.shape == (T, B, H + 1, 24) and act.shape == (T, B, H, 6) and rew.shape == (T, B, H)
    assert obs.dtype == act.dtype == rew.dtype == np.float32
    assert np.isfinite(act).all() and np.isfinite(rew).all(), "read an index-0 filler (NaN)"
    ep = obs[:, :, 0, 0].astype(np.int64)
    start = obs[:, :, 0, 1].astype(np.int64)
    k = np.arange(H + 1)
    for i, tid in enumerate(tasks):
        assert (obs[i, :, :, 2] == tid).all() and (act[i, :, :, 2] == tid).all()
        assert ((ep[i] >= 0) & (ep[i] < episodes[tid])).all()
        if allowed is not None:
            assert np.isin(ep[i], allowed[i]).all()
    assert (obs[..., 0] == ep[..., None]).all(), "window crosses an episode boundary"
    assert (obs[..., 1] == start[..., None] + k).all()
    assert ((start >= 0) & (start <= L - (H + 1))).all()
    assert (act[..., 0] == ep[..., None]).all()
    assert (act[..., 1] == start[..., None] + k[1:]).all(), "action must be the one that follows obs[k]"
    assert (act[..., 1] >= 1).all()
    assert (rew == ep[..., None] * L + start[..., None] + k[1:]).all(), "reward must be reward[s+k+1]"
    return ep, start


@pytest.mark.parametrize("H", [1, 7, L - 1])
def test_device_contract(store, H):
    data = load_device_data(store, TASKS)
    assert data.obs.shape == (3, 7 * L, 24)  # padded to the largest task (7 episodes)
    assert np.asarray(data.num_entries).tolist() == [7, 5, 2]
    B = 64
    for s in range(5):
        batch, (ep_i, st_i) = sample_windows(data, jax.random.key(s), B, H, return_index=True)
        ep, start = check_contract(batch, TASKS, B, H)
        np.testing.assert_array_equal(ep, np.asarray(ep_i))
        np.testing.assert_array_equal(start, np.asarray(st_i))
    if H == L - 1:
        assert (start == 0).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(H=st.integers(1, L - 1), B=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3))
def test_host_contract_property(store, H, B, seed, n):
    hs = HostSampler(store, TASKS, batch_size=B, horizon=H, chunk_epochs=n, seed=seed, start=False)
    chunk = hs.chunk_host(0)
    for e in range(n):
        check_contract({k: v[e] for k, v in chunk.items()}, TASKS, B, H)


def _chi2(counts):
    counts = np.asarray(counts, np.float64)
    exp = counts.sum() / counts.size
    return ((counts - exp) ** 2 / exp).sum(), counts.size - 1


def _assert_uniform(values, n_bins):
    counts = np.bincount(values.ravel(), minlength=n_bins)
    assert counts.size == n_bins and (counts > 0).all()
    chi2, dof = _chi2(counts)
    assert chi2 < dof + 8 * np.sqrt(2 * dof), (chi2, dof, counts)


def _many(sampler_mode, store, H, n_batches, B, **kw):
    s = make_sampler(store, sampler_mode, tasks=TASKS, batch_size=B, horizon=H, chunk_epochs=n_batches, seed=3,
                     num_threads=1, **kw)
    try:
        chunk = s.next_chunk()
    finally:
        s.close()
    eps, starts = [], []
    for e in range(n_batches):
        ep, start = check_contract({k: np.asarray(v[e]) for k, v in chunk.items()}, TASKS, B, H,
                                   allowed=kw.get("allowed"))
        eps.append(ep)
        starts.append(start)
    return np.stack(eps, 0), np.stack(starts, 0)  # [N, T, B]


@pytest.mark.parametrize("mode", ["device", "host"])
def test_distribution_uniform_episodes_and_starts(store, mode):
    H = 7
    ep, start = _many(mode, store, H, n_batches=40, B=256)
    for i, tid in enumerate(TASKS):
        _assert_uniform(ep[:, i], EPISODES[tid])
        _assert_uniform(start[:, i], L - H)
    # episode and start independent-ish: mean start the same for every episode of task 4
    means = [start[:, 0][ep[:, 0] == e].mean() for e in range(EPISODES[4])]
    assert np.ptp(means) < 2.0, means


def test_both_modes_same_distribution(store):
    H = 5
    a_ep, a_st = _many("device", store, H, 30, 256)
    b_ep, b_st = _many("host", store, H, 30, 256)
    for i, tid in enumerate(TASKS):
        fa = np.bincount(a_ep[:, i].ravel(), minlength=EPISODES[tid]) / a_ep[:, i].size
        fb = np.bincount(b_ep[:, i].ravel(), minlength=EPISODES[tid]) / b_ep[:, i].size
        np.testing.assert_allclose(fa, fb, atol=0.02)
        np.testing.assert_allclose(a_st[:, i].mean(), b_st[:, i].mean(), atol=0.6)


def test_contract_check_catches_off_by_one(store):
    """The contract check must fail on the classic mistakes (so the tests above can fail)."""
    hs = HostSampler(store, TASKS, batch_size=8, horizon=4, start=False)
    ep, start = hs.draw_indices(np.random.default_rng(0), 1)
    good = {k: v[0] for k, v in hs.gather(ep, start).items()}
    check_contract(good, TASKS, 8, 4)
    arrs = [store.arrays(t) for t in TASKS]
    same_index = {  # action/reward at s+k instead of s+k+1
        "obs": good["obs"],
        "action": np.stack([np.stack([a["action"][e, s : s + 4] for e, s in zip(ep[0, i], start[0, i])])
                            for i, a in enumerate(arrs)]),
        "reward": np.stack([np.stack([a["reward"][e, s : s + 4] for e, s in zip(ep[0, i], start[0, i])])
                            for i, a in enumerate(arrs)]),
    }
    with pytest.raises(AssertionError):
        check_contract(same_index, TASKS, 8, 4)
    crossing = {k: v.copy() for k, v in good.items()}
    crossing["obs"][0, 0, -1, 0] += 1  # last step from the next episode
    with pytest.raises(AssertionError, match="episode boundary"):
        check_contract(crossing, TASKS, 8, 4)


def test_select_episodes_all_and_reference(store):
    assert select_episodes(store, 4, "all").tolist() == list(range(7))
    # store.segments: task 4 split over 2 sources as 4 + 3 episodes
    assert store.segments(4) == [(0, 4), (1, 3)]
    rng = np.random.default_rng(0)
    dup_seen = False
    for _ in range(50):
        sel = select_episodes(store, 4, "reference", rng)  # capacity 24000 episodes: all fit
        assert sel.size == 7
        assert ((sel[:4] >= 0) & (sel[:4] < 4)).all() and ((sel[4:] >= 4) & (sel[4:] < 7)).all()
        dup_seen |= np.unique(sel).size < sel.size
    assert dup_seen, "reference subsampling draws with replacement"
    # capacity 3 episodes: each chunk keeps min(n, 3) draws, the ring keeps the last 3 overall
    sel = select_episodes(store, 4, "reference", 0, capacity_steps=3 * L + 5)
    assert sel.size == 3 and ((sel >= 4) & (sel < 7)).all()
    with pytest.raises(ValueError):
        select_episodes(store, 4, "bogus")


@pytest.mark.parametrize("mode", ["device", "host"])
def test_reference_subsampling_in_samplers(store, mode):
    cap = 2 * L
    s = make_sampler(store, mode, tasks=TASKS, batch_size=64, horizon=3, chunk_epochs=5, seed=11,
                     episode_subsampling="reference", capacity_steps=cap)
    try:
        chunk = s.next_chunk()
    finally:
        s.close()
    rng = np.random.default_rng(11)  # the samplers draw the selections task by task from default_rng(seed)
    allowed = [select_episodes(store, t, "reference", rng, capacity_steps=cap) for t in TASKS]
    assert all(a.size == 2 for a in allowed)
    for e in range(5):
        ep, _ = check_contract({k: np.asarray(v[e]) for k, v in chunk.items()}, TASKS, 64, 3, allowed=allowed)


def test_host_stream_deterministic_and_thread_independent(store):
    kw = dict(tasks=TASKS, batch_size=16, horizon=4, chunk_epochs=2, seed=5)
    with HostSampler(store, num_threads=1, **kw) as a, HostSampler(store, num_threads=2, prefetch=1, **kw) as b:
        for _ in range(4):
            ca, cb = a.next_chunk(), b.next_chunk()
            assert isinstance(ca["obs"], jax.Array)
            for k in ca:
                np.testing.assert_array_equal(np.asarray(ca[k]), np.asarray(cb[k]))
    c = HostSampler(store, to_device=False, **kw)
    c0 = next(iter(c))
    c.close()
    assert isinstance(c0["obs"], np.ndarray)
    np.testing.assert_array_equal(c0["obs"], HostSampler(store, start=False, **kw).chunk_host(0)["obs"])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_host_stream_resumes_at_first_chunk(store, threads):
    """A resumed run (first_chunk=k) gets chunks k, k+1, ... exactly, whatever the thread count."""
    kw = dict(tasks=TASKS, batch_size=8, horizon=4, chunk_epochs=2, seed=3)
    ref = HostSampler(store, start=False, **kw)
    for first in (0, 1, 2):
        with HostSampler(store, num_threads=threads, prefetch=1, first_chunk=first, **kw) as hs:
            for i in range(first, first + 4):
                got, want = hs.next_chunk(), ref.chunk_host(i)
                for k in want:
                    np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=f"chunk {i} {k}")


def test_host_worker_error_surfaces(store):
    hs = HostSampler(store, TASKS, batch_size=4, horizon=2, start=False)
    hs._rows = None  # break the gather
    hs.start()
    with pytest.raises(RuntimeError, match="worker failed"):
        hs.next_chunk()
    hs.close()


def test_sample_windows_inside_user_jit(store):
    data = load_device_data(store, [0, 3])

    @jax.jit
    def train(data, key):
        def step(carry, k):
            b = sample_windows(data, k, 8, 4)
            return carry + b["reward"].sum(), b["obs"][:, :, 0, 0]
        return jax.lax.scan(step, jnp.float32(0), jax.random.split(key, 6))

    total, eps = train(data, jax.random.key(0))
    assert eps.shape == (6, 2, 8) and np.isfinite(float(total))


def test_bad_requests(store):
    with pytest.raises(ValueError, match="horizon"):
        DeviceSampler(store, TASKS, horizon=L)
    with pytest.raises(ValueError, match="horizon"):
        HostSampler(store, TASKS, horizon=0, start=False)
    with pytest.raises(StoreError, match="no episodes"):
        HostSampler(store, [1], start=False)
    with pytest.raises(ValueError, match="mode"):
        make_sampler(store, "tpu")


def test_fixture_store_windows_match_source(tmp_path):
    fix = Path(__file__).parent / "fixtures" / "data"
    st_ = convert([str(fix)], str(tmp_path / "s"), log=lambda m: None)
    data = load_device_data(st_, [0, 3, 4])
    H, B = 16, 32
    batch, (ep, start) = sample_windows(data, jax.random.key(1), B, H, return_index=True)
    ep, start = np.asarray(ep), np.asarray(start)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    for i, tid in enumerate([0, 3, 4]):
        arr = st_.arrays(tid)
        for b in range(B):
            e, s = ep[i, b], start[i, b]
            np.testing.assert_array_equal(batch["obs"][i, b], arr["obs"][e, s : s + H + 1])
            np.testing.assert_array_equal(batch["action"][i, b], arr["action"][e, s + 1 : s + H + 1])
            np.testing.assert_array_equal(batch["reward"][i, b], arr["reward"][e, s + 1 : s + H + 1])
    assert np.isfinite(batch["action"]).all() and np.isfinite(batch["reward"]).all()
    hs = HostSampler(st_, [4], batch_size=B, horizon=H, start=False)
    hb = hs.chunk_host(0)
    assert np.isfinite(hb["reward"]).all() and set(np.unique(hb["reward"])) <= {0.0, 1.0, 2.0}


@pytest.mark.parametrize("to_device", [True, False])
def test_host_buffers_not_recycled_while_held(store, to_device):
    """Chunk buffers are pooled; a chunk the consumer still holds must never be overwritten."""
    kw = dict(tasks=TASKS, batch_size=16, horizon=4, chunk_epochs=2, seed=9)
    ref = HostSampler(store, start=False, **kw)
    with HostSampler(store, prefetch=1, to_device=to_device, **kw) as hs:
        held = [hs.next_chunk()]
        for _ in range(20):  # churn: released chunks get recycled
            hs.next_chunk()
        held.append(hs.next_chunk())
        assert len(hs._pool._bufs) <= hs._pool.max_buffers
        assert hs._pool.allocations < 10, "buffers are recycled"
    for i, c in zip([0, 21], held):
        want = ref.chunk_host(i)
        for k in want:
            np.testing.assert_array_equal(np.asarray(c[k]), want[k])
