"""Shared fixtures: the golden outputs of the PyTorch reference and the small config (tests/fixtures)."""
from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("MUJOCO_GL", "disable")
# Tests are dominated by XLA compile time on small programs: skip LLVM's expensive optimisations (about 2x
# faster suite). Set before JAX starts; subprocesses started by tests inherit it, so compared runs match.
_FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_XLA).strip()

import atexit
import shutil
import tempfile

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# Processes started by one test session compile the same programs: JAX's persistent cache lets the later ones load
# them (the same executables, so bitwise comparisons between processes keep their meaning) instead of compiling.
_XLA_CACHE = tempfile.mkdtemp(prefix="fmbpo_tests_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
XLA_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": _XLA_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "golden_small.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def small_cfg() -> dict:
    return json.loads((FIXTURES / "config_small.json").read_text())


def torch_load(name: str):
    import torch

    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def native_ckpt():
    return torch_load("wm_small_native.pt")


@pytest.fixture(scope="session")
def native_flow_ckpt():
    return torch_load("wm_small_native_flow.pt")


@pytest.fixture(scope="session")
def flow_actor_ckpt():
    return torch_load("actor_flow_small.pt")


@pytest.fixture(scope="session")
def small_models(small_cfg):
    """(mlp WMConfig, flow WMConfig, gaussian ActorConfig, flow ActorConfig, CriticConfig) of the small fixture set."""
    from fmbpo_jax.actors import ActorConfig
    from fmbpo_jax.critic import CriticConfig
    from fmbpo_jax.world_model import WMConfig

    c = small_cfg
    common = dict(obs_dim=c["obs_dim"], action_dim=c["action_dim"], latent_dim=c["latent_dim"], task_dim=c["task_dim"],
                  num_tasks=len(c["tasks"]), encoder_units=tuple(c["encoder_units"]), simnorm_dim=c["simnorm_dim"],
                  num_bins=c["num_bins"], vmin=c["vmin"], vmax=c["vmax"])
    mlp = WMConfig(kind="mlp", units=tuple(c["units"]), **common)
    flow = WMConfig(kind="flow", units=tuple(c["flow_units"]), velocity_head="simnorm", integrator="heun", substeps=4, **common)
    gauss = ActorConfig(kind="gaussian", latent_dim=c["latent_dim"], action_dim=c["action_dim"], units=tuple(c["actor_units"]),
                        min_logstd=c["actor_min_logstd"])
    flow_actor = ActorConfig(kind="flow", latent_dim=c["latent_dim"], action_dim=c["action_dim"], units=tuple(c["flow_actor_units"]),
                             integrator=c["flow_actor_integrator"], substeps=c["flow_actor_substeps"])
    critic = CriticConfig(latent_dim=c["latent_dim"], units=tuple(c["critic_units"]), num_critics=c["num_critics"])
    return mlp, flow, gauss, flow_actor, critic


from tiny_cfg import TINY_TASKS  # noqa: E402


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A real per-task store: 3 episodes x 3 tasks of 51 steps of random dm_control rollouts."""
    from convert_ckpt.dataset import convert
    from fmbpo_jax.data.generate import generate

    root = tmp_path_factory.mktemp("tiny_store")
    chunk = root / "chunk_0.pt"
    generate(chunk, list(TINY_TASKS), 3, episode_length=51, seed=5)
    convert([str(chunk)], str(root / "store"), episode_length=51, log=lambda *a, **k: None)
    return str(root / "store")


def tiny_config(store: str, **overrides):
    """tests/tiny_cfg.py (a config that trains in seconds) on `store`, with dotted-key overrides."""
    from tiny_cfg import get_config

    c = get_config()
    c.data.dataset_dir = store
    for k, v in overrides.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c
