"""The 11 custom MT30 tasks, written on dm_control's public API from spec/ENVIRONMENTS.md section 2.

Model edits are done on the stock XML text (lxml), rewards with `dm_control.utils.rewards.tolerance`.
Each factory has the stock signature `(time_limit=..., random=None, environment_kwargs=None)`.
"""

from __future__ import annotations

import functools

import numpy as np
from lxml import etree

from dm_control.rl import control
from dm_control.suite import ball_in_cup, base, cheetah, common, hopper, pendulum, reacher, walker
from dm_control.utils import rewards

_INF = float("inf")


# ----------------------------------------------------------------------------------------------
# model edits
# ----------------------------------------------------------------------------------------------

def _set_plane_half_length(xml: str, geom_name: str, half_length: float) -> str:
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)  # read_model gives bytes
    (geom,) = root.findall(f".//geom[@name='{geom_name}']")
    size = geom.get("size").split()
    size[0] = f"{half_length:g}"
    geom.set("size", " ".join(size))
    return etree.tostring(root, pretty_print=True).decode()


@functools.lru_cache(maxsize=None)
def walker_xml() -> str:
    """Stock walker.xml with the floor half-length 250 -> 500 (floor spans x in [-252, 748])."""
    return _set_plane_half_length(common.read_model("walker.xml"), "floor", 500)


@functools.lru_cache(maxsize=None)
def cheetah_xml() -> str:
    """Stock cheetah.xml with the ground half-length 100 -> 200 (ground spans x in [-102, 298])."""
    return _set_plane_half_length(common.read_model("cheetah.xml"), "ground", 200)


_THREE_LINK_ARM = """
<body name="arm0" pos="0 0 .01">
  <geom name="arm0" type="capsule" fromto="0 0 0 0.09 0 0" size=".01" material="self"/>
  <joint name="shoulder0"/>
  <body name="arm1" pos=".09 0 0">
    <geom name="arm1" type="capsule" fromto="0 0 0 0.09 0 0" size=".01" material="self"/>
    <joint name="shoulder1" limited="true" range="-80 80"/>
    <body name="hand" pos=".09 0 0">
      <geom name="hand" type="capsule" fromto="0 0 0 0.1 0 0" size=".01" material="self"/>
      <joint name="wrist" limited="true" range="-80 80"/>
      <body name="finger" pos=".09 0 0">
        <camera name="hand" pos="0 0 .2" mode="track"/>
        <geom name="finger" type="sphere" size=".01" material="effector"/>
      </body>
    </body>
  </body>
</body>
"""


@functools.lru_cache(maxsize=None)
def reacher_three_xml() -> str:
    """Stock reacher.xml with the 2-link arm replaced by a 3-link chain (reach 0.27) and 3 motors."""
    root = etree.fromstring(common.read_model("reacher.xml"))
    worldbody = root.find("worldbody")
    (arm,) = worldbody.findall("body[@name='arm']")
    new_arm = etree.fromstring(_THREE_LINK_ARM)
    worldbody.replace(arm, new_arm)
    actuator = root.find("actuator")
    for child in list(actuator):
        actuator.remove(child)
    for joint in ("shoulder0", "shoulder1", "wrist"):
        etree.SubElement(actuator, "motor", name=joint, joint=joint)
    return etree.tostring(root, pretty_print=True).decode()


# ----------------------------------------------------------------------------------------------
# walker: walk/run backwards (2.1)
# ----------------------------------------------------------------------------------------------

class BackwardsPlanarWalker(walker.PlanarWalker):
    """Stock PlanarWalker, rewarded for moving in -x at `move_speed` or faster."""

    def get_reward(self, physics):
        standing = rewards.tolerance(physics.torso_height(), bounds=(walker._STAND_HEIGHT, _INF),
                                     margin=walker._STAND_HEIGHT / 2)
        upright = (1 + physics.torso_upright()) / 2
        stand_reward = (3 * standing + upright) / 4
        move_reward = rewards.tolerance(physics.horizontal_velocity(),
                                        bounds=(-_INF, -self._move_speed),
                                        margin=self._move_speed / 2,
                                        value_at_margin=0.5, sigmoid="linear")
        return stand_reward * (5 * move_reward + 1) / 6


def _walker_env(speed, time_limit, random, environment_kwargs):
    physics = walker.Physics.from_xml_string(walker_xml(), common.ASSETS)
    task = BackwardsPlanarWalker(move_speed=speed, random=random)
    return control.Environment(physics, task, time_limit=time_limit,
                               control_timestep=walker._CONTROL_TIMESTEP, **(environment_kwargs or {}))


