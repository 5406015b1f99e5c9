"""The multitask trainer: vmapped runs equal looped runs, config validation, the NaN guard."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from conftest import TINY_TASKS, tiny_config
from fmbpo_jax import run_config
from fmbpo_jax.data.sampler import load_device_data
from fmbpo_jax.envs.tasks import MT30_TASKS
from fmbpo_jax.training.program import init_runs, make_train_chunk, run_keys
from fmbpo_jax import world_model as wm


def assert_same_leaves(a, b):
    """Two pytrees with the same number of (non-zero) leaves, bitwise equal leaf by leaf."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@functools.lru_cache(maxsize=8)
def _chunk_fn(pcfg, epochs: int, batch_size: int, wm_batch_size: int, task_chunk: int):
    """One jitted chunk per setting: the runs trained alone share it (same shapes) instead of compiling 6 times."""
    return make_train_chunk(pcfg, epochs, batch_size, wm_batch_size, task_chunk)


def _train(config, store, tasks, seeds, epochs=6):
    config = tiny_config(store, tasks=",".join(tasks), seeds=",".join(map(str, seeds)), **config)
    spec = run_config.run_spec(config)
    pcfg = run_config.pwm_config(config)
    data = load_device_data(store, list(spec.task_ids))
    state = init_runs(pcfg, run_keys(spec))
    frozen = None if pcfg.finetune_wm else wm.init(pcfg.wm, jax.random.PRNGKey(0))
    fn = _chunk_fn(pcfg, epochs, config.alg.batch_size, config.alg.wm_batch_size, config.task_chunk)
    state, metrics = fn(state, frozen, data, jax.numpy.asarray(spec.run_task_pos), jax.numpy.asarray(spec.run_task_ids))
    return spec, state, metrics


@pytest.mark.parametrize("finetune", [False, True])
def test_vmapped_equals_looped(tiny_store, finetune):
    """3 tasks (x 2 seeds) trained together give the same params and metrics as each run alone."""
    over = {"finetune_wm": finetune}
    spec, state, metrics = _train(over, tiny_store, TINY_TASKS, [1, 2])
    keys = ["actor", "critic"] + (["wm"] if finetune else [])
    for r, (task, seed) in enumerate(zip(spec.run_task_ids, spec.run_seeds)):
        _, alone, m_alone = _train(over, tiny_store, [MT30_TASKS[task]], [seed])
        for k in ("actor_loss", "value_loss", "actor_grad_norm", "critic_grad_norm") + (("wm_loss",) if finetune else ()):
            # The first epoch starts from identical states: only the rounding of batched vs unbatched matmuls
            # (~1e-7 each, summed over a 16-step rollout: seen up to 4e-6) may differ.
            np.testing.assert_allclose(m_alone[k][0, 0], metrics[k][0, r], atol=1e-6, rtol=1e-5, err_msg=k)
            # Later epochs start from params that already differ by Adam-amplified rounding (see the params
            # check below: rare entries up to lr/10), so single values wander further (seen up to 2e-5, chaotic
            # in the seed and in ulp-level changes of any op); the typical epoch must still agree to 1e-5.
            rel = np.abs(m_alone[k][:, 0] - metrics[k][:, r]) / np.maximum(np.abs(metrics[k][:, r]), 1e-6)
            assert np.median(rel) < 1e-5 and rel.max() < 1e-4, (k, rel)
        a = np.concatenate([np.ravel(x[0]) for x in jax.tree_util.tree_leaves([getattr(alone.train, k) for k in keys])])
        b = np.concatenate([np.ravel(x[r]) for x in jax.tree_util.tree_leaves([getattr(state.train, k) for k in keys])])
        err = np.abs(a - b)
        # Batched and unbatched matmuls round differently (~1e-7). Adam's first steps are ~lr*sign(g), so an entry
        # whose gradient is ~0 can turn that noise into a visible step: allow 1 in 10^3 entries up to lr/10 = 5e-5.
        assert np.mean(err > 1e-6) < 1e-3 and err.max() < 5e-5, (spec.run_name(r), err.max(), np.mean(err > 1e-6))


