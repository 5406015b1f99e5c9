"""MT30 environments: task table, golden trajectories, custom rewards on hand-set states, bad input, replay CLI."""

import os

os.environ.setdefault("MUJOCO_GL", "disable")

import copy
import math
import subprocess
import sys
from pathlib import Path

import mujoco
import numpy as np
import pytest

from fmbpo_jax.envs import (
    ACTION_DIMS,
    ACTION_DIMS_BY_ID,
    MAX_ACTION_DIM,
    MAX_OBS_DIM,
    MT30_TASKS,
    OBS_DIMS,
    OBS_DIMS_BY_ID,
    action_mask,
    dmc_names,
    make_env,
    task_id,
)

GOLDEN = Path(__file__).parent / "fixtures" / "envs" / "mt30_golden_seed1.npz"
REPO = Path(__file__).resolve().parents[1]

# TD-MPC2's MT30 task table (docs/environments.md), typed in independently of fmbpo_jax/envs/tasks.py
SPEC_TABLE = """
0 walker-stand 24 6; 1 walker-walk 24 6; 2 walker-run 24 6; 3 cheetah-run 17 6; 4 reacher-easy 6 2;
5 reacher-hard 6 2; 6 acrobot-swingup 6 1; 7 pendulum-swingup 3 1; 8 cartpole-balance 5 1;
9 cartpole-balance-sparse 5 1; 10 cartpole-swingup 5 1; 11 cartpole-swingup-sparse 5 1; 12 cup-catch 8 2;
13 finger-spin 9 2; 14 finger-turn-easy 12 2; 15 finger-turn-hard 12 2; 16 fish-swim 24 5; 17 hopper-stand 15 4;
18 hopper-hop 15 4; 19 walker-walk-backwards 24 6; 20 walker-run-backwards 24 6; 21 cheetah-run-backwards 17 6;
22 cheetah-run-front 17 6; 23 cheetah-run-back 17 6; 24 cheetah-jump 17 6; 25 hopper-hop-backwards 15 4;
26 reacher-three-easy 8 3; 27 reacher-three-hard 8 3; 28 cup-spin 8 2; 29 pendulum-spin 3 1
"""
SPEC = [row.split() for row in SPEC_TABLE.replace("\n", " ").split(";")]


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as d:
        return {k: d[k] for k in d.files}


# ------------------------------------------------------------------------------------------------
# task table
# ------------------------------------------------------------------------------------------------

def test_task_table_matches_spec(golden):
    assert len(MT30_TASKS) == 30 and MAX_OBS_DIM == 24 and MAX_ACTION_DIM == 6
    for i, name, obs, act in SPEC:
        assert MT30_TASKS[int(i)] == name and task_id(name) == int(i)
        assert OBS_DIMS[name] == OBS_DIMS_BY_ID[int(i)] == int(obs)
        assert ACTION_DIMS[name] == ACTION_DIMS_BY_ID[int(i)] == int(act)
        assert action_mask(name) == [1.0] * int(act) + [0.0] * (6 - int(act))
    assert list(golden["task_names"]) == MT30_TASKS
    assert list(golden["obs_dims"]) == [OBS_DIMS[t] for t in MT30_TASKS]
    assert list(golden["action_dims"]) == [ACTION_DIMS[t] for t in MT30_TASKS]
    assert dmc_names("cup-catch") == ("ball_in_cup", "catch")
    assert dmc_names("cartpole-balance-sparse") == ("cartpole", "balance_sparse")
    assert dmc_names("reacher-three-easy") == ("reacher", "three_easy")


