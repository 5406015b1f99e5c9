"""Phase-8 WM pretraining resumes where it stopped: SIGTERM checkpoints, a rerun continues, the end is bitwise the same."""
from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np
import pytest

from conftest import tiny_config


def _pretrain_cfg(store, mode="pretrain_wm", **kw):
    return tiny_config(store, mode=mode, **{"pretrain.iters": 40, "pretrain.best_every": 10,
                                                     "pretrain.checkpoint_every": 20, "pretrain.batch_size": 16, **kw})


def _rows(workdir):
    with open(os.path.join(workdir, "pretrain.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_sec"} for line in f if line.strip()]


def _wm(path):
    from convert_ckpt.api import load_world_model

    return load_world_model(path)[1]


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_sigterm_then_rerun_resumes_bitwise(tiny_store, tmp_path):
    from fmbpo_jax.pretrain import pretrain_wm
    from fmbpo_jax.training.lifecycle import Preempted

    full = str(tmp_path / "full")
    pretrain_wm(_pretrain_cfg(tiny_store), full, log=lambda s: None)

    cut = str(tmp_path / "cut")

    def kill_at_30(line):
        if line.startswith("[pretrain 30/"):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: checkpoint at 30, then Preempted

    with pytest.raises(Preempted, match="iter 30"):
        pretrain_wm(_pretrain_cfg(tiny_store), cut, log=kill_at_30)
    assert not os.path.exists(os.path.join(cut, "wm_last"))
    with open(os.path.join(cut, "pretrain.jsonl"), "a") as f:  # a row logged after the checkpoint (killed -9 there)
        f.write(json.dumps({"iter": 40, "wm_loss": -1.0}) + "\n")
    logs = []
    out = pretrain_wm(_pretrain_cfg(tiny_store), cut, log=logs.append)

    assert logs[0] == f"resumed WM pretraining from {cut} at iter 30" and logs[1].startswith("[pretrain 40/40]")
    assert out["total_iters"] == 40 and [r["iter"] for r in out["history"]] == [10, 20, 30, 40]
    assert _rows(cut) == _rows(full)
    assert _same(_wm(os.path.join(cut, "wm_last")), _wm(os.path.join(full, "wm_last")))
    assert _same(_wm(os.path.join(cut, "wm_best")), _wm(os.path.join(full, "wm_best")))
    # finished: a rerun trains nothing more and rewrites the same final WM
    logs = []
    pretrain_wm(_pretrain_cfg(tiny_store), cut, log=logs.append)
    assert logs == [f"resumed WM pretraining from {cut} at iter 40"]
    assert _same(_wm(os.path.join(cut, "wm_last")), _wm(os.path.join(full, "wm_last")))


def test_checkpoint_every_must_be_a_multiple_of_best_every(tiny_store, tmp_path):
    from fmbpo_jax.demo import run_demo
    from fmbpo_jax.pretrain import pretrain_wm
    from fmbpo_jax.run_config import ConfigError

    bad = {"pretrain.checkpoint_every": 15}
    with pytest.raises(ConfigError, match=r"pretrain\.checkpoint_every=15 .*pretrain\.best_every=10"):
        pretrain_wm(_pretrain_cfg(tiny_store, **bad), str(tmp_path / "x"), log=lambda s: None)
    # the demo stops before collecting anything
    with pytest.raises(ConfigError, match=r"pretrain\.checkpoint_every=15"):
        run_demo(_pretrain_cfg(tiny_store, mode="demo", **bad), str(tmp_path / "demo"), log=lambda s: None)
    assert not (tmp_path / "demo").exists()


def test_iters_not_a_multiple_of_best_every_ends_at_iters(tiny_store, tmp_path):
    """The last chunk is shorter: 25 iterations in chunks of 10 are 10, 20, 25 (it used to overshoot to 30)."""
    from fmbpo_jax.pretrain import pretrain_wm

    out = pretrain_wm(_pretrain_cfg(tiny_store, **{"pretrain.iters": 25}), str(tmp_path / "p"), log=lambda s: None)
    assert out["total_iters"] == 25 and [r["iter"] for r in out["history"]] == [10, 20, 25]