def test_task_chunked_equals_vmapped(tiny_store):
    _, s1, m1 = _train({}, tiny_store, TINY_TASKS, [1, 2], epochs=3)
    _, s2, m2 = _train({"task_chunk": 2}, tiny_store, TINY_TASKS, [1, 2], epochs=3)
    np.testing.assert_allclose(m1["actor_loss"], m2["actor_loss"], atol=1e-6, rtol=1e-5)
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(s1.train.critic)])
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(s2.train.critic)])
    assert np.mean(np.abs(a - b) > 1e-6) < 1e-3 and np.abs(a - b).max() < 5e-5


@pytest.mark.parametrize("flag,value,match", [
    ("tasks", "walker-stand,no-such-task", "--config.tasks: unknown task"),
    ("epochs", 0, "--config.epochs=0"),
    ("model.wm_substeps", 0, "--config.model.wm_substeps=0"),
    ("model.actor_substeps", 0, "--config.model.actor_substeps=0"),
    ("alg.horizon", 0, "--config.alg.horizon=0"),
    ("alg.critic_batches", 3, "--config.alg.critic_batches=3"),
    ("preset", "nope", "--config.preset"),
    ("world_model", "transformer", "--config.world_model"),
    ("task_chunk", 4, "--config.task_chunk=4"),
])
def test_config_validation_names_the_flag(tiny_store, flag, value, match):
    c = tiny_config(tiny_store, **{flag: value})
    with pytest.raises(run_config.ConfigError, match=match):
        run_config.validate(c)


def test_phase_needing_checkpoint_and_dataset_errors(tiny_store):
    from configs import phase3

    c = phase3.get_config()
    with pytest.raises(run_config.ConfigError, match="--config.checkpoint"):
        run_config.validate(c)
    from fmbpo_jax.training.trainer import train

    c = tiny_config(tiny_store, **{"data.dataset_dir": ""})
    with pytest.raises(run_config.ConfigError, match="convert_ckpt dataset"):
        train(c, "/tmp/never-used", log=lambda s: None)
    c = tiny_config(tiny_store, checkpoint="/nonexistent/wm.pt")
    with pytest.raises(run_config.ConfigError, match="--config.checkpoint"):
        train(c, "/tmp/never-used", log=lambda s: None)


def test_every_phase_config_resolves():
    import importlib

    for name, arg in [("phase3", "baseline"), ("phase3", "flowpolicy"), ("phase4", None), ("phase5", "euler_fast"),
                      ("phase6", "fullflow"), ("phase7", "flow_high"), ("phase8", "flow"), ("phase9", "cond3"), ("demo", None)]:
        mod = importlib.import_module(f"configs.{name}")
        c = mod.get_config(arg) if arg else mod.get_config()
        c.checkpoint = "x.pt" if c.checkpoint_required else ""
        run_config.validate(c)
        p = run_config.pwm_config(c)
        assert p.wm.kind == c.world_model and p.actor.kind == c.actor and p.max_epochs == c.epochs
    c = importlib.import_module("configs.phase6").get_config("fullflow")
    p = run_config.pwm_config(c)
    assert (p.wm.substeps, p.actor.substeps, p.wm.units) == (8, 4, (1788, 1788))
    c.preset = "reference"
    p = run_config.pwm_config(c)
    assert p.reward_loss == "mse_bins" and p.wm.velocity_head == "simnorm" and p.terminal_discount == "gamma_h_plus_1"


def test_diagnostics_written_every_n_epochs(tiny_store, tmp_path):
    from fmbpo_jax.textio import read_jsonl
    from fmbpo_jax.training.trainer import train

    c = tiny_config(tiny_store, epochs=10, **{"diagnostics.freq": 5, "diagnostics.num_groups": 4, "eval.episodes": 0})
    train(c, str(tmp_path / "run"), log=lambda s: None)
    rows = read_jsonl(str(tmp_path / "run" / "diagnostics.jsonl"))
    assert sorted({r["epoch"] for r in rows}) == [5, 10] and len(rows) == 2 * 3
    for r in rows:
        assert np.isfinite(r["actor_esnr_db"]) and r["wm_jac_z"] > 0 and r["wm_jac_a"] > 0, r


