"""Every field of an fmbpo_jax run, documented. Phase files start from `get_config()` and override.

Override any field from the command line: `--config.epochs=50000 --config.alg.horizon=8`. The config is
locked: a mistyped key fails at once. Behaviour fields left at None take the value of `preset`
(see fmbpo_jax/presets.py and the README's "Differences from the reference" table).
"""
from __future__ import annotations

import ml_collections

# Model sizes (spec/ALGORITHM.md 1.7). flow_units: the flow WM's velocity AND reward hidden widths.
SIZES = {
    "48M": dict(latent_dim=768, encoder_units=(1792, 1792, 1792), units=(1792, 1792), flow_units=(1788, 1788)),
    "5M": dict(latent_dim=512, encoder_units=(256,), units=(512, 512), flow_units=(512, 512)),
    "small": dict(latent_dim=128, encoder_units=(256,), units=(256, 256), flow_units=(256, 256)),
    "tiny": dict(latent_dim=32, encoder_units=(64,), units=(64, 64), flow_units=(64, 64)),
}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"  # used in the default workdir and the wandb run name
    c.phase = 0  # spec section 7 phase this config reproduces (0 = none)
    c.mode = "policy"  # 'policy' (phases 3-7, 9) | 'pretrain_wm' (phase 8) | 'demo' | 'online' (configs/online.py)
    c.preset = "fixed"  # 'fixed' (default: the reference's bugs repaired) | 'reference' (bit-compatible)

    # ---- what to train
    c.tasks = "all"  # 'all' (the 30 MT30 tasks) or comma-separated names, e.g. 'walker-stand,cheetah-run'
    c.seeds = "42"  # comma-separated; every (seed, task) pair is one run, all in one program
    c.epochs = 10_000  # policy epochs (one epoch = WM step(s) if fine-tuning + actor step + critic steps)
    c.world_model = "mlp"  # 'mlp' | 'flow'
    c.actor = "gaussian"  # 'gaussian' | 'flow'
    c.finetune_wm = False  # train the WM jointly (one copy per run, as the reference's one job per task)
    c.checkpoint = ""  # pretrained WM: a PyTorch .pt (TD-MPC2 or native) or a `convert_ckpt checkpoint` dir
    c.checkpoint_required = False  # phases 3/7/9: starting without `checkpoint` is an error

    # ---- model sizes
    c.model = ml_collections.ConfigDict()
    c.model.size = "48M"  # one of configs.base.SIZES (its widths replace the fields below), or 'custom'
    c.model.latent_dim = 768
    c.model.encoder_units = (1792, 1792, 1792)
    c.model.units = (1792, 1792)
    c.model.flow_units = (1788, 1788)
    c.model.task_dim = 64  # 64 for MT30 (96 for MT80)
    c.model.num_bins = 101
    c.model.vmin = -10.0
    c.model.vmax = 10.0
    c.model.simnorm_dim = 8
    c.model.wm_integrator = "heun"  # flow WM: 'heun' | 'euler'
    c.model.wm_substeps = 4  # flow WM: K
    c.model.actor_units = (400, 200, 100)
    c.model.actor_integrator = "heun"  # flow actor
    c.model.actor_substeps = 2  # flow actor: K_pol
    c.model.init_logstd = -1.0
    c.model.min_logstd = -1.427
    c.model.critic_units = (400, 200)
    c.model.num_critics = 3

    # ---- algorithm (reference MT 48M values)
    c.alg = ml_collections.ConfigDict()
    c.alg.horizon = 16
    c.alg.batch_size = 512
    c.alg.gamma = 0.99
    c.alg.lam = 0.95
    c.alg.actor_lr = 5e-4
    c.alg.critic_lr = 5e-4
    c.alg.model_lr = 3e-4
    c.alg.lr_schedule = "linear"  # linear decay to 1e-5 over `epochs` (reference) | 'constant'
    c.alg.actor_grad_clip = 1.0
    c.alg.critic_grad_clip = 100.0
    c.alg.wm_grad_clip = 20.0
    c.alg.critic_iterations = 8
    c.alg.critic_batches = 4
    c.alg.wm_iterations = 8  # used when wm_updates='iterations' (fixed preset)
    c.alg.wm_batch_size = 256
    c.alg.ret_rms = True
    c.alg.tau_sampling = "uniform"  # flow-matching tau: 'uniform' | 'midpoint'
    c.alg.teacher_forcing = False  # WM loss source point: model rollout (reference) or data latent

    # ---- behaviour switches (None = from preset)
    c.behaviour = ml_collections.ConfigDict()
    from fmbpo_jax.presets import BEHAVIOURS

    for name, (ref_value, _, _, _) in BEHAVIOURS.items():
        c.behaviour[name] = ml_collections.FieldReference(None, field_type=type(ref_value))

    # ---- data
    c.data = ml_collections.ConfigDict()
    c.data.dataset_dir = ""  # per-task store written by `python -m convert_ckpt dataset`
    c.data.sampler = "auto"  # 'device' (whole store on the accelerator) | 'host' (mmap + prefetch) | 'auto'
    c.data.device_budget_gb = 20.0  # 'auto' picks 'device' when the selected tasks fit this budget
    c.data.host_threads = 2  # 'host' sampler: gather threads (numpy releases the GIL; 2 keep up with ~260 epochs/s on 2 cores)

    # ---- evaluation
    c.eval = ml_collections.ConfigDict()
    c.eval.freq = 200  # evaluate every `freq` epochs (and at epoch 0, like the reference)
    c.eval.episodes = 10
    c.eval.max_steps = 500  # agent steps per episode (500 = full MT30 episode)
    c.eval.workers = 0  # env worker processes; 0 = automatic, -1 = step the envs in the trainer's process
    c.eval.background = True  # evaluate a params snapshot in a thread while training continues
    c.eval.seed = 0
    c.eval.final = True  # final plain + planning evaluations
    # MPPI (fixed preset's planning evaluation; TD-MPC2 defaults)
    c.eval.mppi_horizon = 3
    c.eval.mppi_iterations = 6
    c.eval.mppi_samples = 512
    c.eval.mppi_elites = 64
    c.eval.mppi_policy_trajs = 24
    c.eval.mppi_temperature = 0.5
    c.eval.mppi_min_std = 0.05
    c.eval.mppi_max_std = 2.0
    c.eval.mppi_deterministic = False  # True: execute the mean's first action instead of an elite sample

    # ---- WM pretraining (phase 8)
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.iters = 200_000
    c.pretrain.batch_size = 1024
    c.pretrain.best_every = 1000  # keep the best (lowest) loss checkpoint, checked every N iters
    # resumable state (WM, Adam, best so far) every N iters (a multiple of best_every), at the end and on SIGTERM;
    # a rerun with the same --workdir continues from it
    c.pretrain.checkpoint_every = 5000
    c.pretrain.seed = 42

    # ---- demo (configs/demo.py): collect -> pretrain -> policies
    c.demo = ml_collections.ConfigDict()
    c.demo.episodes_per_task = 8
    c.demo.episode_length = 501
    # random actions of the collected episodes (data.generate.random_actions): 'uniform' (i.i.d. U(-1, 1)) |
    # 'ou' (Ornstein-Uhlenbeck, temporally correlated: reaches swung-up, caught, fallen states that i.i.d. noise
    # rarely does, so the world model sees them). The demo's "random" baseline is always the uniform policy.
    c.demo.exploration = "uniform"
    c.demo.ou_theta = 0.15  # OU mean reversion per agent step (correlation time ~ 1 / ou_theta steps)
    c.demo.ou_sigma = 0.4  # OU innovation std (stationary std 0.76 for theta 0.15, before the clip to [-1, 1])
    # WM learning rate of the demo's joint variant, which fine-tunes the WM the demo just pretrained (0 = alg.model_lr,
    # the pretraining lr; why the demo lowers it: configs/demo.py)
    c.demo.joint_model_lr = 0.0

    # ---- online MBPO (mode 'online', configs/online.py; docs/online.md): act in the env, a replay buffer on the device
    c.online = ml_collections.ConfigDict()
    c.online.env_steps = 100_000  # agent steps per run (a multiple of episode_length)
    c.online.episode_length = 500  # agent steps per episode (500 = full MT30 episode)
    c.online.seed_steps = 2_500  # first agent steps with OU random actions, no updates (a multiple of episode_length)
    c.online.utd = 1.0  # updates per env step (one update = pwm.update: WM step(s), actor step, critic steps)
    c.online.update_every = 2  # env steps between update calls; utd * update_every updates per call (an integer)
    c.online.action_noise = 0.0  # std of Gaussian noise added to the policy's sampled (tanh) action, then clipped
    c.online.ou_theta = 0.15  # seed episodes' OU random actions (data.generate.random_actions)
    c.online.ou_sigma = 0.4
    c.online.env_workers = 0  # env worker processes for acting; 0 = automatic, -1 = step the envs in this process
    # In online mode eval.freq, checkpoint_freq, log_freq and diagnostics.freq count ENV STEPS (multiples of
    # episode_length); `epochs` is unused (the update count follows from the fields above).

    # ---- run mechanics
    c.chunk_epochs = 100  # epochs per jitted call (lax.scan); logging/eval/checkpoint happen between chunks
    c.log_freq = 100  # log one row per task every N epochs (a multiple of chunk_epochs is exact)
    c.checkpoint_freq = 1000  # epochs between checkpoints (also at the end and on SIGTERM)
    c.task_chunk = 0  # >0: process the run axis in groups of this size with lax.map (memory); 1 = one run at a
    # time, unbatched (fastest on CPU, where vmapped per-run matmuls become slow batched dots); -1 = auto: the largest
    # group whose compiled training step fits task_chunk_memory_gb (48M full flow x 30 tasks on 80 GB: 3, README Memory)
    c.task_chunk_memory_gb = 0.0  # the memory budget of task_chunk=-1; 0 = 90% of the device's (no limit where unknown: CPU)
    c.data_parallel = 1  # devices per run group that split each run's batch (mesh 'data' axis; needs task_chunk=0)
    c.precision = "float32"  # 'float32' (full-precision matmuls) | 'tf32' (default matmul precision) | 'bf16'
    # (bfloat16 matmul operands with float32 accumulation, params, norms and optimizer: nets.bf16_matmul)
    c.remat = False  # recompute rollout/integrator steps in the backward pass: far less activation memory (48M flow
    # WM fine-tuning), ~1.3x the compute of those steps; results unchanged
    c.remat_policy = ""  # what the rollout scans keep for the backward pass: '' = follow c.remat (False: 'all',
    # True: 'step'); 'all' (every activation, stacked over H) | 'step' (= remat True) | 'matmul_inputs' (only the
    # matmul operands, bf16 under precision bf16; LayerNorm/Mish/SimNorm/softmax recomputed). Same numbers in all three
    c.deterministic = False  # XLA deterministic ops on GPU (slower)
    c.max_nan_skips = 100  # stop when a run skipped this many consecutive updates for NaN/Inf
    # ---- diagnostics (fmbpo_jax.diagnostics; off by default): written to diagnostics.jsonl
    c.diagnostics = ml_collections.ConfigDict()
    c.diagnostics.freq = 0  # >0: every N epochs (a multiple of chunk_epochs), device sampler only
    c.diagnostics.num_groups = 8  # actor-gradient groups for the ESNR (divides alg.batch_size; = batch_size: per sample)
    c.diagnostics.num_probes = 4  # random VJP probes for the WM Jacobian proxies
    c.diagnostics.jac_samples = 64  # start latents used for the Jacobian proxies
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = "fmbpo_jax"
    c.wandb.entity = ""
    return c


def apply_size(c: ml_collections.ConfigDict) -> None:
    """Copy the widths of c.model.size into c.model (no-op for 'custom')."""
    if c.model.size == "custom":
        return
    if c.model.size not in SIZES:
        raise ValueError(f"--config.model.size={c.model.size!r}: known sizes {sorted(SIZES)} or 'custom'")
    for k, v in SIZES[c.model.size].items():
        c.model[k] = v
