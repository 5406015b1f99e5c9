"""Online Flow-MBPO / PWM (mode 'online', docs/online.md): no dataset. Per (task, seed) run: OU random seed episodes,
then act in the env with the current policy, append each episode to a replay buffer on the device, and run
`online.utd` updates (`pwm.update`: WM step, actor step, critic steps) per env step; all runs vmapped in one program.

Variants: `mlp` (MLP WM + Gaussian actor, the default), `flow` (flow WM Heun K=4 + flow actor Heun K=2); a
`_small` suffix (`mlp_small`, `flow_small`) picks the demo's small widths, batch and a light MPPI: the size the
CPU benchmark of docs/online.md ran.

    python -m fmbpo_jax.main --config=configs/online.py:flow \\
        --config.tasks=cartpole-swingup,reacher-easy,walker-stand,cup-catch,pendulum-spin --config.seeds=1,2,3
"""
from configs.base import get_config as base_config
from configs.demo import small_size

VARIANTS = ("mlp", "flow", "mlp_small", "flow_small")
TDMPC2_TASKS = "cartpole-swingup,reacher-easy,walker-stand,cup-catch,pendulum-spin"


def _small(c) -> None:
    """The demo's widths and light MPPI (configs/demo.py), batch 128, horizon 8: what a 2-core CPU affords."""
    small_size(c)
    c.alg.batch_size = 128
    c.alg.horizon = 8
    c.alg.wm_batch_size = 128
    c.alg.critic_iterations = 4
    c.eval.episodes = 5


def get_config(variant: str = "mlp"):
    if variant not in VARIANTS:
        raise ValueError(f"online variant {variant!r}: {' | '.join(VARIANTS)}")
    kind = variant.split("_")[0]
    c = base_config()
    c.name = f"online_{variant}"
    c.mode = "online"
    c.tasks = TDMPC2_TASKS
    c.seeds = "1,2,3"
    c.world_model = kind
    c.actor = "gaussian" if kind == "mlp" else "flow"
    c.finetune_wm = True  # the WM learns from the buffer, from scratch
    c.model.size = "5M"  # TD-MPC2's single-task size
    c.model.wm_substeps = 4
    c.model.actor_substeps = 2
    c.alg.batch_size = 256
    c.alg.horizon = 16
    c.alg.wm_batch_size = 256
    c.alg.wm_iterations = 1  # one WM step per update (the fixed preset's wm_updates='iterations')
    c.alg.lr_schedule = "constant"  # the run length is in env steps; TD-MPC2 keeps its learning rates constant
    c.online.env_steps = 100_000
    c.online.seed_steps = 2_500  # TD-MPC2: max(1000, 5 episodes)
    c.online.utd = 1.0
    c.online.update_every = 2
    c.chunk_epochs = 1  # unused in online mode (an episode is the loop's chunk); 1 lets diagnostics.freq be any episode multiple
    c.log_freq = 500  # env steps: one metrics row per run per episode
    c.eval.freq = 5_000  # env steps
    c.checkpoint_freq = 5_000  # env steps
    c.eval.episodes = 10
    c.eval.background = True
    c.data.sampler = "device"
    if variant.endswith("_small"):
        _small(c)
    return c