def test_host_sampler_training_resumes_bitwise(tiny_store, tmp_path):
    """--config.data.sampler=host through the trainer: a run killed after its epoch-5 checkpoint and restarted
    equals an uninterrupted run bitwise (the host stream's chunk i is a pure function of (seed, i), with 2
    gather threads), and the losses are finite."""
    from fmbpo_jax.textio import read_jsonl
    from fmbpo_jax.training.trainer import train

    class Killed(Exception):
        pass

    def kill_after_chunk_2(rows):  # rows of the chunk that starts at epoch 5: after save(5), before save(10)
        if rows[0]["epoch"] == 5:
            raise Killed

    config = tiny_config(tiny_store, epochs=10, **{"data.sampler": "host", "data.host_threads": 2, "eval.episodes": 0,
                                                   "checkpoint_freq": 5, "log_freq": 5})
    train(config, str(tmp_path / "once"), log=lambda s: None)
    with pytest.raises(Killed):
        train(config, str(tmp_path / "twice"), on_metrics=kill_after_chunk_2, log=lambda s: None)
    logs = []
    train(config, str(tmp_path / "twice"), log=logs.append)
    assert any("resumed from" in s and "epoch 5" in s for s in logs), logs
    from test_main_e2e import final_params

    (_, a), (_, b) = final_params(tmp_path / "once"), final_params(tmp_path / "twice")
    assert_same_leaves(a, b)
    rows_a = read_jsonl(str(tmp_path / "once" / "metrics.jsonl"))
    rows_b = read_jsonl(str(tmp_path / "twice" / "metrics.jsonl"))
    assert len(rows_a) == 2 * 3 and all(np.isfinite(r["actor_loss"]) and np.isfinite(r["value_loss"]) for r in rows_a)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "total_time"} for r in rows]  # noqa: E731
    assert drop(rows_a) == drop(rows_b)


