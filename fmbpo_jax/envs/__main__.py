"""python -m fmbpo_jax.envs {replay,bench,list,video} ...

  replay --golden FILE.npz [--tasks T ...] [--atol 1e-6]   compare our envs with a golden file; exit 1 on mismatch
  bench [--workers 1 2] [--episodes 10] [--steps 500]      evaluation throughput (fmbpo_jax/tools/env_bench.py)
  list                                                     the 30 tasks with ids and dims
  video --task T [--seed S] [--steps N] --out FILE         render an episode (needs MUJOCO_GL=egl or glfw)
"""

from __future__ import annotations

import argparse
import sys


def _replay(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m fmbpo_jax.envs replay",
                                description="Replay a golden trajectory file in our envs and compare.")
    p.add_argument("--golden", required=True, help=".npz in the layout of tests/fixtures/envs/README.md")
    p.add_argument("--tasks", nargs="*", default=None, help="subset of the file's tasks (default: all)")
    p.add_argument("--atol", type=float, default=1e-6, help="max abs difference allowed (default 1e-6)")
    args = p.parse_args(argv)

    from fmbpo_jax.envs.golden import replay_golden

    try:
        reports = replay_golden(args.golden, args.tasks, atol=args.atol)
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'task':28s} {'seed':>5s} {'steps':>5s} {'obs max|d|':>11s} {'rew max|d|':>11s} {'qpos0/qvel0':>11s}")
    bad = 0
    for r in reports:
        s0 = "-" if r.state0_max_abs_diff is None else f"{r.state0_max_abs_diff:.3g}"
        print(f"{r.task:28s} {r.seed:5d} {r.steps:5d} {r.obs_max_abs_diff:11.3g} {r.reward_max_abs_diff:11.3g} "
              f"{s0:>11s}  {'ok' if r.ok else 'MISMATCH'}")
        bad += not r.ok
    print(f"{len(reports) - bad}/{len(reports)} tasks match within {args.atol:g}")
    return 1 if bad else 0


def _list(argv) -> int:
    from fmbpo_jax.envs.tasks import ACTION_DIMS, CUSTOM_TASKS, MT30_TASKS, OBS_DIMS, dmc_names

    for i, t in enumerate(MT30_TASKS):
        d, s = dmc_names(t)
        print(f"{i:2d} {t:28s} obs {OBS_DIMS[t]:2d} act {ACTION_DIMS[t]} {d}/{s}"
              f"{' (custom)' if t in CUSTOM_TASKS else ''}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "replay":
        return _replay(rest)
    if cmd == "bench":
        from fmbpo_jax.tools.env_bench import main as bench_main

        return bench_main(rest)
    if cmd == "list":
        return _list(rest)
    if cmd == "video":
        from fmbpo_jax.envs.video import main as video_main

        return video_main(rest)
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
