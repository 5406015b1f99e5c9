"""One MT30 task as TD-MPC2's wrapper stack sees it (spec/ENVIRONMENTS.md sections 3 and 4), in one class.

    suite.load(domain, task, task_kwargs={'random': seed})     (or our custom factory, same kwargs)
    -> action_scale [-1, 1]                                     (identity here; its float ops are kept)
    -> action repeat 2, reward = sum of the 2 control rewards, obs = flattened dict, float32
    -> Timeout(500)
    -> multitask padding: obs zero-padded to 24, action truncated to the task's own A dims.

No gym dependency; `reset()` / `step()` return NumPy.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading

os.environ.setdefault("MUJOCO_GL", "disable")  # before dm_control is imported

import numpy as np

from fmbpo_jax.envs.tasks import (
    ACTION_DIMS_BY_ID,
    ACTION_REPEAT,
    CUSTOM_TASKS,
    EPISODE_LENGTH,
    MAX_ACTION_DIM,
    MAX_OBS_DIM,
    MT30_TASKS,
    OBS_DIMS_BY_ID,
    dmc_names,
    task_id as _task_id,
)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed


_LEAN_LOCK = threading.Lock()
_SKYBOX_KEY = "./common/skybox.xml"


@contextlib.contextmanager
def _lean_assets():
    """Build models with an 8x8 instead of an 800x800 skybox texture (11.8 MB less per env).

    Every suite model includes `./common/skybox.xml` from `dm_control.suite.common.ASSETS`; the texture
    is only used for rendering and changes nothing in the physics (tests check bit-equality). fish.xml
    declares its own skybox and is not affected. The shared
    ASSETS entry is swapped only for the duration of the build, under a lock.
    """
    from dm_control.suite import common

    with _LEAN_LOCK:
        original = common.ASSETS[_SKYBOX_KEY]
        lean = re.sub(rb'width="\d+"', b'width="8"', re.sub(rb'height="\d+"', b'height="8"', original))
        common.ASSETS[_SKYBOX_KEY] = lean
        try:
            yield
        finally:
            common.ASSETS[_SKYBOX_KEY] = original


def load_dmc(task: str | int, seed: int, lean: bool = False):
    """The raw dm_control `Environment` of an MT30 task, seeded exactly like TD-MPC2 does.

    lean=True: tiny skybox texture (for state-only use: ~0.3 MB instead of ~12 MB per env; renders differ).
    """
    from dm_control import suite

    from fmbpo_jax.envs.custom import CUSTOM_FACTORIES

    name = MT30_TASKS[_task_id(task)]
    seed = _check_seed(seed)
    with _lean_assets() if lean else contextlib.nullcontext():
        if name in CUSTOM_TASKS:
            return CUSTOM_FACTORIES[name](random=seed)
        domain, sub = dmc_names(name)
        return suite.load(domain, sub, task_kwargs={"random": seed}, visualize_reward=False)


class MT30Env:
    """A single MT30 task with TD-MPC2's wrappers and multitask padding.

    reset() -> obs float32[24];  step(action[6] or action[A]) -> (obs float32[24], reward, done, info).
    Episodes are `max_episode_steps` (default 500) agent steps; stepping a finished episode raises
    RuntimeError (dm_control would otherwise silently auto-reset after its LAST step).
    lean=True builds the model with a tiny skybox texture (same physics, ~12 MB less memory per env).
    """

    def __init__(self, task: str | int, seed: int, max_episode_steps: int = EPISODE_LENGTH, lean: bool = False):
        self.task_id = _task_id(task)
        self.task_name = MT30_TASKS[self.task_id]
        self.obs_dim = OBS_DIMS_BY_ID[self.task_id]
        self.action_dim = ACTION_DIMS_BY_ID[self.task_id]
        if not 1 <= int(max_episode_steps) <= EPISODE_LENGTH:
            raise ValueError(f"max_episode_steps must be in [1, {EPISODE_LENGTH}] (dm_control's own time "
                             f"limit is {EPISODE_LENGTH} agent steps), got {max_episode_steps}")
        self.max_episode_steps = int(max_episode_steps)
        self.seed_value = _check_seed(seed)
        self._env = load_dmc(self.task_id, self.seed_value, lean=lean)
        spec = self._env.action_spec()
        if spec.shape != (self.action_dim,):
            raise AssertionError(f"{self.task_name}: action spec {spec.shape} != ({self.action_dim},)")
        # action_scale.Wrapper(min=-1, max=1): a -> spec.min + scale * (a - (-1)), cast to spec dtype.
        # Identity for all MT30 tasks up to float rounding; kept op for op for bit-equality.
        self._act_min = spec.minimum
        self._act_scale = (spec.maximum - spec.minimum) / (np.array(1) - np.array(-1))
        self._act_lo = np.array(-1)
        self._act_dtype = spec.dtype
        self._t = None  # None: needs reset

    # -- properties -------------------------------------------------------------------------
    @property
    def physics(self):
        return self._env.physics

    @property
    def task(self):
        """The dm_control Task object."""
        return self._env.task

    @property
    def dmc_env(self):
        return self._env

    @property
    def t(self) -> int | None:
        """Agent steps taken in the current episode (None before the first reset)."""
        return self._t

    # -- seeding ----------------------------------------------------------------------------
    def seed(self, seed: int) -> None:
        """Restart the task's random stream: the next reset() equals the first reset of make_env(task, seed).

        (dm_control keeps no other state across episodes: reset() re-initialises MuJoCo data, and every
        model field a task randomises is rewritten in its initialize_episode.)
        """
        self.seed_value = _check_seed(seed)
        self._env.task._random = np.random.RandomState(self.seed_value)
        self._t = None

    # -- core -------------------------------------------------------------------------------
    def _flat_obs(self, observation) -> np.ndarray:
        out = np.zeros(MAX_OBS_DIM, np.float32)
        flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in observation.values()])
        out[: flat.shape[0]] = flat  # float64 -> float32, exactly like astype(float32)
        return out

    def reset(self) -> np.ndarray:
        ts = self._env.reset()
        self._t = 0
        return self._flat_obs(ts.observation)

    def check_action(self, action) -> np.ndarray:
        """Validate an action of width 6 (padded) or A (the task's own); returns float64[A]."""
        a = np.asarray(action)
        if a.ndim != 1 or a.shape[0] not in (MAX_ACTION_DIM, self.action_dim):
            raise ValueError(f"{self.task_name}: action must have shape ({MAX_ACTION_DIM},) or "
                             f"({self.action_dim},), got {a.shape}")
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise ValueError(f"{self.task_name}: action must be real-valued, got dtype {a.dtype}")
        a = a[: self.action_dim].astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{self.task_name}: action contains NaN or inf: {a}")
        return a

    def step(self, action):
        if self._t is None:
            raise RuntimeError(f"{self.task_name}: call reset() before step()")
        if self._t >= self.max_episode_steps:
            raise RuntimeError(f"{self.task_name}: episode finished after {self._t} steps; call reset()")
        return self.step_checked(self.check_action(action))  # check raises before touching the simulator

    def step_checked(self, a: np.ndarray):
        """step() for an action already returned by check_action() (float64[A]); no validation."""
        if self._t is None or self._t >= self.max_episode_steps:
            raise RuntimeError(f"{self.task_name}: episode not running (t={self._t}); call reset()")
        a = (self._act_min + self._act_scale * (a - self._act_lo)).astype(self._act_dtype, copy=False)
        reward = 0.0
        for _ in range(ACTION_REPEAT):
            ts = self._env.step(a)
            reward += ts.reward
        self._t += 1
        obs = self._flat_obs(ts.observation)
        done = self._t >= self.max_episode_steps
        info = {"success": 0.0, "terminated": 0.0, "t": self._t}
        reward = np.float32(np.asarray(reward, dtype=np.float64).reshape(-1)[0])  # some tasks give shape (1,)
        return obs, float(reward), done, info

    def close(self) -> None:
        self._env.close()

    def __repr__(self) -> str:
        return (f"MT30Env({self.task_name!r} id={self.task_id}, obs_dim={self.obs_dim}, "
                f"action_dim={self.action_dim}, seed={self.seed_value})")


def make_env(task: str | int, seed: int, max_episode_steps: int = EPISODE_LENGTH, lean: bool = False) -> MT30Env:
    """Build one MT30 task (name or id) seeded like TD-MPC2 (`task_kwargs={'random': seed}`)."""
    return MT30Env(task, seed, max_episode_steps=max_episode_steps, lean=lean)