def test_out_of_device_memory_names_the_flags_that_shrink_the_step(tiny_store, tmp_path, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED in the training chunk becomes an error naming --config.task_chunk / remat (what a
    48M full-flow x 30-task run on one 80 GB GPU needs, measured: README 'Memory'); other errors pass unchanged."""
    from fmbpo_jax import sharding
    from fmbpo_jax.training import lifecycle
    from fmbpo_jax.training.trainer import train

    def raising(exc):
        return lambda fn, mesh: (lambda *args: (_ for _ in ()).throw(exc))

    config = tiny_config(tiny_store, epochs=4, **{"eval.episodes": 0})  # 3 tasks x 1 seed, task_chunk 0, remat off
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 164.02GiB with "
                                     "allocator GPU_0_bfc on device 0. [executable_name='jit_chunk']")
    monkeypatch.setattr(sharding, "shard_chunk_fn", raising(oom))
    with pytest.raises(lifecycle.OutOfDeviceMemory) as info:
        train(config, str(tmp_path / "oom"), log=lambda s: None)
    msg = str(info.value)
    assert "3 of 3 runs" in msg and "--config.task_chunk=1" in msg and "--config.remat=True" in msg and "164.02GiB" in msg
    assert info.value.__cause__ is oom
    assert isinstance(info.value, lifecycle.TrainingStopped)  # main maps it to exit code 1 with the message

    monkeypatch.setattr(sharding, "shard_chunk_fn", raising(ValueError("not a memory problem")))
    with pytest.raises(ValueError, match="not a memory problem"):
        train(config, str(tmp_path / "other"), log=lambda s: None)

    # a chunked, rematerialised run: halve the chunk, do not suggest remat again
    advice = lifecycle.out_of_memory_advice(oom, runs=30, task_chunk=10, remat=True)
    assert "10 of 30 runs" in advice and "--config.task_chunk=5" in advice and "remat=True (" not in advice
    assert lifecycle.out_of_memory_advice(RuntimeError("INTERNAL: something else"), runs=30, task_chunk=0, remat=False) is None
    # the middle policy: suggest the step policy, not itself
    advice = lifecycle.out_of_memory_advice(oom, runs=30, task_chunk=0, remat="matmul_inputs")
    assert "remat=True (" in advice and "remat_policy=matmul_inputs (" not in advice and "'matmul_inputs'" in advice
    assert "remat_policy=matmul_inputs (" in lifecycle.out_of_memory_advice(oom, runs=30, task_chunk=0, remat="all")


def test_deterministic_flag_is_set_before_jax_starts_or_warns(monkeypatch):
    """--config.deterministic=True: XLA reads XLA_FLAGS once, when jax starts its backends. Set before that (what the
    main job does first), no warning; after (this test process has used jax), a warning that says what to do."""
    import os
    import subprocess
    import sys

    from ml_collections import ConfigDict

    jax.devices()  # this process's backends are up
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    assert run_config.apply_xla_flags(ConfigDict({"deterministic": False})) is None
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=true"
    late = run_config.apply_xla_flags(ConfigDict({"deterministic": True}))
    assert late and "XLA_FLAGS=--xla_gpu_deterministic_ops=true" in late
    assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_use_thunk_runtime=true", "--xla_gpu_deterministic_ops=true"]
    assert run_config.apply_xla_flags(ConfigDict({"deterministic": True})) is None  # already there: nothing to say

    code = ("import os; from ml_collections import ConfigDict; from fmbpo_jax import run_config; "
            "w = run_config.apply_xla_flags(ConfigDict({'deterministic': True})); import jax; jax.devices(); "
            "print(repr(w), os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["None", "--xla_gpu_deterministic_ops=true"]


def test_task_chunk_auto_chooses_the_largest_group_that_fits():
    """--config.task_chunk=-1 on a made-up memory curve (10 GB + 5 GB per run at once, 30 runs): the largest
    divisor of 30 that fits, with the candidates a straight line predicts too big skipped."""
    from fmbpo_jax.training.memory import choose_task_chunk

    def pick(budget_gb):
        tried = []

        def bytes_for(chunk):
            tried.append(chunk)
            return int((10 + 5 * (chunk or 30)) * 1e9)

        return choose_task_chunk(30, bytes_for, budget_gb * 1e9 if budget_gb else None, lambda s: None), tried

    assert pick(200) == (0, [0])  # all 30 at once fit
    assert pick(60) == (10, [0, 15, 10])  # 160 and 85 GB too big; 10 runs: 60 GB
    assert pick(52) == (6, [0, 15, 6])  # 10 runs predicted 60 GB: skipped without compiling
    assert pick(1) == (1, [0, 15, 1])  # nothing fits: one run at a time, XLA will name the shortfall
    assert pick(None) == (0, [])  # CPU: no device limit, nothing compiled
    assert choose_task_chunk(6, lambda c: None, 1.0, lambda s: None) == 0  # no memory analysis: take it


def test_task_chunk_auto_in_the_trainer_equals_the_explicit_chunk(tiny_store, tmp_path):
    """The trainer measures its own compiled step: a budget below every program (--config.task_chunk_memory_gb)
    gives one run at a time, the same params bitwise as --config.task_chunk=1 (choices: the test above)."""
    from test_main_e2e import final_params

    from fmbpo_jax.training.trainer import train

    common = dict(epochs=5, checkpoint_freq=5, **{"eval.episodes": 0})
    logs = []
    train(tiny_config(tiny_store, task_chunk=-1, task_chunk_memory_gb=1e-9, **common), str(tmp_path / "auto"),
          log=logs.append)
    assert "task_chunk=-1: using --config.task_chunk=1" in logs and any("too big" in s for s in logs), logs
    train(tiny_config(tiny_store, task_chunk=1, **common), str(tmp_path / "one"), log=lambda s: None)
    (_, a), (_, b) = final_params(tmp_path / "auto"), final_params(tmp_path / "one")
    assert_same_leaves(a, b)
