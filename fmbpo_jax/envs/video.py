"""Optional: render one episode of an MT30 task to a video file. Off by default; needs a GL backend.

Set `MUJOCO_GL=egl` (headless GPU / Mesa) or `glfw` BEFORE anything imports dm_control; the package
default `disable` cannot render. Output by extension: .mp4 (needs `imageio` + `imageio-ffmpeg`),
.gif (needs Pillow), .npy (raw uint8 frames [T, H, W, 3]).

    MUJOCO_GL=egl python -m fmbpo_jax.envs video --task walker-walk --seed 1 --steps 200 --out walk.gif
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import numpy as np

from fmbpo_jax.envs.tasks import MAX_ACTION_DIM


def rollout_frames(task, seed: int, policy: Callable[[np.ndarray], np.ndarray] | None = None, steps: int = 500,
                   height: int = 240, width: int = 320, camera_id: int = 0, action_seed: int = 0):
    """Frames (uint8 [steps+1, H, W, 3]) and rewards of one episode; policy(obs[24]) -> action[6]
    (default: uniform random actions from `action_seed`)."""
    from fmbpo_jax.envs.env import make_env

    if os.environ.get("MUJOCO_GL", "") == "disable":
        raise RuntimeError("rendering needs a GL backend: set MUJOCO_GL=egl (or glfw) before importing "
                           "fmbpo_jax.envs / dm_control")
    env = make_env(task, seed, max_episode_steps=steps)
    rng = np.random.default_rng(action_seed)
    obs = env.reset()
    frames = [env.physics.render(height, width, camera_id=camera_id)]
    rewards = []
    for _ in range(steps):
        a = rng.uniform(-1, 1, MAX_ACTION_DIM).astype(np.float32) if policy is None else policy(obs)
        obs, r, done, _ = env.step(a)
        rewards.append(r)
        frames.append(env.physics.render(height, width, camera_id=camera_id))
        if done:
            break
    return np.stack(frames), np.asarray(rewards, np.float32)


def write_video(frames: np.ndarray, path: str, fps: int = 25) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        np.save(path, frames)
    elif ext == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    elif ext == ".mp4":
        import imageio  # optional dependency

        imageio.mimsave(path, list(frames), fps=fps)
    else:
        raise ValueError(f"unsupported video extension {ext!r} (use .mp4, .gif or .npy)")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.envs video", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--camera", type=int, default=0)
    p.add_argument("--fps", type=int, default=25, help="agent steps are 0.02-0.08 s of sim time, task-dependent")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    frames, rewards = rollout_frames(args.task, args.seed, None, args.steps, args.height, args.width, args.camera)
    write_video(frames, args.out, args.fps)
    print(f"wrote {args.out}: {len(frames)} frames, return {float(rewards.sum()):.3f}")
    return 0
