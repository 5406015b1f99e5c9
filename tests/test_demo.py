"""The README's main command end to end, shrunk by flags: collect in dm_control, pretrain, train both variants,
evaluate, print the table; stopped by SIGTERM in pretraining, rerun, finished without redoing what was done.
(Killing policy training and resuming it bitwise is test_main_e2e's; resuming pretraining bitwise test_pretrain's.)"""
from __future__ import annotations

import csv
import json
import math
import re
import signal
import sys

import pytest
from fmbpo_jax.textio import read_jsonl
from test_main_e2e import EXIT_REQUEUE, start

SHRINK = ["--config.tasks=pendulum-spin,cartpole-swingup", "--config.demo.episodes_per_task=2",
          "--config.demo.episode_length=41", "--config.pretrain.iters=200", "--config.pretrain.best_every=10",
          "--config.pretrain.checkpoint_every=100", "--config.pretrain.batch_size=16", "--config.model.latent_dim=16",
          "--config.model.encoder_units=(32,)", "--config.model.units=(32,32)", "--config.model.flow_units=(32,32)",
          "--config.model.task_dim=8", "--config.model.actor_units=(16,16)", "--config.model.critic_units=(16,16)",
          "--config.alg.batch_size=16", "--config.alg.horizon=4", "--config.alg.wm_batch_size=8",
          "--config.alg.critic_iterations=2", "--config.alg.critic_batches=2", "--config.epochs=30",
          "--config.chunk_epochs=10", "--config.log_freq=10", "--config.checkpoint_freq=10", "--config.eval.freq=10",
          "--config.eval.episodes=2", "--config.eval.max_steps=10", "--config.eval.workers=1",
          "--config.eval.mppi_samples=8", "--config.eval.mppi_elites=2", "--config.eval.mppi_policy_trajs=2",
          "--config.eval.mppi_iterations=1"]


def run_until(workdir, line_prefix=None, sig=None, timeout=600):
    """Run the demo CLI; when a stdout line starts with line_prefix, send sig. Returns (returncode, output)."""
    proc = start([sys.executable, "-m", "fmbpo_jax.main", f"--workdir={workdir}", *SHRINK])  # no --config: the demo
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line_prefix and sig and line.startswith(line_prefix):
                proc.send_signal(sig)
                line_prefix = None
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out)


@pytest.mark.slow
def test_demo_stopped_in_pretraining_resumes_and_finishes(tmp_path):
    wd = tmp_path / "demo"
    (wd / ".store.tmp-killed" / "data-000001").mkdir(parents=True)  # what a collection killed before its rename leaves
    rc, out = run_until(wd, "[pretrain 10/", signal.SIGTERM)
    assert rc == EXIT_REQUEUE, out
    assert "[demo] collecting 2 random episodes (ou actions) x 2 tasks" in out
    assert "[demo] removed 1 unfinished collection(s)" in out and not list(wd.glob(".store.tmp-*"))
    stopped = int(re.search(r"checkpointed WM pretraining at iter (\d+)", out).group(1))
    assert 10 <= stopped < 200 and not (wd / "pretrain" / "wm_last").exists()

    rc, out = run_until(wd)
    assert rc == 0, out
    assert "collecting" not in out  # the store is kept
    assert f"resumed WM pretraining from {wd / 'pretrain'} at iter {stopped}" in out
    assert f"[pretrain {stopped}/" not in out and "[pretrain 200/200]" in out

    for path in ("store/index.json", "pretrain/wm_best", "pretrain/wm_last", "pretrain/pretrain.jsonl", "demo_results.md"):
        assert (wd / path).exists(), path
    iters = [r["iter"] for r in read_jsonl(wd / "pretrain" / "pretrain.jsonl")]
    assert iters == list(range(10, 201, 10))  # no row twice, none missing across the SIGTERM
    lr = {}
    for variant in ("frozen_wm", "joint"):
        d = wd / variant
        for f in ("results.csv", "summary.md", "config.json", "metrics.jsonl", "eval.jsonl", "checkpoints"):
            assert (d / f).exists(), (variant, f)
        keys = [(r["epoch"], r["task"]) for r in read_jsonl(d / "metrics.jsonl")]
        assert sorted(keys) == sorted({(e, t) for e in (0, 10, 20) for t in ("pendulum-spin", "cartpole-swingup")})
        rows = list(csv.DictReader(open(d / "results.csv")))
        assert sorted(r["task"] for r in rows) == ["cartpole-swingup", "pendulum-spin"]
        assert all(math.isfinite(float(r[k])) for r in rows for k in ("final_return", "planning_return", "best_params_return"))
        assert all(float(r["final_return_std"]) >= 0 for r in rows)  # the per-episode spread behind a stated margin
        lr[variant] = json.load(open(d / "config.json"))["alg"]["model_lr"]
    # the joint variant fine-tunes at demo.joint_model_lr; pretraining used alg.model_lr
    assert lr == {"frozen_wm": 3e-4, "joint": 3e-5}
    assert read_jsonl(wd / "pretrain" / "pretrain.jsonl")[0]["lr"] == 3e-4

    table = open(wd / "demo_results.md").read()
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == ["task", "random", "untrained", "frozen_wm", "frozen_wm best", "frozen_wm+planning", "joint",
                      "joint best", "joint+planning"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [r[0] for r in body] == ["pendulum-spin", "cartpole-swingup"]
    assert all(math.isfinite(float(v)) for r in body for v in r[1:])
    assert table.strip() in out  # the printed table is the file
