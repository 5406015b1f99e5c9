"""A seconds-long config for end-to-end tests (`--config=tests/tiny_cfg.py --config.data.dataset_dir=STORE`)."""
from configs.base import get_config as base_config

TINY_TASKS = ("cartpole-balance", "reacher-easy", "walker-stand")


def get_config():
    c = base_config()
    c.name = "tiny"
    c.tasks = ",".join(TINY_TASKS)
    c.seeds = "1"
    c.model.size = "tiny"
    c.model.task_dim = 8
    c.model.actor_units = (32, 32)
    c.model.critic_units = (32, 32)
    c.alg.batch_size = 16
    c.alg.horizon = 4
    c.alg.wm_batch_size = 8
    c.alg.wm_iterations = 2
    c.alg.critic_iterations = 2
    c.alg.critic_batches = 2
    c.epochs = 20
    c.chunk_epochs = 5
    c.log_freq = 5
    c.checkpoint_freq = 10
    c.eval.freq = 10
    c.eval.episodes = 1
    c.eval.max_steps = 20
    c.eval.workers = 1
    c.eval.background = False
    c.eval.mppi_samples = 32
    c.eval.mppi_elites = 8
    c.eval.mppi_policy_trajs = 4
    c.eval.mppi_iterations = 2
    c.data.sampler = "device"
    return c