# ------------------------------------------------------------------------------------------------
# golden trajectories (recorded with the original TD-MPC2 env code): bit-exact
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lean", [False, True], ids=["full", "lean"])
@pytest.mark.parametrize("name", MT30_TASKS)
def test_golden_trajectory(name, lean, golden):
    seed = int(golden["seed"])
    env = make_env(name, seed, lean=lean)
    # lean: 8x8 shared skybox, same physics (fish.xml declares its own skybox and stays as it is)
    assert (env.physics.model.ptr.ntexdata < 1_000_000) == (lean and name != "fish-swim")
    assert (env.task_id, env.obs_dim, env.action_dim) == (task_id(name), OBS_DIMS[name], ACTION_DIMS[name])
    spec = env.dmc_env.action_spec()
    assert spec.shape == (ACTION_DIMS[name],) and np.all(spec.minimum == -1) and np.all(spec.maximum == 1)
    obs0 = env.reset()
    assert obs0.dtype == np.float32 and obs0.shape == (24,)
    np.testing.assert_array_equal(env.physics.data.qpos, golden[f"qpos0_{name}"])
    np.testing.assert_array_equal(env.physics.data.qvel, golden[f"qvel0_{name}"])
    obs, rew = [obs0], []
    # the file's actions are actions_full[:, :A]; we feed the full 6-dim actions (padding must be ignored)
    np.testing.assert_array_equal(golden[f"action_{name}"], golden["actions_full"][:, : env.action_dim])
    for a in golden["actions_full"]:
        o, r, done, info = env.step(a)
        assert o.dtype == np.float32 and o.shape == (24,) and isinstance(r, float)
        assert done is False and info["success"] == 0.0
        obs.append(o)
        rew.append(r)
    obs, rew = np.stack(obs), np.asarray(rew, np.float32)
    np.testing.assert_array_equal(obs, golden[f"obs_{name}"])
    np.testing.assert_array_equal(rew, golden[f"reward_{name}"])
    assert np.all(obs[:, OBS_DIMS[name]:] == 0)


def test_golden_with_truncated_actions_and_int_id(golden):
    name = "cup-spin"
    env = make_env(task_id(name), int(golden["seed"]))
    obs = [env.reset()] + [env.step(a)[0] for a in golden[f"action_{name}"]]
    np.testing.assert_array_equal(np.stack(obs), golden[f"obs_{name}"])


# ------------------------------------------------------------------------------------------------
# seeding
# ------------------------------------------------------------------------------------------------

def _trajectory(env, n=15, seed=0):
    acts = np.random.default_rng(seed).uniform(-1, 1, (n, 6)).astype(np.float32)
    out = [env.reset()]
    rews = []
    for a in acts:
        o, r, _, _ = env.step(a)
        out.append(o)
        rews.append(r)
    return np.stack(out), np.array(rews)


@pytest.mark.parametrize("name", ["reacher-easy", "finger-turn-hard", "fish-swim", "cup-spin", "cheetah-jump"])
def test_reseed_and_copy_equal_fresh_env(name):
    fresh = _trajectory(make_env(name, 7))
    used = make_env(name, 3)
    _trajectory(used)
    _trajectory(used)
    used.seed(7)
    clone = copy.deepcopy(used)
    for env in (used, clone):
        got = _trajectory(env)
        np.testing.assert_array_equal(got[0], fresh[0])
        np.testing.assert_array_equal(got[1], fresh[1])
    assert not np.array_equal(_trajectory(make_env(name, 8))[0][0], fresh[0][0])


def test_successive_resets_continue_the_stream():
    env = make_env("pendulum-swingup", 5)
    first, second = env.reset(), env.reset()
    assert not np.array_equal(first, second)
    env.seed(5)
    np.testing.assert_array_equal(env.reset(), first)
    np.testing.assert_array_equal(env.reset(), second)


def test_episode_is_500_steps_and_then_needs_reset():
    env = make_env("pendulum-spin", 0)
    env.reset()
    for t in range(1, 501):
        _, _, done, info = env.step(np.zeros(1))
        assert done == (t == 500) and info["t"] == t
    assert env.physics.data.time == pytest.approx(20.0)  # = dm_control's time limit: LAST coincides
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1))
    env.reset()
    env.step(np.zeros(1))
    short = make_env("pendulum-spin", 0, max_episode_steps=3)
    short.reset()
    assert [short.step(np.zeros(6))[2] for _ in range(3)] == [False, False, True]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError) as e:
        task_id("walker-wlak")
    msg = str(e.value)
    assert "walker-wlak" in msg and all(t in msg for t in MT30_TASKS)
    with pytest.raises(ValueError, match="pendulum-spin"):
        make_env("cheetah_run", 0)
    with pytest.raises(ValueError, match="out of range"):
        make_env(30, 0)
    with pytest.raises(ValueError):
        make_env("walker-walk", 0, max_episode_steps=501)
    with pytest.raises(ValueError):
        make_env("walker-walk", -1)


