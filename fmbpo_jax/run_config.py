"""From an ml_collections config to a `RunPlan`: the static pieces of a run (model/algorithm configs, tasks, seeds,
cadences, data, evaluation), resolved once. Nothing after the plan reads the config.

Validation happens here, before anything compiles: every error is one line naming the --config flag (exit code 2
in the main job). `validate` checks what the config alone decides; `RunPlan.check_devices` / `check_sampler` what
needs the device count or the resolved data mode.
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Mapping

from jax._src import xla_bridge  # no public API tells whether the backends have started

from configs.base import SIZES, apply_size
from fmbpo_jax import presets, pwm
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
from fmbpo_jax.envs.planner import MPPIConfig
from fmbpo_jax.envs.tasks import ACTION_DIMS_BY_ID, MAX_ACTION_DIM, MAX_OBS_DIM, MT30_TASKS
from fmbpo_jax.nets import REMAT_POLICIES, remat_policy
from fmbpo_jax.world_model import WMConfig


MODES = ("policy", "pretrain_wm", "demo", "online")


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


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _validate_model(config) -> None:
    """What to train: mode, epochs, model and algorithm fields."""
    _need(config.mode in MODES, f"--config.mode={config.mode!r}: use {' | '.join(MODES)}")
    _need(config.epochs > 0, f"--config.epochs={config.epochs}: must be > 0")
    _need(config.alg.horizon >= 1, f"--config.alg.horizon={config.alg.horizon}: must be >= 1")
    _need(config.model.wm_substeps >= 1, f"--config.model.wm_substeps={config.model.wm_substeps}: K must be >= 1")
    _need(config.model.actor_substeps >= 1, f"--config.model.actor_substeps={config.model.actor_substeps}: K must be >= 1")
    _need(config.world_model in ("mlp", "flow"), f"--config.world_model={config.world_model!r}: use mlp | flow")
    _need(config.actor in ("gaussian", "flow"), f"--config.actor={config.actor!r}: use gaussian | flow")
    rows = config.alg.batch_size * config.alg.horizon
    _need(config.alg.batch_size > 0, f"--config.alg.batch_size={config.alg.batch_size}: must be > 0")
    _need(config.alg.critic_batches > 0 and rows % config.alg.critic_batches == 0,
          f"--config.alg.critic_batches={config.alg.critic_batches}: must divide batch_size*horizon={rows}")


def _validate_mechanics(config) -> None:
    """How to run it: cadences, diagnostics, precision, data, pretraining, parallelism."""
    _need(config.chunk_epochs > 0, f"--config.chunk_epochs={config.chunk_epochs}: must be > 0")
    _need(config.log_freq > 0, f"--config.log_freq={config.log_freq}: must be > 0")
    _need(config.eval.freq > 0, f"--config.eval.freq={config.eval.freq}: must be > 0")
    d = config.diagnostics
    _need(d.freq >= 0 and d.freq % config.chunk_epochs == 0,
          f"--config.diagnostics.freq={d.freq}: must be 0 (off) or a multiple of --config.chunk_epochs={config.chunk_epochs}")
    _need(d.freq == 0 or (d.num_groups >= 2 and config.alg.batch_size % d.num_groups == 0),
          f"--config.diagnostics.num_groups={d.num_groups}: must be >= 2 and divide --config.alg.batch_size={config.alg.batch_size}")
    _need(config.precision in ("float32", "tf32", "bf16"), f"--config.precision={config.precision!r}: use float32 | tf32 | bf16")
    policy = config.get("remat_policy", "")
    _need(policy in ("",) + REMAT_POLICIES,
          f"--config.remat_policy={policy!r}: use {' | '.join(REMAT_POLICIES)} (or '' to follow --config.remat)")
    _need(not (config.remat and policy == "all"),
          "--config.remat=True contradicts --config.remat_policy='all' (keep everything): drop one of them")
    _need(config.data.sampler in ("auto", "device", "host"), f"--config.data.sampler={config.data.sampler!r}: use auto | device | host")
    _need(config.data.host_threads >= 1, f"--config.data.host_threads={config.data.host_threads}: must be >= 1")
    pre = config.pretrain
    _need(pre.best_every > 0 and pre.checkpoint_every > 0 and pre.checkpoint_every % pre.best_every == 0,
          f"--config.pretrain.checkpoint_every={pre.checkpoint_every} must be a positive multiple of "
          f"--config.pretrain.best_every={pre.best_every}")
    _need(config.model.size in SIZES or config.model.size == "custom",
          f"--config.model.size={config.model.size!r}: known sizes {sorted(SIZES)} or 'custom'")
    if config.checkpoint_required and not config.checkpoint:
        raise ConfigError(f"phase {config.phase} starts from a pretrained world model: set --config.checkpoint=FILE.pt "
                          "(the TD-MPC2 mt30_48M_4900000.pt or a phase-8 *_best.pt; see README 'Bring your own checkpoint')")


def _validate_runs(config) -> None:
    """The run axis: tasks, seeds, preset, how the runs are grouped and split over devices."""
    parse_tasks(config.tasks)
    parse_seeds(config.seeds)
    behaviours(config)
    runs = len(parse_tasks(config.tasks)) * len(parse_seeds(config.seeds))
    if config.task_chunk < -1 or (config.task_chunk > 0 and runs % config.task_chunk):
        raise ConfigError(f"--config.task_chunk={config.task_chunk}: must be 0, -1 (auto) or divide the number of runs ({runs})")
    if config.mode in ("policy", "demo") and (config.eval.freq % config.chunk_epochs or config.checkpoint_freq % config.chunk_epochs):
        raise ConfigError(f"--config.eval.freq={config.eval.freq} and --config.checkpoint_freq={config.checkpoint_freq} "
                          f"must be multiples of --config.chunk_epochs={config.chunk_epochs}")
    data_parallel = _data_parallel(config)
    _need(data_parallel >= 1, f"--config.data_parallel={data_parallel} must be >= 1")
    if data_parallel > 1 and config.task_chunk:
        # lax.map's inner vmap has no spmd_axis_name: the batch constraint would replicate the run axis over 'task'
        raise ConfigError(f"--config.data_parallel={data_parallel} needs --config.task_chunk=0 (got {config.task_chunk})")


def _validate_online(config) -> None:
    """Mode 'online': env steps, seeding, update rate, and the cadences that count env steps (whole episodes)."""
    o = config.online
    L = o.episode_length
    _need(L > config.alg.horizon, f"--config.online.episode_length={L}: must be > --config.alg.horizon={config.alg.horizon}")
    _need(o.env_steps > 0 and o.env_steps % L == 0,
          f"--config.online.env_steps={o.env_steps}: must be a positive multiple of --config.online.episode_length={L}")
    _need(L <= o.seed_steps < o.env_steps and o.seed_steps % L == 0,
          f"--config.online.seed_steps={o.seed_steps}: must be a multiple of --config.online.episode_length={L}, at "
          f"least one episode and below --config.online.env_steps={o.env_steps}")
    _need(o.update_every > 0 and L % o.update_every == 0,
          f"--config.online.update_every={o.update_every}: must divide --config.online.episode_length={L}")
    per_call = o.utd * o.update_every
    _need(o.utd > 0 and per_call >= 1 and abs(per_call - round(per_call)) < 1e-9,
          f"--config.online.utd={o.utd}: utd * --config.online.update_every={o.update_every} must be a whole number >= 1")
    _need(o.action_noise >= 0, f"--config.online.action_noise={o.action_noise}: must be >= 0")
    _need(o.env_workers >= -1, f"--config.online.env_workers={o.env_workers}: -1 (in process), 0 (auto) or a count")
    for flag, v in (("eval.freq", config.eval.freq), ("checkpoint_freq", config.checkpoint_freq),
                    ("log_freq", config.log_freq)):
        _need(v > 0 and v % L == 0, f"--config.{flag}={v}: in online mode a positive multiple of "
                                    f"--config.online.episode_length={L} (env steps)")
    _need(config.diagnostics.freq % L == 0, f"--config.diagnostics.freq={config.diagnostics.freq}: in online mode 0 "
                                           f"or a multiple of --config.online.episode_length={L} (env steps)")
    _need(config.finetune_wm, "--config.finetune_wm=False: online mode trains the world model on its buffer (set True)")
    _need(_data_parallel(config) == 1 and config.task_chunk >= 0,
          "online mode runs on one device: --config.data_parallel must be 1 and --config.task_chunk >= 0")


def validate(config) -> None:
    """One-line errors naming the flag, before anything compiles (every check that needs only the config)."""
    _validate_model(config)
    _validate_mechanics(config)
    _validate_runs(config)
    if config.mode == "online":
        _validate_online(config)


def _data_parallel(config) -> int:
    return int(config.get("data_parallel", 1) or 1)


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
        teacher_forcing=alg.teacher_forcing, action_dims=tuple(ACTION_DIMS_BY_ID), remat=remat_setting(config),
        **{name: value for name, value in beh.items() if name in PWM_BEHAVIOUR_FIELDS})


def remat_setting(config) -> str:
    """The rollout scans' remat policy: --config.remat_policy, or --config.remat's False / True as 'all' / 'step'."""
    return config.get("remat_policy", "") or remat_policy(bool(config.remat))


# behaviours that live in the algorithm config (the rest act in the data sampler, evaluation or WM architecture)
PWM_BEHAVIOUR_FIELDS = frozenset(f.name for f in dataclasses.fields(pwm.PWMConfig))


def run_spec(config) -> RunSpec:
    return RunSpec(parse_tasks(config.tasks), parse_seeds(config.seeds))


def compute_dtype(config) -> str:
    """Model matmul operand dtype for --config.precision: bf16 -> 'bfloat16' (f32 params and accumulation)."""
    return "bfloat16" if config.precision == "bf16" else "float32"


# jax.default_matmul_precision value for each --config.precision
MATMUL_PRECISION = {"float32": "highest", "tf32": "tensorfloat32", "bf16": "bfloat16"}


def matmul_precision(config) -> str:
    """jax.default_matmul_precision value for --config.precision."""
    return MATMUL_PRECISION[config.precision]


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def apply_xla_flags(config) -> str | None:
    """Put --config.deterministic's XLA flag into XLA_FLAGS; returns a warning when it comes too late to act."""
    return set_deterministic_xla(bool(config.get("deterministic", False)))