def walker_walk_backwards(time_limit=walker._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    return _walker_env(walker._WALK_SPEED, time_limit, random, environment_kwargs)


def walker_run_backwards(time_limit=walker._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    return _walker_env(walker._RUN_SPEED, time_limit, random, environment_kwargs)


# ----------------------------------------------------------------------------------------------
# cheetah: run backwards / run front / run back / jump (2.2)
# ----------------------------------------------------------------------------------------------

_CHEETAH_STAND_HEIGHT = 1.2


def _z(physics, body):
    return physics.named.data.xpos[body, "z"]


class CheetahRunBackwards(cheetah.Cheetah):
    _SPEED = 0.8 * cheetah._RUN_SPEED  # 8

    def get_reward(self, physics):
        return rewards.tolerance(physics.speed(), bounds=(-_INF, -self._SPEED), margin=self._SPEED,
                                 value_at_margin=0, sigmoid="linear")


class CheetahRunOneFoot(cheetah.Cheetah):
    """Run forward at >= 6 m/s with the torso and the foot `lifted_foot` above 1.2 m.

    run-front lifts the back foot (`bfoot`), run-back the front foot (`ffoot`).
    """

    _SPEED = 0.6 * cheetah._RUN_SPEED  # 6

    def __init__(self, lifted_foot, random=None):
        self._lifted_foot = lifted_foot
        super().__init__(random=random)

    def get_reward(self, physics):
        torso_up = rewards.tolerance(_z(physics, "torso"), bounds=(_CHEETAH_STAND_HEIGHT, _INF),
                                     margin=_CHEETAH_STAND_HEIGHT / 2)
        foot_up = rewards.tolerance(_z(physics, self._lifted_foot), bounds=(_CHEETAH_STAND_HEIGHT, _INF),
                                    margin=_CHEETAH_STAND_HEIGHT / 2)
        up = (3 * foot_up + 2 * torso_up) / 5
        move = rewards.tolerance(physics.speed(), bounds=(self._SPEED, _INF), margin=self._SPEED,
                                 value_at_margin=0, sigmoid="linear")
        return up * (5 * move + 1) / 6


class CheetahJump(cheetah.Cheetah):
    _SPEED = 0.5

    def _stand(self, physics, foot):
        height = (_z(physics, "torso") + _z(physics, foot)) / 2
        up = rewards.tolerance(height, bounds=(_CHEETAH_STAND_HEIGHT, _INF), margin=_CHEETAH_STAND_HEIGHT / 2)
        still = rewards.tolerance(physics.speed(), bounds=(-self._SPEED, self._SPEED), margin=self._SPEED,
                                  value_at_margin=0, sigmoid="linear")
        return (5 * up + still) / 6

    def get_reward(self, physics):
        return (self._stand(physics, "bfoot") + self._stand(physics, "ffoot")) / 2


def _cheetah_env(task, time_limit, environment_kwargs):
    physics = cheetah.Physics.from_xml_string(cheetah_xml(), common.ASSETS)
    return control.Environment(physics, task, time_limit=time_limit, **(environment_kwargs or {}))


def cheetah_run_backwards(time_limit=cheetah._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    return _cheetah_env(CheetahRunBackwards(random=random), time_limit, environment_kwargs)


def cheetah_run_front(time_limit=cheetah._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    return _cheetah_env(CheetahRunOneFoot("bfoot", random=random), time_limit, environment_kwargs)


def cheetah_run_back(time_limit=cheetah._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    return _cheetah_env(CheetahRunOneFoot("ffoot", random=random), time_limit, environment_kwargs)


def cheetah_jump(time_limit=cheetah._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    return _cheetah_env(CheetahJump(random=random), time_limit, environment_kwargs)


# ----------------------------------------------------------------------------------------------
# hopper: hop backwards (2.3)
# ----------------------------------------------------------------------------------------------

class HopperHopBackwards(hopper.Hopper):
    _SPEED = 1.0

    def __init__(self, random=None):
        super().__init__(hopping=False, random=random)

    def get_reward(self, physics):
        standing = rewards.tolerance(physics.height(), (hopper._STAND_HEIGHT, 2))
        hopping = rewards.tolerance(physics.speed(), bounds=(-_INF, -self._SPEED), margin=self._SPEED / 2,
                                    value_at_margin=0.5, sigmoid="linear")
        return standing * hopping


def hopper_hop_backwards(time_limit=hopper._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    physics = hopper.Physics.from_xml_string(common.read_model("hopper.xml"), common.ASSETS)
    return control.Environment(physics, HopperHopBackwards(random=random), time_limit=time_limit,
                               control_timestep=hopper._CONTROL_TIMESTEP, **(environment_kwargs or {}))


# ----------------------------------------------------------------------------------------------
# reacher: three-link easy / hard (2.4) -- the stock Reacher task on a 3-link model
# ----------------------------------------------------------------------------------------------

def _reacher_three(target_size, time_limit, random, environment_kwargs):
    physics = reacher.Physics.from_xml_string(reacher_three_xml(), common.ASSETS)
    task = reacher.Reacher(target_size=target_size, random=random)
    return control.Environment(physics, task, time_limit=time_limit, **(environment_kwargs or {}))


def reacher_three_easy(time_limit=reacher._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    return _reacher_three(reacher._BIG_TARGET, time_limit, random, environment_kwargs)


def reacher_three_hard(time_limit=reacher._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    return _reacher_three(reacher._SMALL_TARGET, time_limit, random, environment_kwargs)


# ----------------------------------------------------------------------------------------------
# ball_in_cup: spin (2.5)
# ----------------------------------------------------------------------------------------------

class BallInCupSpin(ball_in_cup.BallInCup):
    """Keep the ball out of the cup, far from the target and fast."""

    _ALLOW_OUT_PROB = 0.1

    def initialize_episode(self, physics):
        # One Bernoulli(0.1) draw: may the episode start with the ball outside the cup?
        allow_out = self.random.uniform() < self._ALLOW_OUT_PROB
        while True:
            physics.named.data.qpos["ball_x"] = self.random.uniform(-.2, .2)
            physics.named.data.qpos["ball_z"] = self.random.uniform(.2, .5)
            physics.after_reset()
            if physics.data.ncon == 0 and (physics.in_target() or allow_out):
                break
        base.Task.initialize_episode(self, physics)

    def get_reward(self, physics):
        dist = np.linalg.norm(physics.ball_to_target())
        vel = np.linalg.norm(physics.named.data.qvel[["ball_x", "ball_z"]])
        dist_reward = rewards.tolerance(dist, bounds=(0.5, _INF), margin=0.25, value_at_margin=0.5,
                                        sigmoid="linear")
        vel_reward = rewards.tolerance(vel, bounds=(6, _INF), margin=3, value_at_margin=0.5, sigmoid="linear")
        return (1 - physics.in_target()) * (dist_reward + 2 * vel_reward) / 3


def cup_spin(time_limit=ball_in_cup._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    physics = ball_in_cup.Physics.from_xml_string(common.read_model("ball_in_cup.xml"), common.ASSETS)
    return control.Environment(physics, BallInCupSpin(random=random), time_limit=time_limit,
                               control_timestep=ball_in_cup._CONTROL_TIMESTEP, **(environment_kwargs or {}))


# ----------------------------------------------------------------------------------------------
# pendulum: spin (2.6)
# ----------------------------------------------------------------------------------------------

class PendulumSpin(pendulum.SwingUp):
    def get_reward(self, physics):
        return rewards.tolerance(np.abs(physics.angular_velocity()), bounds=(9, _INF), margin=4.5,
                                 value_at_margin=0.5, sigmoid="linear")


def pendulum_spin(time_limit=pendulum._DEFAULT_TIME_LIMIT, random=None, environment_kwargs=None):
    physics = pendulum.Physics.from_xml_string(common.read_model("pendulum.xml"), common.ASSETS)
    return control.Environment(physics, PendulumSpin(random=random), time_limit=time_limit,
                               **(environment_kwargs or {}))


#: MT30 task name -> factory(time_limit=..., random=..., environment_kwargs=...)
CUSTOM_FACTORIES = {
    "walker-walk-backwards": walker_walk_backwards,
    "walker-run-backwards": walker_run_backwards,
    "cheetah-run-backwards": cheetah_run_backwards,
    "cheetah-run-front": cheetah_run_front,
    "cheetah-run-back": cheetah_run_back,
    "cheetah-jump": cheetah_jump,
    "hopper-hop-backwards": hopper_hop_backwards,
    "reacher-three-easy": reacher_three_easy,
    "reacher-three-hard": reacher_three_hard,
    "cup-spin": cup_spin,
    "pendulum-spin": pendulum_spin,
}