def test_bad_actions_raise_and_leave_env_untouched():
    ref = make_env("cup-catch", 2)
    env = make_env("cup-catch", 2)
    ref.reset()
    env.reset()
    with pytest.raises(RuntimeError, match="reset"):
        make_env("cup-catch", 2).step(np.zeros(2))
    good = np.array([0.3, -0.2], np.float32)
    bad = [np.zeros(3), np.zeros(5), np.zeros(1), np.zeros((1, 6)), np.zeros(7), np.array([np.nan, 0.0]),
           np.array([0.1, np.inf, 0, 0, 0, 0]), np.array(["a", "b"])]
    for a in bad:
        with pytest.raises(ValueError):
            env.step(a)
    assert env.t == 0
    for _ in range(3):
        np.testing.assert_array_equal(env.step(good)[0], ref.step(good)[0])
    # NaN in the padding (beyond the task's own dims) is ignored, as the multitask wrapper truncates a[:A]
    padded = np.array([0.3, -0.2, np.nan, np.nan, 0, 0], np.float32)
    np.testing.assert_array_equal(env.step(padded)[0], ref.step(good)[0])


def test_mujoco_gl_defaults_to_disable():
    code = ("import os; import fmbpo_jax.envs as E; assert os.environ['MUJOCO_GL'] == 'disable';"
            "e = E.make_env('acrobot-swingup', 0); e.reset(); print(os.environ['MUJOCO_GL'])")
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "disable"


# ------------------------------------------------------------------------------------------------
# custom tasks: models and rewards on hand-set states (tolerance formula re-derived here by hand)
# ------------------------------------------------------------------------------------------------

def tol(x, lo, hi, margin, sigmoid="gaussian", vam=0.1):
    if lo <= x <= hi:
        return 1.0
    if margin == 0:
        return 0.0
    d = ((lo - x) if x < lo else (x - hi)) / margin
    if sigmoid == "gaussian":
        return math.exp(-0.5 * (d * math.sqrt(-2 * math.log(vam))) ** 2)
    if sigmoid == "linear":
        return max(0.0, 1 - d * (1 - vam))
    raise ValueError(sigmoid)


def _set_state(env, qpos=None, qvel=None, **named):
    p = env.physics
    p.data.qpos[:] = 0 if qpos is None else qpos
    p.data.qvel[:] = 0 if qvel is None else qvel
    for key, value in named.items():
        kind, joint = key.split("__")
        getattr(p.named.data, kind)[joint] = value
    p.forward()
    return p


def _reward(env):
    return float(np.asarray(env.task.get_reward(env.physics)).reshape(-1)[0])


def test_custom_models_differ_from_stock_only_as_specified():
    w, ws = make_env("walker-walk-backwards", 0).physics, make_env("walker-walk", 0).physics
    assert w.named.model.geom_size["floor", 0] == 500 and ws.named.model.geom_size["floor", 0] == 250
    assert w.named.model.geom_pos["floor", 0] == 248
    np.testing.assert_array_equal(w.model.body_mass, ws.model.body_mass)
    c, cs = make_env("cheetah-jump", 0).physics, make_env("cheetah-run", 0).physics
    assert c.named.model.geom_size["ground", 0] == 200 and cs.named.model.geom_size["ground", 0] == 100
    h, hs = make_env("hopper-hop-backwards", 0), make_env("hopper-hop", 0)
    assert h.physics.model.nq == hs.physics.model.nq and h.dmc_env.control_timestep() == 0.02
    r = make_env("reacher-three-hard", 0)
    r.reset()
    p = r.physics
    assert p.model.nu == 3 and p.model.nq == 3 and r.dmc_env.control_timestep() == 0.02
    assert list(p.named.data.qpos.axes.row.names) == ["shoulder0", "shoulder1", "wrist"]
    np.testing.assert_allclose(p.named.model.jnt_range["shoulder1"], np.deg2rad([-80, 80]))
    np.testing.assert_allclose(p.named.model.jnt_range["wrist"], np.deg2rad([-80, 80]))
    assert p.named.model.jnt_limited["shoulder0"] == 0
    np.testing.assert_allclose(p.model.actuator_gear[:, 0], 0.05)
    _set_state(r)
    np.testing.assert_allclose(p.named.data.geom_xpos["finger"], [0.27, 0, 0.01], atol=1e-12)  # reach 0.27
    assert p.named.model.geom_size["target", 0] == 0.015 and p.model.opt.disableflags & int(mujoco.mjtDisableBit.mjDSBL_CONTACT)


