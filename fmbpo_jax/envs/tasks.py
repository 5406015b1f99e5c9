"""The MT30 task table (ids, dims, dm_control names). Pure Python: imports neither dm_control nor JAX.

Source: spec/ENVIRONMENTS.md section 1 (task id = position in the list, as in TD-MPC2's TASK_SET['mt30']).
"""

from __future__ import annotations

MT30_TASKS: list[str] = [
    "walker-stand",
    "walker-walk",
    "walker-run",
    "cheetah-run",
    "reacher-easy",
    "reacher-hard",
    "acrobot-swingup",
    "pendulum-swingup",
    "cartpole-balance",
    "cartpole-balance-sparse",
    "cartpole-swingup",
    "cartpole-swingup-sparse",
    "cup-catch",
    "finger-spin",
    "finger-turn-easy",
    "finger-turn-hard",
    "fish-swim",
    "hopper-stand",
    "hopper-hop",
    "walker-walk-backwards",
    "walker-run-backwards",
    "cheetah-run-backwards",
    "cheetah-run-front",
    "cheetah-run-back",
    "cheetah-jump",
    "hopper-hop-backwards",
    "reacher-three-easy",
    "reacher-three-hard",
    "cup-spin",
    "pendulum-spin",
]

_OBS = [24, 24, 24, 17, 6, 6, 6, 3, 5, 5, 5, 5, 8, 9, 12, 12, 24, 15, 15, 24, 24, 17, 17, 17, 17, 15, 8, 8, 8, 3]
_ACT = [6, 6, 6, 6, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 5, 4, 4, 6, 6, 6, 6, 6, 6, 4, 3, 3, 2, 1]

#: task name -> own observation dim (before zero-padding to MAX_OBS_DIM)
OBS_DIMS: dict[str, int] = dict(zip(MT30_TASKS, _OBS))
#: task name -> own action dim (the env uses only the first ACTION_DIMS[task] entries of a 6-dim action)
ACTION_DIMS: dict[str, int] = dict(zip(MT30_TASKS, _ACT))
#: same, indexed by task id
OBS_DIMS_BY_ID: tuple[int, ...] = tuple(_OBS)
ACTION_DIMS_BY_ID: tuple[int, ...] = tuple(_ACT)

MAX_OBS_DIM = 24
MAX_ACTION_DIM = 6
EPISODE_LENGTH = 500  # agent steps (= 1000 dm_control control steps, action repeat 2)
ACTION_REPEAT = 2

#: the 11 tasks that are not in dm_control's suite (built in `custom.py`)
CUSTOM_TASKS: frozenset[str] = frozenset(MT30_TASKS[19:])

_DOMAIN_ALIASES = {"cup": "ball_in_cup", "pointmass": "point_mass"}


def task_id(name: str | int) -> int:
    """MT30 id of a task name (an int is validated and returned). Unknown name: ValueError listing all."""
    if isinstance(name, bool):
        raise TypeError(f"task must be a name or an int id, got {name!r}")
    if isinstance(name, int) or (hasattr(name, "__index__") and not isinstance(name, str)):
        i = int(name)
        if not 0 <= i < len(MT30_TASKS):
            raise ValueError(f"task id {i} out of range [0, {len(MT30_TASKS)})")
        return i
    try:
        return MT30_TASKS.index(name)
    except ValueError:
        raise ValueError(
            f"unknown MT30 task {name!r}; valid names (id order): {', '.join(MT30_TASKS)}"
        ) from None


def task_name(task: str | int) -> str:
    return MT30_TASKS[task_id(task)]


def dmc_names(task: str | int) -> tuple[str, str]:
    """(domain, task) as dm_control spells them: '-' -> '_', split at the first '_', alias cup -> ball_in_cup."""
    name = task_name(task).replace("-", "_")
    domain, sub = name.split("_", 1)
    return _DOMAIN_ALIASES.get(domain, domain), sub


def embodiment(task: str | int) -> str:
    """Embodiment key (reacher-three-* is a different robot than reacher-easy/hard)."""
    domain, sub = dmc_names(task)
    if domain == "reacher" and sub.startswith("three"):
        return "reacher3"
    return domain
