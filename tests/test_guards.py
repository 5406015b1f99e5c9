"""Numerical guards in the trainer: a NaN batch for one task skips that run's updates only, is counted,
and after max_nan_skips consecutive skips the run stops with a message naming the task and the quantity."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmbpo_jax import run_config
from fmbpo_jax import world_model as wm
from fmbpo_jax.training import feed, program
from fmbpo_jax.training.lifecycle import TrainingStopped
from fmbpo_jax.training.trainer import train
from fmbpo_jax.data.sampler import load_device_data


def poisoned(store, spec, task_pos):
    data = load_device_data(store, list(spec.task_ids))
    return dataclasses.replace(data, obs=data.obs.at[task_pos].set(jnp.nan))


def test_nan_task_is_skipped_and_counted_others_train(tiny_store):
    c = tiny_config(tiny_store)
    spec = run_config.run_spec(c)
    pcfg = run_config.pwm_config(c)
    state0 = program.init_runs(pcfg, program.run_keys(spec))
    snapshot = jax.tree_util.tree_map(jnp.array, state0.train.actor)
    frozen = wm.init(pcfg.wm, jax.random.PRNGKey(0))
    fn = program.make_train_chunk(pcfg, 4, c.alg.batch_size, c.alg.wm_batch_size)
    state, m = fn(state0, frozen, poisoned(tiny_store, spec, 1), jnp.asarray(spec.run_task_pos), jnp.asarray(spec.run_task_ids))
    skips = np.asarray(m["actor_nan_skip"])  # [epochs, runs]
    assert skips[:, 1].tolist() == [1, 1, 1, 1] and skips[:, [0, 2]].sum() == 0
    assert np.asarray(state.nan_streak).tolist() == [0, 4, 0]
    for a, b in zip(jax.tree_util.tree_leaves(snapshot), jax.tree_util.tree_leaves(state.train.actor)):
        np.testing.assert_array_equal(a[1], b[1])  # the poisoned run's actor is untouched
        assert np.all(np.isfinite(b))
    assert not np.allclose(jax.tree_util.tree_leaves(snapshot)[1][0], jax.tree_util.tree_leaves(state.train.actor)[1][0])


def test_consecutive_skips_stop_the_run_naming_task(tiny_store, tmp_path, monkeypatch):
    c = tiny_config(tiny_store, max_nan_skips=3, **{"eval.episodes": 0})
    spec = run_config.run_spec(c)
    monkeypatch.setattr(feed, "open_data", lambda config, spec_, sub, h, **kw: ("device", poisoned(tiny_store, spec, 2)))
    with pytest.raises(TrainingStopped, match=r"walker-stand/seed1: 5 consecutive updates skipped for non-finite actor"):
        train(c, str(tmp_path / "run"), log=lambda s: None)