def set_deterministic_xla(deterministic: bool) -> str | None:
    """XLA_FLAGS gets the deterministic-ops flag when `deterministic`; returns a warning when it comes too late to act.

    XLA reads XLA_FLAGS once, when jax starts its backends (the first jax.devices() or computation), so the main
    job calls this before anything touches a device; a library caller that already used jax gets the warning.
    """
    if not deterministic:
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_XLA_FLAG in flags.split():
        return None
    started = xla_bridge.backends_are_initialized()
    os.environ["XLA_FLAGS"] = (flags + " " + DETERMINISTIC_XLA_FLAG).strip()
    if started:
        return (f"--config.deterministic=True: jax had already started, so XLA will not read {DETERMINISTIC_XLA_FLAG} "
                f"in this process; set XLA_FLAGS={DETERMINISTIC_XLA_FLAG} before starting Python (the main job does it itself)")
    return None


# ============================================================================================ the plan


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop does what, in epochs: one jitted call trains `chunk_epochs`; the rest happens between calls."""

    chunk_epochs: int
    log_freq: int  # one metrics row per run every log_freq epochs
    eval_freq: int  # a multiple of chunk_epochs (also at epoch 0, like the reference)
    checkpoint_freq: int  # a multiple of chunk_epochs (also at the end and on SIGTERM)
    diagnostics_freq: int  # 0 = off

    def should_eval(self, epoch: int) -> bool:
        return epoch % self.eval_freq == 0

    def should_save(self, epoch: int) -> bool:
        return epoch % self.checkpoint_freq == 0

    def should_diagnose(self, epoch: int) -> bool:
        return self.diagnostics_freq > 0 and epoch % self.diagnostics_freq == 0


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """--config.data.*: where the per-task store is and how batches reach the program."""

    dataset_dir: str
    sampler: str  # 'auto' | 'device' | 'host'
    device_budget_gb: float
    host_threads: int


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """--config.eval.*: periodic and final evaluation in the simulator (the frequency is in Cadence)."""

    episodes: int  # 0 = no evaluation
    max_steps: int
    workers: int  # env worker processes; 0 = automatic
    background: bool
    seed: int
    final: bool
    planning: str  # 'mppi' (the planning evaluation) | 'plain' (B8: a second plain evaluation)
    mppi: MPPIConfig | None  # with planning == 'mppi'
    task_chunk: int  # task rows planned at once (0 = all): --config.task_chunk, -1 (auto) meaning 0


@dataclasses.dataclass(frozen=True)
class DiagnosticsPlan:
    """--config.diagnostics.* (the frequency is in Cadence)."""

    num_groups: int
    num_probes: int
    jac_samples: int


@dataclasses.dataclass(frozen=True)
class PretrainPlan:
    """--config.pretrain.*: phase-8 WM pretraining."""

    iters: int
    batch_size: int
    best_every: int
    checkpoint_every: int
    seed: int


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """--config.demo.*: the demo's data collection and its joint variant's WM learning rate."""

    episodes_per_task: int
    episode_length: int
    exploration: str
    ou_theta: float
    ou_sigma: float
    joint_model_lr: float


@dataclasses.dataclass(frozen=True)
class OnlinePlan:
    """--config.online.* and the cadences of mode 'online', in env (agent) steps per run; chunks are whole episodes."""

    env_steps: int
    episode_length: int
    seed_steps: int  # OU random actions, no updates
    updates_per_call: int  # utd * update_every
    update_every: int  # env steps between update calls
    action_noise: float
    ou_theta: float
    ou_sigma: float
    env_workers: int  # -1: in this process, 0: automatic
    eval_freq: int
    checkpoint_freq: int
    log_freq: int
    diagnostics_freq: int  # 0 = off

    @property
    def episodes(self) -> int:
        return self.env_steps // self.episode_length

    @property
    def seed_episodes(self) -> int:
        return self.seed_steps // self.episode_length

    def updates_at(self, env_steps: int) -> int:
        """Updates done after `env_steps` env steps: none while seeding, then updates_per_call per update_every steps."""
        return max(0, env_steps - self.seed_steps) // self.update_every * self.updates_per_call

    @property
    def total_updates(self) -> int:
        return self.updates_at(self.env_steps)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, resolved and validated once (`RunPlan.from_config`); nothing after it reads the config.

    The loop, data, evaluation and pretraining read their fields from here; `pwm` is the static algorithm config
    (`with_world_model` puts a pretrained WM's architecture into it).
    """

    name: str
    mode: str  # 'policy' | 'pretrain_wm' | 'demo' | 'online'
    spec: RunSpec
    pwm: pwm.PWMConfig
    behaviours: Mapping[str, Any] = dataclasses.field(hash=False)  # preset values with the --config.behaviour.* overrides
    epochs: int
    batch_size: int
    wm_batch_size: int
    precision: str  # --config.precision: 'float32' | 'tf32' | 'bf16'
    cadence: Cadence
    data: DataPlan
    eval: EvalPlan
    diagnostics: DiagnosticsPlan
    pretrain: PretrainPlan
    demo: DemoPlan
    online: OnlinePlan | None  # mode 'online' only
    checkpoint: str  # pretrained WM: a bundle directory or a file a reader understands ('' = none)
    task_chunk: int  # runs trained at once (0 = all, -1 = auto: the largest group that fits the memory budget)
    task_chunk_memory_gb: float  # task_chunk=-1's budget (0 = 90% of the device's)
    data_parallel: int  # devices per run group that split each run's batch (mesh 'data' axis)
    max_nan_skips: int
    deterministic: bool
    wandb_project: str
    wandb_entity: str
    config_json: str = dataclasses.field(compare=False)  # the resolved config, written to the workdir as config.json

    @classmethod
    def from_config(cls, config) -> "RunPlan":
        """Validate an ml_collections config (ConfigError naming the flag) and resolve it."""
        validate(config)
        beh = behaviours(config)
        online = _online_plan(config) if config.mode == "online" else None
        epochs = online.total_updates if online else int(config.epochs)  # online: the LR schedule's length in updates
        return cls(
            name=config.name, mode=config.mode, spec=run_spec(config),
            pwm=dataclasses.replace(pwm_config(config), max_epochs=epochs),
            behaviours=types.MappingProxyType(dict(beh)), epochs=epochs, batch_size=int(config.alg.batch_size),
            wm_batch_size=int(config.alg.wm_batch_size), precision=config.precision, cadence=_cadence(config),
            data=DataPlan(dataset_dir=config.data.dataset_dir, sampler=config.data.sampler,
                          device_budget_gb=float(config.data.device_budget_gb), host_threads=int(config.data.host_threads)),
            eval=_eval_plan(config, beh), diagnostics=DiagnosticsPlan(
                num_groups=int(config.diagnostics.num_groups), num_probes=int(config.diagnostics.num_probes),
                jac_samples=int(config.diagnostics.jac_samples)),
            pretrain=_pretrain_plan(config.pretrain), demo=_demo_plan(config.demo), online=online,
            checkpoint=config.checkpoint,
            task_chunk=int(config.task_chunk), task_chunk_memory_gb=float(config.get("task_chunk_memory_gb", 0.0) or 0.0),
            data_parallel=_data_parallel(config), max_nan_skips=int(config.max_nan_skips),
            deterministic=bool(config.get("deterministic", False)), wandb_project=config.wandb.project,
            wandb_entity=config.wandb.entity, config_json=config.to_json_best_effort(indent=2))

    @property
    def matmul_precision(self) -> str:
        """jax.default_matmul_precision value for --config.precision."""
        return MATMUL_PRECISION[self.precision]

    def with_world_model(self, ck_cfg: WMConfig, path: str) -> "RunPlan":
        """This plan with a pretrained WM's architecture (read from `path`).

        Facts the checkpoint's shapes cannot tell (integrator, substeps, bins range, SimNorm group) and the matmul
        dtype stay this run's; a WM kind or task count that disagrees is an error.
        """
        mine = self.pwm.wm
        if ck_cfg.kind != mine.kind:
            raise ConfigError(f"--config.world_model={mine.kind!r} but {path} holds a {ck_cfg.kind!r} world model")
        if ck_cfg.num_tasks != mine.num_tasks:
            raise ConfigError(f"{path}: the checkpoint has {ck_cfg.num_tasks} tasks, the config expects {mine.num_tasks} (MT30)")
        w = dataclasses.replace(ck_cfg, integrator=mine.integrator, substeps=mine.substeps, vmin=mine.vmin, vmax=mine.vmax,
                                simnorm_dim=mine.simnorm_dim, compute_dtype=mine.compute_dtype)
        return dataclasses.replace(self, pwm=dataclasses.replace(self.pwm, wm=w))

    def check_devices(self, device_count: int) -> None:
        """The checks that need the device count (known once jax has started)."""
        if device_count % self.data_parallel:
            raise ConfigError(f"--config.data_parallel={self.data_parallel} must divide the device count {device_count}")

    def check_sampler(self, mode: str) -> None:
        """The checks that need the resolved data mode ('device' or 'host', see training.feed.open_data)."""
        if mode == "device":
            return
        if self.task_chunk == -1:
            raise ConfigError("--config.task_chunk=-1 (auto) measures the compiled step on device-resident data; this run "
                              f"samples on the host (--config.data.sampler={self.data.sampler!r}, or a dataset too large "
                              "for the device): set --config.task_chunk explicitly")
        if self.cadence.diagnostics_freq:
            raise ConfigError("--config.diagnostics.freq needs --config.data.sampler=device (in-program sampling)")


