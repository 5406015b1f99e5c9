"""RunPlan: one frozen, validated object from the config; every error names its flag; the run axis and the loop
skeleton the trainer and WM pretraining share."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmbpo_jax import run_config
from fmbpo_jax.run_config import ConfigError, RunPlan
from fmbpo_jax.sharding import RunAxis
from fmbpo_jax.training.lifecycle import Checkpointer, every, run_chunks


def test_plan_resolves_the_config_once():
    c = tiny_config("STORE", seeds="1,2", task_chunk=-1, precision="tf32", **{"eval.seed": 7, "diagnostics.freq": 5})
    plan = RunPlan.from_config(c)
    assert plan.spec == run_config.run_spec(c) and plan.pwm == run_config.pwm_config(c)
    assert plan.behaviours == run_config.behaviours(c)
    assert (plan.epochs, plan.batch_size, plan.wm_batch_size) == (c.epochs, c.alg.batch_size, c.alg.wm_batch_size)
    assert plan.cadence == run_config.Cadence(chunk_epochs=5, log_freq=5, eval_freq=10, checkpoint_freq=10, diagnostics_freq=5)
    assert plan.cadence.should_eval(20) and not plan.cadence.should_eval(15) and plan.cadence.should_diagnose(15)
    assert plan.data.dataset_dir == "STORE" and plan.eval.seed == 7 and plan.matmul_precision == "tensorfloat32"
    assert plan.task_chunk == -1 and plan.eval.task_chunk == 0  # planning plans every task row at once under auto
    assert plan.eval.mppi.num_samples == c.eval.mppi_samples and plan.eval.planning == "mppi"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.epochs = 3
    assert run_config.as_plan(plan) is plan and hash(plan) == hash(RunPlan.from_config(c))
    ref = RunPlan.from_config(tiny_config("STORE", preset="reference"))
    assert ref.eval.planning == "plain" and ref.eval.mppi is None  # B8: no planner, no MPPI settings needed


@pytest.mark.parametrize("overrides,match", [
    ({"eval.freq": 7}, r"--config\.eval\.freq=7 and --config\.checkpoint_freq=10 must be multiples of --config\.chunk_epochs=5"),
    ({"data_parallel": -1}, r"--config\.data_parallel=-1 must be >= 1"),
    ({"data_parallel": 2, "task_chunk": 1}, r"--config\.data_parallel=2 needs --config\.task_chunk=0"),
    ({"eval.mppi_elites": 64}, r"--config\.eval\.mppi_\*: mppi_elites=64 must be in \[1, mppi_samples=32\]"),
])
def test_every_config_error_names_its_flag(overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunPlan.from_config(tiny_config("STORE", **overrides))


def test_checks_that_need_the_machine_or_the_data():
    plan = RunPlan.from_config(tiny_config("STORE", data_parallel=2))
    plan.check_devices(4)
    with pytest.raises(ConfigError, match=r"--config\.data_parallel=2 must divide the device count 3"):
        plan.check_devices(3)
    RunPlan.from_config(tiny_config("STORE", task_chunk=-1)).check_sampler("device")
    with pytest.raises(ConfigError, match=r"--config\.task_chunk=-1 \(auto\).*set --config\.task_chunk explicitly"):
        RunPlan.from_config(tiny_config("STORE", task_chunk=-1)).check_sampler("host")
    with pytest.raises(ConfigError, match=r"--config\.diagnostics\.freq needs --config\.data\.sampler=device"):
        RunPlan.from_config(tiny_config("STORE", **{"diagnostics.freq": 5})).check_sampler("host")


def test_a_pretrained_world_model_keeps_the_runs_free_fields():
    plan = RunPlan.from_config(tiny_config("STORE", precision="bf16", **{"model.wm_substeps": 3}))
    ck = dataclasses.replace(plan.pwm.wm, units=(48, 48), substeps=9, vmin=-3.0, compute_dtype="float32")
    got = plan.with_world_model(ck, "ck").pwm.wm
    assert (got.units, got.substeps, got.vmin, got.compute_dtype) == ((48, 48), plan.pwm.wm.substeps, plan.pwm.wm.vmin, "bfloat16")
    with pytest.raises(ConfigError, match=r"--config\.world_model='mlp' but ck holds a 'flow' world model"):
        plan.with_world_model(dataclasses.replace(ck, kind="flow"), "ck")
    with pytest.raises(ConfigError, match=r"ck: the checkpoint has 3 tasks, the config expects 30"):
        plan.with_world_model(dataclasses.replace(ck, num_tasks=3), "ck")


def test_run_axis_on_one_process():
    axis = RunAxis.create(3)
    tree = {"a": jnp.arange(6.0).reshape(3, 2), "k": jnp.arange(3, dtype=jnp.uint32)}
    padded = axis.place(tree)
    assert padded["a"].shape == (axis.padded, 2) and axis.padded % axis.mesh.shape["task"] == 0
    np.testing.assert_array_equal(axis.gather(padded)["a"], np.arange(6.0).reshape(3, 2))  # dummy rows dropped
    metrics = {"m": jnp.zeros((4, axis.padded))}
    assert axis.gather_metrics(metrics)["m"].shape == (4, 3)
    rows, local = axis.local(padded)
    np.testing.assert_array_equal(rows, np.arange(3))
    np.testing.assert_array_equal(np.asarray(local["k"]), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(axis.place_host(np.array([5, 6, 7], np.int32)))[:3], [5, 6, 7])
    assert axis.any(True) and not axis.any(False) and axis.all(True) and not axis.all(False)
    assert axis.constrain() is None and np.array_equal(axis.rows, np.arange(axis.padded))


def test_run_chunks_saves_on_the_clock_at_the_end_and_when_stopped():
    def loop(done, total, stop_after=None):
        steps, saves = [], []
        out = run_chunks(done, total, 4, lambda d, n: steps.append((d, n)), saves.append, every(8),
                         lambda: stop_after is not None and steps[-1][0] + steps[-1][1] >= stop_after)
        return out, steps, saves

    assert loop(0, 18) == ((18, False), [(0, 4), (4, 4), (8, 4), (12, 4), (16, 2)], [8, 16, 18])
    assert loop(8, 18, stop_after=12) == ((12, True), [(8, 4)], [12])  # a SIGTERM: checkpoint now, then stop
    assert loop(18, 18) == ((18, False), [], [])  # finished: nothing to do


def test_checkpointer_round_trip(tmp_path):
    ck = Checkpointer(str(tmp_path))
    assert ck.latest_step() is None
    tree = {"w": jnp.arange(3.0), "k": jax.random.PRNGKey(1)}
    for step in (5, 10, 15):
        ck.save(step, jax.tree_util.tree_map(lambda x: x + step if x.dtype == jnp.float32 else x, tree), {"epoch": step})
    ck.close()
    ck = Checkpointer(str(tmp_path))
    got, meta = ck.restore(tree)
    ck.close()
    assert meta == {"epoch": 15} and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "15"]
    np.testing.assert_array_equal(got["w"], np.arange(3.0) + 15)
    np.testing.assert_array_equal(got["k"], tree["k"])
