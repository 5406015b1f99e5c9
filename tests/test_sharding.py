"""Sharded training equals unsharded training; checkpoints restore onto another device count.

JAX fixes its device count when it starts, and the pytest process has one CPU device. So every check runs
in a fresh interpreter with XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts:
this file is also the worker script (`python tests/test_sharding.py WORKER ARGS_JSON`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEEDS = (1, 2)  # x 3 tiny tasks = 6 runs
EPOCHS = 3


def _spawn(worker: str, devices: int, timeout: int = 300, **args) -> dict:
    env = dict(os.environ)
    # the device count must be set before JAX starts; XLA:CPU's LLVM optimizations off halve the compile time of
    # these tiny programs (every compared program is compiled with the same flags)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
                        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), worker, json.dumps(args)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"worker {worker} failed:\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_sharded_equals_unsharded_and_checkpoint_restores_elsewhere(tiny_store, tmp_path):
    """6 runs on 1, 2, 3 and 8 devices (8: 2 dummy runs) == unsharded; with the batch split over a 'data' axis
    (4 x 2 devices: 2 dummy runs, each run's batch on 2 devices) too; a checkpoint from 8 devices restores on 2."""
    ckpt = str(tmp_path / "ckpt")
    cache = str(tmp_path / "jax_cache")  # the 2-device worker reuses the first worker's compiled programs
    out = _spawn("train", 8, store=tiny_store, ckpt=ckpt, cache=cache, meshes=[[8, 1], [1, 1], [2, 1], [3, 1], [4, 2]])
    assert out["checked"] == ["8x1", "1x1", "2x1", "3x1", "4x2"], out
    assert out["valid"]["8x1"] == [True] * 6 + [False] * 2 and out["valid"]["3x1"] == [True] * 6
    assert out["valid"]["4x2"] == [True] * 6 + [False] * 2
    # runs never talk to each other: only a split batch makes the program reduce (its gradients) across devices
    assert out["all_reduce"] == {"8x1": False, "1x1": False, "2x1": False, "3x1": False, "4x2": True}, out["all_reduce"]
    assert out["ckpt_shards_8x1"] == 3  # 6 runs on gcd(6, 8) = 2 groups: 3 runs per device, not 6
    out2 = _spawn("restore", 2, store=tiny_store, ckpt=ckpt, cache=cache)
    assert out2 == {"devices": 2, "restored_equal": True, "shards": 3, "continued_equal": True}, out2


def test_padding_and_multihost_helpers():
    """pad_runs / unpad / process_run_rows / multihost detection without a device mesh of more than one."""
    import numpy as np

    from fmbpo_jax import sharding

    tree = {"a": np.arange(6.0).reshape(6, 1), "k": np.arange(12, dtype=np.uint32).reshape(6, 2)}
    padded, valid = sharding.pad_runs(tree, 4)
    assert padded["a"].shape == (8, 1) and padded["k"].shape == (8, 2)
    np.testing.assert_array_equal(padded["a"][6:], tree["a"][[0, 0]])
    np.testing.assert_array_equal(valid, [True] * 6 + [False] * 2)
    back = sharding.unpad(padded, 6)
    np.testing.assert_array_equal(back["k"], tree["k"])
    m = np.zeros((5, 8))
    assert sharding.unpad({"m": m}, 6, axis=1)["m"].shape == (5, 6)
    assert sharding.pad_runs(tree, 3)[1].all() and sharding.padded_size(30, 8) == 32 and sharding.padded_size(30, 4) == 32
    with pytest.raises(ValueError, match="leading run axis"):
        sharding.pad_runs({"a": np.zeros(6), "b": np.zeros(5)}, 4)
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("task", "data")
    np.testing.assert_array_equal(sharding.process_run_rows(mesh, 6), np.arange(6))
    assert not sharding.multihost_requested(env={})
    assert not sharding.multihost_requested(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})
    assert sharding.multihost_requested(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
    assert sharding.multihost_requested(env={"TPU_WORKER_HOSTNAMES": "h0,h1"})
    assert not sharding.multihost_requested(env={"TPU_WORKER_HOSTNAMES": "localhost"})
    assert sharding.multihost_requested(flag=True, env={})


def test_multiprocess_layout_helpers(tiny_store):
    """The per-process pieces of the multi-host trainer, on one process: which windows feed which rows, the
    host sampler's task subset, evaluation groups and bundles, gathering per-run scores."""
    import numpy as np

    from conftest import TINY_TASKS
    from fmbpo_jax import sharding
    from fmbpo_jax.data.sampler import HostSampler
    from fmbpo_jax.run_config import RunSpec
    from fmbpo_jax.training.evaluation import eval_groups, group_bundles, per_run_values
    from fmbpo_jax.training.feed import local_host_batches, local_run_layout

    spec = RunSpec(task_ids=(0, 5, 9), seeds=(1, 2))  # R = 6, T = 3; padded to 8 on 4 shards
    # process 1 of 2 holds padded rows 4..7: runs 4, 5 (seed 1, tasks 1, 2) and two dummy rows
    pos, seed = local_run_layout(spec, np.arange(4, 8))
    np.testing.assert_array_equal(pos, [1, 2, 1, 1])  # dummies reuse the process's first real row (run 4)
    np.testing.assert_array_equal(seed, [1, 1, 1, 1])
    np.testing.assert_array_equal(local_run_layout(spec, np.array([6, 7]))[0], [0, 0])  # no real row: run 0's

    # run-major rows == what the trainer's task-major regrouping gives those runs, from a task subset
    per, n = 3, 2
    full = HostSampler(tiny_store, list(TINY_TASKS), batch_size=2 * per, horizon=4, chunk_epochs=n, start=False, to_device=False)
    part = HostSampler(tiny_store, list(TINY_TASKS), batch_size=2 * per, horizon=4, chunk_epochs=n, start=False, to_device=False,
                       gather_tasks=[1, 2])
    a, b = full.chunk_host(7), part.chunk_host(7)
    np.testing.assert_array_equal(b["obs"], a["obs"][:, 1:])  # the same stream, only tasks 1 and 2 gathered
    runs = local_host_batches(b, [1, 2], pos, seed, num_seeds=2)
    assert runs["obs"].shape == (n, 4, per) + a["obs"].shape[3:]
    for j, (p, s) in enumerate(zip(pos, seed)):
        for k in ("obs", "action", "reward"):
            np.testing.assert_array_equal(runs[k][:, j], a[k][:, p, s * per:(s + 1) * per])
    with pytest.raises(ValueError, match="gather_tasks"):
        HostSampler(tiny_store, list(TINY_TASKS), batch_size=2, horizon=4, start=False, gather_tasks=[3])

    # evaluation: groups per seed of the real rows; bundles pick those rows
    assert eval_groups(spec, np.arange(4, 8)) == [(1, (1, 2))]
    assert eval_groups(spec, np.arange(0, 4)) == [(0, (0, 1, 2)), (1, (0,))]
    assert eval_groups(spec, np.arange(8)) == [(0, (0, 1, 2)), (1, (0, 1, 2))]
    local = {"actor": {"w": np.arange(4.0)[:, None] + 4}, "critic": {"q": np.arange(4.0) + 4}}
    bundles, critics = group_bundles(spec, [(1, (1, 2))], np.arange(4, 8), local, frozen_wm="shared")
    np.testing.assert_array_equal(bundles[0]["actor"]["w"][:, 0], [4, 5])
    np.testing.assert_array_equal(critics[0]["q"], [4, 5])
    assert bundles[0]["wm"] == "shared"

    class Res:  # an EvalResult's returns [T_group, E] and successes
        def __init__(self, r):
            self.returns, self.successes = np.asarray(r, float), np.ones_like(np.asarray(r, float))

    vals, owned = per_run_values(spec, [(1, (1, 2))], [Res([[1.0, 3.0], [5.0, 5.0]])], [lambda r, su: r.mean()])
    np.testing.assert_array_equal(vals, [[0, 0, 0, 0, 2.0, 5.0]])
    np.testing.assert_array_equal(owned, [False] * 4 + [True] * 2)
    with pytest.raises(ValueError, match=r"runs \[0, 1, 2, 3\] have no owner"):
        sharding.gather_runs(vals, owned)  # one process must own every run
    np.testing.assert_array_equal(sharding.gather_runs(np.arange(12.0).reshape(2, 6), np.ones(6, bool)),
                                  np.arange(12.0).reshape(2, 6))

    # local_rows on one process: every row, in order; host_gather/put_global are device_get/device_put
    mesh = sharding.make_mesh()
    x = sharding.put_global({"a": np.arange(6.0)}, sharding.run_sharding(mesh))
    rows, loc = sharding.local_rows(x)
    np.testing.assert_array_equal(rows, np.arange(6))
    np.testing.assert_array_equal(loc["a"], np.arange(6.0))
    np.testing.assert_array_equal(sharding.host_gather(x)["a"], np.arange(6.0))


def test_data_parallel_must_divide_devices(tiny_store, tmp_path):
    from conftest import tiny_config
    from fmbpo_jax.run_config import ConfigError
    from fmbpo_jax.training.trainer import train

    import jax

    c = tiny_config(tiny_store, data_parallel=jax.device_count() + 1)
    with pytest.raises(ConfigError, match="--config.data_parallel"):
        train(c, str(tmp_path / "run"), log=lambda s: None)


# ================================================================================= the worker processes


def _setup(args: dict):
    """(config, spec, pwm config, initial state [6], frozen WM, data); jitted init (eager vmap init is slow)."""
    import jax

    from conftest import TINY_TASKS, tiny_config
    from fmbpo_jax import run_config
    from fmbpo_jax import world_model as wm
    from fmbpo_jax.data.sampler import load_device_data
    from fmbpo_jax.training.program import init_runs, run_keys

    jax.config.update("jax_compilation_cache_dir", args["cache"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    store = args["store"]
    # a frozen shared WM (phases 3 and 9): the WM is replicated, per-run actor/critic state sharded
    config = tiny_config(store, tasks=",".join(TINY_TASKS), seeds=",".join(map(str, SEEDS)), finetune_wm=False)
    spec, pcfg = run_config.run_spec(config), run_config.pwm_config(config)
    state = jax.jit(init_runs, static_argnums=0)(pcfg, run_keys(spec))
    frozen = jax.jit(wm.init, static_argnums=0)(pcfg.wm, jax.random.PRNGKey(0))
    return config, spec, pcfg, state, frozen, load_device_data(store, list(spec.task_ids))


def _flat(tree, keys=("actor", "critic")):
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves([getattr(tree.train, k) for k in keys])
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _assert_same(ref_state, ref_metrics, state, metrics, what: str):
    """Metrics rtol 1e-5; params like test_train.py::test_vmapped_equals_looped (Adam's sign steps amplify rounding)."""
    import numpy as np

    for k in ref_metrics:
        np.testing.assert_allclose(np.asarray(metrics[k]), np.asarray(ref_metrics[k]), rtol=1e-5, atol=1e-6, err_msg=f"{what}: {k}")
    a, b = _flat(ref_state), _flat(state)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = np.abs(a - b)
    # One run per device vs 6 in one vmap: matmuls batch (and round) differently, ~1e-7. Adam's first steps are
    # ~lr*sign(g) (lr 5e-4), so an entry whose gradient is ~0 can turn that noise into a visible step: as in
    # test_train.py, at most 1 in 10^3 entries may differ by more than 1e-6, and none by more than lr / 10.
    assert np.mean(err > 1e-6) < 1e-3 and err.max() < 5e-5, (what, err.max(), np.mean(err > 1e-6))
    np.testing.assert_array_equal(np.asarray(ref_state.train.epoch), np.asarray(state.train.epoch))
    np.testing.assert_array_equal(np.asarray(ref_state.key), np.asarray(state.key))


def _sharded_chunk(pcfg, config, mesh, spec, state, frozen, data, epochs):
    """Pad, place, train one chunk on `mesh`, unpad (state on device, metrics on host)."""
    import jax
    import numpy as np

    from fmbpo_jax import sharding
    from fmbpo_jax.training.program import make_train_chunk

    R = spec.num_runs
    padded, valid = sharding.pad_runs(state, mesh)
    (pos, task), _ = sharding.pad_runs((np.asarray(spec.run_task_pos, np.int32), np.asarray(spec.run_task_ids, np.int32)), mesh)
    pos, task = sharding.put_runs((pos, task), mesh)
    data = sharding.put_replicated(data, mesh)
    frozen = None if frozen is None else sharding.put_replicated(frozen, mesh)
    # a 'data' axis > 1 splits each run's batch over its devices (the trainer's --config.data_parallel)
    constrain = sharding.constrain_batch(mesh) if mesh.shape[sharding.DATA] > 1 else None
    fn = sharding.shard_chunk_fn(make_train_chunk(pcfg, epochs, config.alg.batch_size, config.alg.wm_batch_size,
                                                  constrain=constrain), mesh)
    hlo = fn.lower(padded, frozen, data, pos, task).compile().as_text()
    out, metrics = fn(padded, frozen, data, pos, task)
    assert out.train.epoch.sharding.spec == sharding.runs_spec() and metrics["actor_loss"].sharding.spec == sharding.metrics_spec()
    assert len(out.train.epoch.sharding.device_set) == mesh.size
    metrics = sharding.unpad(jax.device_get(metrics), R, axis=1)
    return sharding.unpad(out, R, mesh=mesh), metrics, valid, "all-reduce" in hlo


def _worker_train(args):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from fmbpo_jax import sharding
    from fmbpo_jax.training.program import make_train_chunk

    assert jax.device_count() == 8
    config, spec, pcfg, init, frozen, data = _setup(args)
    pos, task = jax.numpy.asarray(spec.run_task_pos), jax.numpy.asarray(spec.run_task_ids)
    ref_state, ref_metrics = make_train_chunk(pcfg, EPOCHS, config.alg.batch_size, config.alg.wm_batch_size)(
        jax.tree_util.tree_map(jax.numpy.copy, init), frozen, data, pos, task)
    ref_state, ref_metrics = jax.device_get((ref_state, ref_metrics))

    checked, valids, reduces, result = [], {}, {}, {}
    for n_task, n_data in args["meshes"]:
        name = f"{n_task}x{n_data}"
        mesh = sharding.make_mesh(n_task * n_data, data=n_data)
        state, metrics, valid, all_reduce = _sharded_chunk(pcfg, config, mesh, spec, init, frozen, data, EPOCHS)
        _assert_same(ref_state, ref_metrics, jax.device_get(state), metrics, name)
        checked.append(name)
        valids[name] = valid.tolist()
        reduces[name] = all_reduce
        if name == "8x1":  # checkpoint the unpadded state as written on 8 devices
            result["ckpt_shards_8x1"] = int(state.train.epoch.addressable_shards[0].data.shape[0])
            mngr = ocp.CheckpointManager(args["ckpt"], options=ocp.CheckpointManagerOptions(create=True))
            mngr.save(EPOCHS, args=ocp.args.Composite(train=ocp.args.StandardSave({"state": state})), force=True)
            mngr.wait_until_finished()
            mngr.close()
            host = jax.device_get(state)
            np.savez(os.path.join(os.path.dirname(args["ckpt"]), "saved.npz"),
                     **{jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(host)})
    result.update(checked=checked, valid=valids, all_reduce=reduces)
    return result


def _worker_restore(args):
    """On 2 devices: restore the 8-device checkpoint into the 2-device shardings, re-pad, train on."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from fmbpo_jax import sharding
    from fmbpo_jax.training.program import make_train_chunk

    assert jax.device_count() == 2
    config, spec, pcfg, init, frozen, data = _setup(args)
    mesh = sharding.make_mesh()
    mngr = ocp.CheckpointManager(args["ckpt"])
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(
        train=ocp.args.StandardRestore({"state": sharding.restore_target(init, mesh)})))["train"]["state"]
    mngr.close()
    saved = np.load(os.path.join(os.path.dirname(args["ckpt"]), "saved.npz"))
    equal = all(np.array_equal(np.asarray(v), saved[jax.tree_util.keystr(p)])
                for p, v in jax.tree_util.tree_leaves_with_path(restored))
    shards = int(restored.train.epoch.addressable_shards[0].data.shape[0])
    assert restored.train.epoch.sharding.spec == sharding.runs_spec() and len(restored.train.epoch.sharding.device_set) == 2

    host = jax.device_get(restored)
    ref_state, ref_metrics = make_train_chunk(pcfg, EPOCHS, config.alg.batch_size, config.alg.wm_batch_size)(
        jax.device_put(host, jax.devices()[0]), frozen, data, jax.numpy.asarray(spec.run_task_pos),
        jax.numpy.asarray(spec.run_task_ids))
    state, metrics, _, _ = _sharded_chunk(pcfg, config, mesh, spec, restored, frozen, data, EPOCHS)
    _assert_same(jax.device_get(ref_state), jax.device_get(ref_metrics), jax.device_get(state), metrics, "restored on 2")
    assert int(np.asarray(state.train.epoch)[0]) == 2 * EPOCHS
    return {"devices": jax.device_count(), "restored_equal": bool(equal), "shards": shards, "continued_equal": True}


if __name__ == "__main__":
    _worker = {"train": _worker_train, "restore": _worker_restore}[sys.argv[1]]
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
