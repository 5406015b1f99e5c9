"""End to end through the real CLI: train, evaluate, checkpoint, SIGTERM (requeue code), kill -9, resume, finish.

The interrupted run must end bitwise identical to an uninterrupted one (params, logged metrics, evaluations),
with no duplicated log rows.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import XLA_CACHE_ENV
from fmbpo_jax.textio import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXIT_REQUEUE = 75


def cli(store, workdir, epochs=30):
    return [sys.executable, "-m", "fmbpo_jax.main", "--config=tests/tiny_cfg.py", f"--config.data.dataset_dir={store}",
            f"--config.epochs={epochs}", f"--workdir={workdir}"]


def start(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", MUJOCO_GL="disable", PYTHONPATH=str(ROOT), **XLA_CACHE_ENV)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lines(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def wait_rows(proc, path, n, timeout=240):
    t0 = time.time()
    while lines(path) < n:
        if proc.poll() is not None:
            raise AssertionError(f"process ended early (rc {proc.returncode}):\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for log rows")
        time.sleep(0.2)


def final_params(workdir):
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    step = mngr.latest_step()
    out = mngr.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore()))["train"]
    return step, out


def strip_time(rows):
    return [{k: v for k, v in r.items() if k != "total_time"} for r in rows]


@pytest.mark.slow
def test_sigterm_kill9_resume_is_bitwise_identical(tiny_store, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = start(cli(tiny_store, ref))
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    for f in ("config.json", "metrics.jsonl", "eval.jsonl", "results.csv", "summary.md"):
        assert (ref / f).exists(), f
    assert "final_return" in (ref / "results.csv").read_text() and "planning_return" in (ref / "results.csv").read_text()
    import csv

    with open(ref / "results.csv") as f:
        res = list(csv.DictReader(f))
    assert len(res) == 3 and all(np.isfinite(float(r["best_params_return"])) for r in res), res  # best params re-evaluated

    # 1) SIGTERM while training: finishes the chunk, checkpoints, exits with the requeue code
    p = start(cli(tiny_store, run))
    wait_rows(p, run / "metrics.jsonl", 3)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == EXIT_REQUEUE, out
    assert "checkpointed at epoch" in out
    # 2) restart, then kill -9 at an arbitrary later moment (maybe inside a checkpoint write)
    p = start(cli(tiny_store, run))
    wait_rows(p, run / "metrics.jsonl", lines(run / "metrics.jsonl") + 4)
    time.sleep(0.3)
    p.kill()
    p.wait()
    # 3) restart with the same command: resumes and finishes
    p = start(cli(tiny_store, run))
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    assert "resumed from" in out

    m_ref, m_run = read_jsonl(ref / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    keys = [(r["epoch"], r["task"], r["seed"]) for r in m_run]
    assert len(keys) == len(set(keys)), "duplicated log rows after resume"
    assert strip_time(m_ref) == strip_time(m_run)
    assert read_jsonl(ref / "eval.jsonl") == read_jsonl(run / "eval.jsonl")
    assert (ref / "results.csv").read_text() == (run / "results.csv").read_text()
    s_ref, t_ref = final_params(ref)
    s_run, t_run = final_params(run)
    assert s_ref == s_run == 30
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(t_ref), jax.tree_util.tree_leaves(t_run)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_checkpoint_for_phase3_is_a_clear_error():
    p = start([sys.executable, "-m", "fmbpo_jax.main", "--config=configs/phase3.py", "--workdir=/tmp/unused_phase3"])
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 2, out
    assert "--config.checkpoint" in out and "Bring your own checkpoint" in out


def test_mistyped_config_key_fails_at_once():
    p = start([sys.executable, "-m", "fmbpo_jax.main", "--config=tests/tiny_cfg.py", "--config.epoch=5"])
    out = p.communicate(timeout=300)[0]
    assert p.returncode != 0 and "epoch" in out
