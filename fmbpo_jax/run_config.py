"""From an ml_collections config to the static pieces of a run: model/algorithm configs, tasks, seeds.

Validation happens here, before anything compiles: every error is one line naming the --config flag.
"""
from __future__ import annotations

import dataclasses

from configs.base import SIZES, apply_size
from fmbpo_jax import presets, pwm
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, MAX_ACTION_DIM, MAX_OBS_DIM, MT30_TASKS
from fmbpo_jax.world_model import WMConfig


class ConfigError(ValueError):
    """A config value that cannot run; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The run axis: run r = (seeds[r // T], task_ids[r % T]), seed-major. T tasks, S seeds, R = S*T runs."""

    task_ids: tuple[int, ...]
    seeds: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.task_ids)

    @property
    def num_runs(self) -> int:
        return len(self.task_ids) * len(self.seeds)

    @property
    def run_task_ids(self) -> list[int]:
        return [t for _ in self.seeds for t in self.task_ids]

    @property
    def run_task_pos(self) -> list[int]:
        return [i for _ in self.seeds for i in range(len(self.task_ids))]

    @property
    def run_seeds(self) -> list[int]:
        return [s for s in self.seeds for _ in self.task_ids]

    def run_name(self, r: int) -> str:
        return f"{MT30_TASKS[self.run_task_ids[r]]}/seed{self.run_seeds[r]}"


def parse_tasks(tasks: str) -> tuple[int, ...]:
    if tasks.strip() in ("all", "mt30", ""):
        return tuple(range(len(MT30_TASKS)))
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in MT30_TASKS]
    if unknown:
        raise ConfigError(f"--config.tasks: unknown task(s) {unknown}; valid: {', '.join(MT30_TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--config.tasks: duplicate task names in {tasks!r}")
    return tuple(MT30_TASKS.index(n) for n in names)


def parse_seeds(seeds) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in str(seeds).replace(" ", "").split(",") if s != "")
    except ValueError:
        raise ConfigError(f"--config.seeds={seeds!r}: expected comma-separated integers, e.g. '42,123,456'") from None
    if not out:
        raise ConfigError("--config.seeds is empty")
    if len(set(out)) != len(out):
        raise ConfigError(f"--config.seeds: duplicate seeds in {seeds!r}")
    return out


def behaviours(config) -> dict:
    """Preset values with every explicitly set --config.behaviour.* override applied."""
    try:
        values = presets.preset_values(config.preset)
    except ValueError as e:
        raise ConfigError(f"--config.preset: {e}") from None
    for name in values:
        v = config.behaviour[name]
        if v is not None:
            values[name] = v
    return values


