"""Phase 5: flow tuning (joint from scratch, 15,000 epochs, walker-stand + cheetah-run).

Variants (`--config=configs/phase5.py:VARIANT`): high_precision_wm (WM K=8, policy K=2),
high_precision_policy (WM K=4, policy K=4), euler_fast (Euler, WM K=4, policy K=2).
"""
from configs.base import get_config as base_config

VARIANTS = {
    "high_precision_wm": dict(wm_substeps=8, actor_substeps=2, integrator="heun"),
    "high_precision_policy": dict(wm_substeps=4, actor_substeps=4, integrator="heun"),
    "euler_fast": dict(wm_substeps=4, actor_substeps=2, integrator="euler"),
}


def get_config(variant: str = "high_precision_wm"):
    if variant not in VARIANTS:
        raise ValueError(f"phase5 variant {variant!r}: known {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    c = base_config()
    c.phase = 5
    c.name = f"phase5_{variant}"
    c.tasks = "walker-stand,cheetah-run"
    c.finetune_wm = True
    c.world_model = "flow"
    c.actor = "flow"
    c.model.wm_substeps = v["wm_substeps"]
    c.model.actor_substeps = v["actor_substeps"]
    c.model.wm_integrator = v["integrator"]
    c.model.actor_integrator = v["integrator"]
    c.epochs = 15_000
    c.eval.freq = 200
    c.seeds = "42,123,456"
    return c
