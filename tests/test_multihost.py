"""Multi-process training (jax.distributed on localhost, CPU collectives) equals single-process training.

Two processes with one CPU device each train the tiny config (3 tasks -> 4 padded run rows: process 0 holds
runs 0-1, process 1 run 2 and the dummy row) with the host sampler, per-process data and per-process
evaluation; one process with two devices trains the same config. Each run is a fresh interpreter started
by this file (`python tests/test_multihost.py train ARGS_JSON`), because the device count and
jax.distributed must be set before JAX starts.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 600


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _start(devices: int, **args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "train", json.dumps(args)], env=_env(devices),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{out[-3000:]}\n{err[-8000:]}"
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:  # a process blocked in a collective whose peer died would wait for its timeout
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _read(path: str) -> list[dict]:
    from fmbpo_jax.textio import read_jsonl

    return read_jsonl(path)


def _final_state(workdir: str) -> dict:
    """The last checkpoint on this process's one device (it was written from 2 devices: a target says where)."""
    import jax
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step()
    meta = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", str(step), "train"))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                                    getattr(meta, "item_metadata", meta))
    out = mngr.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(target)))["train"]
    mngr.close()
    return out


@pytest.mark.slow
def test_two_processes_match_one(tiny_store, tmp_path):
    """2 processes x 1 device == 1 process x 2 devices: checkpointed params, metrics, evaluation scores."""
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    port = _free_port()
    procs = [_start(2, store=tiny_store, workdir=single)]
    procs += [_start(1, store=tiny_store, workdir=multi, port=port, process_id=i, num_processes=2) for i in range(2)]
    one, p0, p1 = _finish(procs)
    assert one == {"process_count": 1, "devices": 2, "gathered_tasks": None, "epoch": 10}, one
    # process 0 holds runs 0-1 (tasks 0, 1), process 1 run 2 (task 2) and the dummy row, which reuses run 2's
    # windows: each process reads only its own runs' tasks
    assert p0 == {"process_count": 2, "devices": 2, "gathered_tasks": [0, 1], "epoch": 10}, p0
    assert p1 == {"process_count": 2, "devices": 2, "gathered_tasks": [2], "epoch": 10}, p1
    _compare(single, multi)


def _compare(single: str, multi: str) -> None:
    import jax

    a, b = _final_state(single), _final_state(multi)
    flat = lambda t: {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys() and len(fa) > 0
    for k in fa:
        if fa[k].dtype.kind in "iub":  # epoch, keys, nan streak
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
        else:  # same per-device program on the same windows; 1e-6 as in test_sharding.py
            np.testing.assert_allclose(fb[k], fa[k], rtol=1e-6, atol=1e-6, err_msg=k)

    # only process 0 logs, and it logs every run
    m_a, m_b = _read(os.path.join(single, "metrics.jsonl")), _read(os.path.join(multi, "metrics.jsonl"))
    assert [(r["epoch"], r["task"], r["seed"]) for r in m_a] == [(r["epoch"], r["task"], r["seed"]) for r in m_b]
    assert len(m_b) == 2 * 3
    for ra, rb in zip(m_a, m_b):
        for k in ("actor_loss", "value_loss", "actor_grad_norm"):
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=k)
    e_a, e_b = _read(os.path.join(single, "eval.jsonl")), _read(os.path.join(multi, "eval.jsonl"))
    assert [(r["epoch"], r["task"]) for r in e_a] == [(r["epoch"], r["task"]) for r in e_b] and len(e_b) == 2 * 3
    # evaluated per process (process 0: tasks 0-1, process 1: task 2) and gathered; the policy's batched matmuls
    # round differently for 2 or 3 task rows, so returns agree to rounding, not bitwise
    np.testing.assert_allclose([r["episode_reward"] for r in e_b], [r["episode_reward"] for r in e_a], rtol=1e-4, atol=1e-3)
    import csv

    with open(os.path.join(single, "results.csv")) as f:
        res_a = list(csv.DictReader(f))
    with open(os.path.join(multi, "results.csv")) as f:
        res_b = list(csv.DictReader(f))
    assert [r["task"] for r in res_a] == [r["task"] for r in res_b] and len(res_b) == 3
    for k in ("best_eval_return", "final_return"):
        np.testing.assert_allclose([float(r[k]) for r in res_b], [float(r[k]) for r in res_a], rtol=1e-4, atol=1e-3, err_msg=k)
    # MPPI noise is split per env slot, so a process's task subset plans with other noise: finite, not equal
    assert all(np.isfinite(float(r["planning_return"])) for r in res_b)


# ================================================================================= the worker process


def _worker_train(args: dict) -> dict:
    import jax

    from fmbpo_jax import sharding

    if "port" in args:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        assert sharding.initialize_distributed(coordinator_address=f"localhost:{args['port']}",
                                               num_processes=args["num_processes"], process_id=args["process_id"])
    from conftest import tiny_config
    from fmbpo_jax.data import sampler
    from fmbpo_jax.training.trainer import train

    gathered = []
    original = sampler.HostSampler.__init__

    def spy(self, *a, **kw):  # which task positions this process's sampler reads
        gathered.append(kw.get("gather_tasks"))
        original(self, *a, **kw)

    sampler.HostSampler.__init__ = spy
    config = tiny_config(args["store"], epochs=10, chunk_epochs=5, log_freq=5, checkpoint_freq=5,
                         **{"data.sampler": "host", "data.host_threads": 1, "eval.freq": 5, "eval.background": True})
    out = train(config, args["workdir"], log=lambda s: None)
    return {"process_count": jax.process_count(), "devices": jax.device_count(), "gathered_tasks": gathered[0],
            "epoch": out["epoch"]}


if __name__ == "__main__":
    _worker = {"train": _worker_train}[sys.argv[1]]
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