@pytest.mark.parametrize("name,v", [("walker-walk-backwards", 1.0), ("walker-run-backwards", 8.0)])
def test_walker_backwards_reward(name, v):
    env, stock = make_env(name, 0), make_env(name.replace("-backwards", ""), 0)
    for rootz, rooty, speed in [(0.0, 0.0, -1.25 * v), (-0.3, 0.4, -0.75 * v), (-0.7, 1.0, 0.0), (0.0, 0.0, v)]:
        p = _set_state(env, qpos__rootz=rootz, qpos__rooty=rooty, qvel__rootx=speed)
        h, up, u = p.torso_height(), p.torso_upright(), p.horizontal_velocity()
        assert u == pytest.approx(speed, abs=1e-9)
        stand = (3 * tol(h, 1.2, math.inf, 0.6) + (1 + up) / 2) / 4
        move = tol(u, -math.inf, -v, v / 2, "linear", 0.5)
        assert _reward(env) == pytest.approx(stand * (5 * move + 1) / 6, rel=1e-12, abs=1e-12)
        # mirror image of the stock task
        _set_state(stock, qpos__rootz=rootz, qpos__rooty=rooty, qvel__rootx=-speed)
        assert _reward(env) == pytest.approx(_reward(stock), rel=1e-12, abs=1e-12)
    _set_state(env, qvel__rootx=-0.75 * v)  # d = 0.5 margins -> move = 1 - 0.5 * 0.5
    assert _reward(env) == pytest.approx((3 * 1 + 1) / 4 * (5 * 0.75 + 1) / 6)


def test_cheetah_run_backwards_reward():
    env = make_env("cheetah-run-backwards", 0)
    for speed, expected in [(-10.0, 1.0), (-8.0, 1.0), (-4.0, 0.5), (-2.0, 0.25), (0.0, 0.0), (5.0, 0.0)]:
        _set_state(env, qvel__rootx=speed)
        assert _reward(env) == pytest.approx(expected, abs=1e-9)


def _cheetah_terms(p):
    z = p.named.data.xpos
    return z["torso", "z"], z["ffoot", "z"], z["bfoot", "z"], p.speed()


@pytest.mark.parametrize("name,lifted", [("cheetah-run-front", "bfoot"), ("cheetah-run-back", "ffoot")])
def test_cheetah_run_one_foot_reward(name, lifted):
    env = make_env(name, 0)
    values = []
    for rootz, rooty, speed in [(0.0, 0.0, 7.0), (0.5, 0.6, 3.0), (0.9, -0.8, 6.0), (0.4, 0.0, -1.0)]:
        p = _set_state(env, qpos__rootz=rootz, qpos__rooty=rooty, qvel__rootx=speed)
        ht, hf, hb, u = _cheetah_terms(p)
        foot = hb if lifted == "bfoot" else hf
        up = (3 * tol(foot, 1.2, math.inf, 0.6) + 2 * tol(ht, 1.2, math.inf, 0.6)) / 5
        move = tol(u, 6, math.inf, 6, "linear", 0.0)
        assert _reward(env) == pytest.approx(up * (5 * move + 1) / 6, rel=1e-12, abs=1e-12)
        values.append(_reward(env))
    # nose-up vs nose-down tilt lifts different feet: the two tasks must disagree somewhere
    other = make_env("cheetah-run-back" if name == "cheetah-run-front" else "cheetah-run-front", 0)
    _set_state(other, qpos__rootz=0.9, qpos__rooty=-0.8, qvel__rootx=6.0)
    assert _reward(other) != pytest.approx(values[2], abs=1e-3)
    # a hand-computed point: torso at 1.2+, speed >= 6 and the lifted foot high enough -> 1
    p = _set_state(env, qpos__rootz=2.0, qvel__rootx=6.5)
    assert min(_cheetah_terms(p)[:3]) >= 1.2 and _reward(env) == pytest.approx(1.0)


