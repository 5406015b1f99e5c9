"""The README's default run: the whole pipeline on a few tasks at a small size, on any machine.

No dataset or checkpoint needed: it collects random-policy episodes in dm_control, pretrains a small
world model, trains policies on it (frozen and fine-tuned) and compares them with a random policy.

Tasks: the two of the 19 MT30 tasks tried where this budget shows learning (README, "The demo"). cup-catch, the third task
until 2026-11, was dropped: no variant ever learned it here (trained = untrained = one ball that starts in the cup).
"""
from configs.base import get_config as base_config


def small_size(c) -> None:
    """The demo's small widths and a lighter MPPI than TD-MPC2's 6 x 512 samples (the planning evaluation takes
    seconds on a CPU); configs/online.py's `_small` variants take them too."""
    c.model.size = "custom"
    c.model.latent_dim = 64
    c.model.encoder_units = (128,)
    c.model.units = (128, 128)
    c.model.flow_units = (128, 128)
    c.model.task_dim = 16
    c.model.actor_units = (64, 64)
    c.model.critic_units = (64, 64)
    c.eval.mppi_samples = 64
    c.eval.mppi_elites = 8
    c.eval.mppi_policy_trajs = 8
    c.eval.mppi_iterations = 3


def get_config():
    c = base_config()
    c.name = "demo"
    c.mode = "demo"
    c.tasks = "cartpole-swingup,pendulum-spin"
    c.seeds = "1"
    small_size(c)
    c.alg.batch_size = 128
    c.alg.horizon = 8
    c.alg.wm_batch_size = 64
    c.alg.wm_iterations = 2
    c.alg.critic_iterations = 4
    c.alg.critic_batches = 4
    c.epochs = 1000
    c.chunk_epochs = 250
    c.log_freq = 250
    c.checkpoint_freq = 500
    c.eval.freq = 500
    c.eval.episodes = 8  # 4 are too noisy to tell a policy from random on cartpole-swingup
    c.eval.background = False
    # 6,000 pretraining iterations (~2 min here): with 2,000 a WM on 100 episodes per task was under-fitted and every
    # cartpole-swingup policy on it ended at the degenerate ~130 (4 of 4 seeds, also at H=16); with 6,000, on the
    # same data, 4 of 4 learned (final 195-294)
    c.pretrain.iters = 6000
    c.pretrain.batch_size = 256
    c.pretrain.best_every = 500
    c.pretrain.checkpoint_every = 1000
    c.demo.episodes_per_task = 100  # collecting is cheap (seconds); the WM's iterations are what costs
    c.demo.episode_length = 501
    # temporally correlated random actions for the WM's data: i.i.d. uniform ones average out, so they never
    # caught the ball (0 of 10 cup-catch episodes) and swing the pole up less (cartpole-swingup return 49 vs 171
    # for OU), and the world model would not see the states the policies must reach
    c.demo.exploration = "ou"
    # fine-tune the pretrained WM 10x slower than it was pretrained: at 3e-4 the WM kept moving under the critic and
    # the joint policy ended at ~130 on cartpole-swingup for 4 of 4 seeds, below its untrained start for 3 (3e-5:
    # above it for 4 of 4)
    c.demo.joint_model_lr = 3e-5
    c.data.sampler = "device"
    return c