def _cadence(config) -> Cadence:
    return Cadence(chunk_epochs=int(config.chunk_epochs), log_freq=int(config.log_freq), eval_freq=int(config.eval.freq),
                   checkpoint_freq=int(config.checkpoint_freq), diagnostics_freq=int(config.diagnostics.freq))


def _eval_plan(config, beh: dict) -> EvalPlan:
    e = config.eval
    mppi = None
    if beh["planning_eval"] == "mppi":
        try:
            mppi = MPPIConfig.from_config(e)
        except ValueError as exc:
            raise ConfigError(f"--config.eval.mppi_*: {exc}") from None
    # -1 (auto, sized for the training step) plans every task row at once: planning holds no optimizer state or
    # activations for a backward pass, so it is far below the training step's memory
    return EvalPlan(episodes=int(e.episodes), max_steps=int(e.max_steps), workers=int(e.workers),
                    background=bool(e.background), seed=int(e.seed), final=bool(e.final), planning=beh["planning_eval"],
                    mppi=mppi, task_chunk=max(0, int(config.task_chunk)))


def _pretrain_plan(p) -> PretrainPlan:
    return PretrainPlan(iters=int(p.iters), batch_size=int(p.batch_size), best_every=int(p.best_every),
                        checkpoint_every=int(p.checkpoint_every), seed=int(p.seed))


def _demo_plan(d) -> DemoPlan:
    return DemoPlan(episodes_per_task=int(d.episodes_per_task), episode_length=int(d.episode_length),
                    exploration=d.exploration, ou_theta=float(d.ou_theta), ou_sigma=float(d.ou_sigma),
                    joint_model_lr=float(d.joint_model_lr))


def _online_plan(config) -> OnlinePlan:
    o = config.online
    return OnlinePlan(env_steps=int(o.env_steps), episode_length=int(o.episode_length), seed_steps=int(o.seed_steps),
                      updates_per_call=int(round(o.utd * o.update_every)), update_every=int(o.update_every),
                      action_noise=float(o.action_noise), ou_theta=float(o.ou_theta), ou_sigma=float(o.ou_sigma),
                      env_workers=int(o.env_workers), eval_freq=int(config.eval.freq),
                      checkpoint_freq=int(config.checkpoint_freq), log_freq=int(config.log_freq),
                      diagnostics_freq=int(config.diagnostics.freq))


def as_plan(config_or_plan) -> RunPlan:
    """A RunPlan as it is, or one resolved from an ml_collections config (the entry points accept both)."""
    return config_or_plan if isinstance(config_or_plan, RunPlan) else RunPlan.from_config(config_or_plan)