def test_cheetah_jump_reward():
    env = make_env("cheetah-jump", 0)
    for rootz, rooty, speed in [(0.0, 0.0, 0.0), (0.6, 0.3, 0.25), (1.0, -0.5, -0.8), (0.2, 0.0, 3.0)]:
        p = _set_state(env, qpos__rootz=rootz, qpos__rooty=rooty, qvel__rootx=speed)
        ht, hf, hb, u = _cheetah_terms(p)
        still = tol(u, -0.5, 0.5, 0.5, "linear", 0.0)
        stand = [(5 * tol((ht + h) / 2, 1.2, math.inf, 0.6) + still) / 6 for h in (hb, hf)]
        assert _reward(env) == pytest.approx(sum(stand) / 2, rel=1e-12, abs=1e-12)
    _set_state(env, qvel__rootx=0.75)  # default pose: torso .7, feet ~.3 -> gaussian term by hand
    ht, hf, hb, _ = _cheetah_terms(env.physics)
    s = math.sqrt(-2 * math.log(0.1))
    g = [math.exp(-0.5 * ((1.2 - (ht + h) / 2) / 0.6 * s) ** 2) for h in (hb, hf)]
    assert _reward(env) == pytest.approx(sum((5 * x + 0.5) / 6 for x in g) / 2)


def test_hopper_hop_backwards_reward():
    env = make_env("hopper-hop-backwards", 0)
    for speed, expected in [(-2.0, 1.0), (-1.0, 1.0), (-0.75, 0.75), (-0.5, 0.5), (0.0, 0.0), (1.5, 0.0)]:
        p = _set_state(env, qvel__rootx=speed)
        assert 0.6 <= p.height() <= 2  # default pose stands (height ~0.98)
        assert _reward(env) == pytest.approx(expected, abs=1e-9)
    p = _set_state(env, qpos__rooty=math.pi / 2, qvel__rootx=-2.0)  # lying down: standing gate closes
    assert p.height() < 0.6 and _reward(env) == 0.0
    # stock hop rewards the mirror image with target 2 m/s, margin 1
    stock = make_env("hopper-hop", 0)
    _set_state(stock, qvel__rootx=1.5)
    assert _reward(stock) == pytest.approx(0.75)


@pytest.mark.parametrize("name,radius", [("reacher-three-easy", 0.05), ("reacher-three-hard", 0.015)])
def test_reacher_three_reward(name, radius):
    env = make_env(name, 0)
    env.reset()
    p = env.physics
    assert p.named.model.geom_size["target", 0] == radius
    _set_state(env, qpos=[0.3, -0.5, 0.7])
    finger = p.named.data.geom_xpos["finger", :2].copy()
    for offset, expected in [(0.0, 1.0), (radius + 0.01 - 1e-4, 1.0), (radius + 0.01 + 1e-4, 0.0), (0.1, 0.0)]:
        p.named.model.geom_pos["target", "x"] = finger[0] + offset
        p.named.model.geom_pos["target", "y"] = finger[1]
        p.forward()
        assert _reward(env) == expected
    obs = env.task.get_observation(p)
    assert list(obs) == ["position", "to_target", "velocity"] and sum(np.size(v) for v in obs.values()) == 8


def test_cup_spin_reward():
    env = make_env("cup-spin", 0)
    p = env.physics
    cases = [(0.4, -0.3, 4.5, 0.0), (0.0, -0.6, 0.0, 8.0), (-0.25, 0.1, 3.0, 2.0)]
    for bx, bz, vx, vz in cases:
        _set_state(env, qpos__ball_x=bx, qpos__ball_z=bz, qvel__ball_x=vx, qvel__ball_z=vz)
        assert p.in_target() == 0.0
        dist = float(np.linalg.norm(p.ball_to_target()))
        vel = math.hypot(vx, vz)
        expected = (tol(dist, 0.5, math.inf, 0.25, "linear", 0.5) + 2 * tol(vel, 6, math.inf, 3, "linear", 0.5)) / 3
        assert _reward(env) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # ball in the cup: no reward however fast it moves
    _set_state(env, qpos__ball_z=0.37, qvel__ball_x=10.0)
    assert p.in_target() == 1.0 and _reward(env) == 0.0
    # a hand-computed point: vel 4.5 -> d = 0.5 -> 0.75; ball far below the cup -> dist term 1
    _set_state(env, qpos__ball_z=-0.6, qvel__ball_x=4.5)
    assert float(np.linalg.norm(p.ball_to_target())) > 0.5
    assert _reward(env) == pytest.approx((1 + 2 * 0.75) / 3)


