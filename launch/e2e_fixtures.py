"""Inputs of the phase-3 end-to-end measurement: a random MT30 store and a randomly initialised WM checkpoint.

Phase 3 needs `--config.data.dataset_dir` (the per-task store of `fmbpo_jax.data.store`) and
`--config.checkpoint` (a pretrained world model). Timing it needs neither the real 44 GB dataset nor the
real 48M checkpoint: the work per epoch depends on the shapes only. So this writes

* a store with `episodes` random episodes per task: observations N(0, 1) in the task's own dims and zero
  padding to 24 (as the converted MT30 data), actions U(-1, 1) in its own action dims, rewards U(0, 1), and
  TD-MPC2's NaN fillers at index 0 (never read); realistic magnitudes, so no update is skipped for NaN/Inf;
* a world model of the config's size (`--size 48M`: 48M parameters) with the reference initialisation
  (`world_model.init`), written in this project's converted-checkpoint format (orbax params + manifest.json,
  `convert_ckpt.store.write_converted`), which `--config.checkpoint=DIR` loads without torch.

    python -m launch.e2e_fixtures --store /tmp/e2e/store --checkpoint /tmp/e2e/wm48M --size 48M --tasks all
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from typing import Sequence

import numpy as np

from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, MAX_ACTION_DIM, MAX_OBS_DIM, MT30_TASKS, OBS_DIMS_BY_ID


def random_episodes(tid: int, n: int, episode_length: int, rng: np.random.Generator):
    """(obs [n, L, 24], action [n, L, 6], reward [n, L]) float32 of task `tid`, padded like converted MT30 data."""
    L, do, da = episode_length, OBS_DIMS_BY_ID[tid], ACTION_DIMS_BY_ID[tid]
    obs = np.zeros((n, L, MAX_OBS_DIM), np.float32)
    obs[..., :do] = rng.standard_normal((n, L, do), dtype=np.float32)
    action = np.zeros((n, L, MAX_ACTION_DIM), np.float32)
    action[..., :da] = rng.uniform(-1, 1, (n, L, da)).astype(np.float32)
    reward = rng.uniform(0, 1, (n, L)).astype(np.float32)
    action[:, 0] = np.nan  # TD-MPC2's fillers: the samplers never read index 0 of action/reward
    reward[:, 0] = np.nan
    return obs, action, reward


def write_random_store(dst: str, task_ids: Sequence[int], episodes: int, episode_length: int = 501, seed: int = 0):
    """A store at `dst` (must not exist) with `episodes` random episodes for each of `task_ids`. Returns the Store."""
    from fmbpo_jax.data.store import StoreWriter

    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    rng = np.random.default_rng(seed)
    tag = f"random-{seed}-{sorted(task_ids)}-{episodes}-{episode_length}"
    with StoreWriter(dst, episode_length=episode_length, obs_dim=MAX_OBS_DIM, action_dim=MAX_ACTION_DIM) as w:
        src = w.begin_source("random.pt", hashlib.sha256(tag.encode()).hexdigest(), None, {"synthetic": "random"})
        for tid in task_ids:
            w.add_episodes(src, tid, *random_episodes(tid, episodes, episode_length, rng))
        return w.commit()


def phase3_wm_config(size: str):
    """The WMConfig that configs/phase3.py builds at model size `size` (one of configs.base.SIZES)."""
    from configs.base import SIZES
    from configs.phase3 import get_config
    from fmbpo_jax.run_config import model_configs

    if size not in SIZES:
        raise ValueError(f"--size {size!r}: known sizes {sorted(SIZES)}")
    c = get_config()
    c.model.size = size
    return model_configs(c)[0]


def write_random_checkpoint(dst: str, size: str, seed: int = 0) -> dict:
    """A randomly initialised world model of `size` at `dst` (converted format). Returns the manifest."""
    import dataclasses

    import jax

    from convert_ckpt.formats import Converted
    from convert_ckpt.store import write_converted
    from fmbpo_jax import world_model

    cfg = dataclasses.replace(phase3_wm_config(size), compute_dtype="float32")
    params = world_model.init(cfg, jax.random.PRNGKey(seed))
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    conv = Converted(format="native", layout="native-pretrain", wm_cfg=cfg, wm=params,
                     metadata={"obs_dim": cfg.obs_dim, "act_dim": cfg.action_dim, "random_init_seed": seed},
                     tasks=list(MT30_TASKS))
    return write_converted(conv, dst, overwrite=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.e2e_fixtures", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="store directory to create (must not exist)")
    p.add_argument("--checkpoint", help="checkpoint directory to write (replaced if it exists)")
    p.add_argument("--size", default="48M", help="model size of the checkpoint (configs.base.SIZES)")
    p.add_argument("--tasks", default="all", help="'all' or comma-separated MT30 task names (store)")
    p.add_argument("--episodes", type=int, default=8, help="episodes per task (store)")
    p.add_argument("--episode-length", type=int, default=501, help="steps per episode (store; MT30: 501)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not a.store and not a.checkpoint:
        p.error("nothing to do: give --store and/or --checkpoint")
    from fmbpo_jax.data.store import StoreError
    from fmbpo_jax.run_config import ConfigError, parse_tasks

    try:
        if a.store:
            t0 = time.time()
            store = write_random_store(a.store, parse_tasks(a.tasks), a.episodes, a.episode_length, a.seed)
            print(f"store {a.store}: {len(store.tasks)} tasks x {a.episodes} episodes x {a.episode_length} steps "
                  f"in {time.time() - t0:.1f} s", flush=True)
        if a.checkpoint:
            t0 = time.time()
            m = write_random_checkpoint(a.checkpoint, a.size, a.seed)
            print(f"checkpoint {a.checkpoint}: {a.size} world model, {m['modules']['world_model']['num_params']:,} "
                  f"parameters, in {time.time() - t0:.1f} s", flush=True)
    except (ConfigError, StoreError, ValueError, OSError) as e:
        print(f"e2e_fixtures: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
