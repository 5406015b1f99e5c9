"""Phase 7: fine-tune the pretrained PWM/TD-MPC2 WM with the policy (15,000 epochs, eval every 500).

Variants: baseline (Gaussian), flow_std (flow policy K=2), flow_high (flow policy K=4).
"""
from configs.base import get_config as base_config


def get_config(variant: str = "baseline"):
    pol = {"baseline": ("gaussian", 2), "flow_std": ("flow", 2), "flow_high": ("flow", 4)}
    if variant not in pol:
        raise ValueError(f"phase7 variant {variant!r}: known {sorted(pol)}")
    c = base_config()
    c.phase = 7
    c.name = f"phase7_{variant}"
    c.checkpoint_required = True
    c.finetune_wm = True
    c.actor, c.model.actor_substeps = pol[variant]
    c.epochs = 15_000
    c.eval.freq = 500
    c.seeds = "42,123,456"
    return c