def test_cup_spin_initial_states():
    """~90% of episodes start with the ball in the cup; never in contact (TD-MPC2's cup-spin initialisation)."""
    env = make_env("cup-spin", 0)
    inside = 0
    for s in range(60):
        env.seed(s)
        env.reset()
        allow_out = np.random.RandomState(s).uniform() < 0.1
        assert env.physics.data.ncon == 0
        assert env.physics.in_target() == 1.0 or allow_out
        inside += env.physics.in_target()
    assert 45 <= inside <= 60


def test_pendulum_spin_reward():
    env = make_env("pendulum-spin", 0)
    for omega, expected in [(10.0, 1.0), (-9.0, 1.0), (6.75, 0.75), (-6.75, 0.75), (4.5, 0.5), (0.0, 0.0)]:
        for angle in (0.0, 2.0):
            _set_state(env, qpos__hinge=angle, qvel__hinge=omega)
            assert _reward(env) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# replay CLI
# ------------------------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fmbpo_jax.envs", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_replay_cli_accepts_golden():
    out = _cli("replay", "--golden", str(GOLDEN))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "30/30 tasks match" in out.stdout
    assert out.stdout.count(" ok") == 30


def test_replay_cli_rejects_tampered_copy(tmp_path, golden):
    bad = dict(golden)
    bad["obs_hopper-hop"] = golden["obs_hopper-hop"].copy()
    bad["obs_hopper-hop"][37, 3] += 1e-5
    bad["reward_walker-run-backwards"] = golden["reward_walker-run-backwards"].copy()
    bad["reward_walker-run-backwards"][5] += 1e-4
    path = tmp_path / "tampered.npz"
    np.savez(path, **bad)
    out = _cli("replay", "--golden", str(path), "--tasks", "hopper-hop", "walker-run-backwards", "cup-spin")
    assert out.returncode == 1, out.stdout + out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln and ln.split()[0] in MT30_TASKS}
    assert "MISMATCH" in lines["hopper-hop"] and "MISMATCH" in lines["walker-run-backwards"]
    assert lines["cup-spin"].endswith(" ok")
    # a different seed and a shorter horizon are read from the file
    short = {k: v for k, v in golden.items() if k.endswith("pendulum-spin") or k in ("task_names",)}
    env = make_env("pendulum-spin", 9)
    obs = [env.reset()] + [env.step(a)[0] for a in golden["action_pendulum-spin"][:10]]
    short.update({"seed": np.int64(9), "task_names": np.array(["pendulum-spin"]), "obs_pendulum-spin": np.stack(obs),
                  "reward_pendulum-spin": golden["reward_pendulum-spin"][:10] * 0,
                  "action_pendulum-spin": golden["action_pendulum-spin"][:10]})
    del short["qpos0_pendulum-spin"], short["qvel0_pendulum-spin"]
    np.savez(tmp_path / "short.npz", **short)
    out = _cli("replay", "--golden", str(tmp_path / "short.npz"))
    assert out.returncode == 1 and "MISMATCH" in out.stdout  # rewards were zeroed
    env = make_env("pendulum-spin", 9)
    env.reset()
    short["reward_pendulum-spin"] = np.asarray([env.step(a)[1] for a in golden["action_pendulum-spin"][:10]],
                                               np.float32)
    np.savez(tmp_path / "short.npz", **short)
    out = _cli("replay", "--golden", str(tmp_path / "short.npz"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "    9    10 " in out.stdout


def test_replay_cli_unknown_task_is_an_error():
    out = _cli("replay", "--golden", str(GOLDEN), "--tasks", "walker-jump")
    assert out.returncode == 2 and "walker-walk" in out.stderr