def validate(config) -> None:
    """One-line errors naming the flag, before anything compiles."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(config.mode in ("policy", "pretrain_wm", "demo"), f"--config.mode={config.mode!r}: use policy | pretrain_wm | demo")
    need(config.epochs > 0, f"--config.epochs={config.epochs}: must be > 0")
    need(config.alg.horizon >= 1, f"--config.alg.horizon={config.alg.horizon}: must be >= 1")
    need(config.model.wm_substeps >= 1, f"--config.model.wm_substeps={config.model.wm_substeps}: K must be >= 1")
    need(config.model.actor_substeps >= 1, f"--config.model.actor_substeps={config.model.actor_substeps}: K must be >= 1")
    need(config.world_model in ("mlp", "flow"), f"--config.world_model={config.world_model!r}: use mlp | flow")
    need(config.actor in ("gaussian", "flow"), f"--config.actor={config.actor!r}: use gaussian | flow")
    rows = config.alg.batch_size * config.alg.horizon
    need(config.alg.batch_size > 0, f"--config.alg.batch_size={config.alg.batch_size}: must be > 0")
    need(config.alg.critic_batches > 0 and rows % config.alg.critic_batches == 0,
         f"--config.alg.critic_batches={config.alg.critic_batches}: must divide batch_size*horizon={rows}")
    need(config.chunk_epochs > 0, f"--config.chunk_epochs={config.chunk_epochs}: must be > 0")
    need(config.log_freq > 0, f"--config.log_freq={config.log_freq}: must be > 0")
    need(config.eval.freq > 0, f"--config.eval.freq={config.eval.freq}: must be > 0")
    d = config.diagnostics
    need(d.freq >= 0 and d.freq % config.chunk_epochs == 0,
         f"--config.diagnostics.freq={d.freq}: must be 0 (off) or a multiple of --config.chunk_epochs={config.chunk_epochs}")
    need(d.freq == 0 or (d.num_groups >= 2 and config.alg.batch_size % d.num_groups == 0),
         f"--config.diagnostics.num_groups={d.num_groups}: must be >= 2 and divide --config.alg.batch_size={config.alg.batch_size}")
    need(config.precision in ("float32", "tf32", "bf16"), f"--config.precision={config.precision!r}: use float32 | tf32 | bf16")
    need(config.data.sampler in ("auto", "device", "host"), f"--config.data.sampler={config.data.sampler!r}: use auto | device | host")
    need(config.data.host_threads >= 1, f"--config.data.host_threads={config.data.host_threads}: must be >= 1")
    pre = config.pretrain
    need(pre.best_every > 0 and pre.checkpoint_every > 0 and pre.checkpoint_every % pre.best_every == 0,
         f"--config.pretrain.checkpoint_every={pre.checkpoint_every} must be a positive multiple of "
         f"--config.pretrain.best_every={pre.best_every}")
    need(config.model.size in SIZES or config.model.size == "custom",
         f"--config.model.size={config.model.size!r}: known sizes {sorted(SIZES)} or 'custom'")
    if config.checkpoint_required and not config.checkpoint:
        raise ConfigError(f"phase {config.phase} starts from a pretrained world model: set --config.checkpoint=FILE.pt "
                          "(the TD-MPC2 mt30_48M_4900000.pt or a phase-8 *_best.pt; see README 'Bring your own checkpoint')")
    parse_tasks(config.tasks)
    parse_seeds(config.seeds)
    behaviours(config)
    runs = len(parse_tasks(config.tasks)) * len(parse_seeds(config.seeds))
    if config.task_chunk < -1 or (config.task_chunk > 0 and runs % config.task_chunk):
        raise ConfigError(f"--config.task_chunk={config.task_chunk}: must be 0, -1 (auto) or divide the number of runs ({runs})")


def model_configs(config, num_tasks: int = len(MT30_TASKS)) -> tuple[WMConfig, ActorConfig, CriticConfig]:
    """WM / actor / critic configs of the config (sizes applied, behaviours resolved)."""
    c = config.copy_and_resolve_references()
    if not c.is_locked:
        apply_size(c)
    else:
        with c.unlocked():
            apply_size(c)
    m = c.model
    beh = behaviours(config)
    wm_cfg = WMConfig(kind=c.world_model, obs_dim=MAX_OBS_DIM, action_dim=MAX_ACTION_DIM, latent_dim=m.latent_dim,
                      task_dim=m.task_dim, num_tasks=num_tasks, encoder_units=tuple(m.encoder_units),
                      units=tuple(m.flow_units if c.world_model == "flow" else m.units), simnorm_dim=m.simnorm_dim,
                      num_bins=m.num_bins, vmin=m.vmin, vmax=m.vmax, velocity_head=beh["velocity_head"],
                      integrator=m.wm_integrator, substeps=m.wm_substeps, compute_dtype=compute_dtype(config))
    actor_cfg = ActorConfig(kind=c.actor, latent_dim=m.latent_dim, action_dim=MAX_ACTION_DIM, units=tuple(m.actor_units),
                            init_logstd=m.init_logstd, min_logstd=m.min_logstd, integrator=m.actor_integrator,
                            substeps=m.actor_substeps, compute_dtype=compute_dtype(config))
    critic_cfg = CriticConfig(latent_dim=m.latent_dim, units=tuple(m.critic_units), num_critics=m.num_critics,
                              compute_dtype=compute_dtype(config))
    return wm_cfg, actor_cfg, critic_cfg


def pwm_config(config, wm_cfg: WMConfig | None = None) -> pwm.PWMConfig:
    """The static algorithm config. wm_cfg overrides the config's WM (e.g. the one read from a checkpoint)."""
    w, a, cr = model_configs(config)
    if wm_cfg is not None:  # the checkpoint's architecture, this run's matmul precision
        w = dataclasses.replace(wm_cfg, compute_dtype=compute_dtype(config))
    beh = behaviours(config)
    alg = config.alg
    return pwm.PWMConfig(
        wm=w, actor=a, critic=cr, horizon=alg.horizon, gamma=alg.gamma, lam=alg.lam, actor_lr=alg.actor_lr,
        critic_lr=alg.critic_lr, model_lr=alg.model_lr, max_epochs=config.epochs, lr_schedule=alg.lr_schedule,
        actor_grad_clip=alg.actor_grad_clip, critic_grad_clip=alg.critic_grad_clip, wm_grad_clip=alg.wm_grad_clip,
        critic_iterations=alg.critic_iterations, critic_batches=alg.critic_batches, wm_iterations=alg.wm_iterations,
        ret_rms=alg.ret_rms, finetune_wm=config.finetune_wm, tau_sampling=alg.tau_sampling,
        teacher_forcing=alg.teacher_forcing, action_dims=tuple(ACTION_DIMS_BY_ID), remat=bool(config.remat),
        **{name: value for name, value in beh.items() if name in PWM_BEHAVIOUR_FIELDS})


# behaviours that live in the algorithm config (the rest act in the data sampler, evaluation or WM architecture)
PWM_BEHAVIOUR_FIELDS = frozenset(f.name for f in dataclasses.fields(pwm.PWMConfig))


def run_spec(config) -> RunSpec:
    return RunSpec(parse_tasks(config.tasks), parse_seeds(config.seeds))


def compute_dtype(config) -> str:
    """Model matmul operand dtype for --config.precision: bf16 -> 'bfloat16' (f32 params and accumulation)."""
    return "bfloat16" if config.precision == "bf16" else "float32"


def matmul_precision(config) -> str:
    """jax.default_matmul_precision value for --config.precision."""
    return {"float32": "highest", "tf32": "tensorfloat32", "bf16": "bfloat16"}[config.precision]


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def apply_xla_flags(config) -> str | None:
    """Put --config.deterministic's XLA flag into XLA_FLAGS; returns a warning when it comes too late to act.

    XLA reads XLA_FLAGS once, when jax starts its backends (the first jax.devices() or computation), so the main
    job calls this before anything touches a device; a library caller that already used jax gets the warning.
    """
    import os

    if not config.get("deterministic", False):
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_XLA_FLAG in flags.split():
        return None
    from jax._src import xla_bridge  # no public API tells whether the backends have started

    started = xla_bridge.backends_are_initialized()
    os.environ["XLA_FLAGS"] = (flags + " " + DETERMINISTIC_XLA_FLAG).strip()
    if started:
        return (f"--config.deterministic=True: jax had already started, so XLA will not read {DETERMINISTIC_XLA_FLAG} "
                f"in this process; set XLA_FLAGS={DETERMINISTIC_XLA_FLAG} before starting Python (the main job does it itself)")
    return None
