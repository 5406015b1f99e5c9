"""What the bench can time: the variants, precisions, the reference's recorded speeds and the config of a row."""
from __future__ import annotations

import importlib.util
import os

from configs.base import SIZES, get_config

VARIANTS: dict[str, dict] = {
    # name: config fields (world_model, actor, finetune_wm, substeps) ; mode 'pretrain' = phase-8 WM pretraining
    "baseline-frozen": dict(world_model="mlp", actor="gaussian", finetune_wm=False),
    "flowpolicy-frozen": dict(world_model="mlp", actor="flow", finetune_wm=False, actor_substeps=2),
    "baseline-finetune": dict(world_model="mlp", actor="gaussian", finetune_wm=True),
    "fullflow-finetune-k4k2": dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=4, actor_substeps=2),
    "fullflow-finetune-k8k4": dict(world_model="flow", actor="flow", finetune_wm=True, wm_substeps=8, actor_substeps=4),
    "wm-pretrain": dict(mode="pretrain", world_model="mlp"),
    "wm-pretrain-flow": dict(mode="pretrain", world_model="flow", wm_substeps=4),
}
MAIN_VARIANTS = ("baseline-frozen", "flowpolicy-frozen", "baseline-finetune", "fullflow-finetune-k4k2")

PRECISIONS = {"fp32-highest": "highest", "tf32": "tensorfloat32", "bf16": "bfloat16"}  # -> jax matmul precision
CONFIG_PRECISION = {"fp32-highest": "float32", "tf32": "tf32", "bf16": "bf16"}  # -> --config.precision

# Reference seconds per epoch for ONE task, batch 512, H 16, reference per-epoch work.
REF_CPU_S_EPOCH = {  # 2-core CPU of this kind, torch 2.13 MKL, 2 threads, median s/epoch
    ("5M", "baseline-frozen"): 3.4, ("5M", "flowpolicy-frozen"): 3.8, ("5M", "baseline-finetune"): 4.0,
    ("5M", "fullflow-finetune-k4k2"): 8.6,
    ("48M", "baseline-frozen"): 6.5, ("48M", "flowpolicy-frozen"): 7.0, ("48M", "baseline-finetune"): 10.9,
    ("48M", "fullflow-finetune-k4k2"): 38.0,
}
REF_GPU_S_TASK_EPOCH = {  # H100/H200, 48M, recorded wall-clock incl. data + evaluation
    "baseline-frozen": 0.09, "flowpolicy-frozen": 0.09, "baseline-finetune": 0.18,
    "fullflow-finetune-k4k2": 0.47, "fullflow-finetune-k8k4": 0.75,
}


def is_pretrain(variant: str) -> bool:
    return VARIANTS[variant].get("mode") == "pretrain"


def _base_config(size: str):
    """configs.base with a named size, or get_config() of a config file."""
    if size in SIZES:
        c = get_config()
        c.model.size = size
        return c
    if os.path.isfile(size):
        spec = importlib.util.spec_from_file_location("bench_config", size)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.get_config()
    raise SystemExit(f"--size {size!r}: one of {', '.join(SIZES)} or a config file with get_config()")


def build_config(size: str, variant: str, preset: str = "reference", wm_updates: str | None = None,
                 batch_size: int | None = None, horizon: int | None = None, critic_iterations: int | None = None):
    """The ml_collections config of a row: base config (or a config file) + size + variant fields."""
    if variant not in VARIANTS:
        raise SystemExit(f"--variant {variant!r}: known {', '.join(VARIANTS)}")
    c = _base_config(size)
    v = VARIANTS[variant]
    c.world_model = v["world_model"]
    if "actor" in v:
        c.actor = v["actor"]
    c.finetune_wm = bool(v.get("finetune_wm", False))
    if "wm_substeps" in v:
        c.model.wm_substeps = v["wm_substeps"]
    if "actor_substeps" in v:
        c.model.actor_substeps = v["actor_substeps"]
    c.preset = preset
    if wm_updates:
        c.behaviour.wm_updates = wm_updates
    if batch_size:
        c.alg.batch_size = batch_size
        c.pretrain.batch_size = batch_size * 2
    if horizon:
        c.alg.horizon = horizon
    if critic_iterations:
        c.alg.critic_iterations = critic_iterations
    c.checkpoint_required = False
    return c


def reference_speed(row: dict, backend: str, standard: bool, runs: int) -> dict:
    """The reference's recorded speed for a timed row: {'ref_s_epoch', 'ref_kind', 'speedup_vs_ref'}, or {}.

    standard: the row does the reference's per-epoch work (batch 512, H 16, reference preset, 8 critic iterations).
    CPU: the reference timed on this CPU class (1 task); GPU: its recorded seconds per task-epoch at 48M.
    """
    if not standard:
        return {}
    key = (row["size"], row["variant"])
    if backend == "cpu" and key in REF_CPU_S_EPOCH and runs == 1:
        ref = REF_CPU_S_EPOCH[key]
        return {"ref_s_epoch": ref, "ref_kind": "reference on this CPU class (torch MKL, 2 threads): s/epoch, 1 task",
                "speedup_vs_ref": ref / row["median_s_epoch"]}
    if backend == "gpu" and row["size"] == "48M" and row["variant"] in REF_GPU_S_TASK_EPOCH:
        ref = REF_GPU_S_TASK_EPOCH[row["variant"]]
        return {"ref_s_epoch": ref, "ref_kind": "reference H100/H200 recorded s per task-epoch (wall clock incl. data + eval)",
                "speedup_vs_ref": ref / row["s_per_task_epoch"]}
    return {}
