"""Phase 3: policies on the FROZEN pretrained PWM/TD-MPC2 MT30 world model (mt30_48M_4900000.pt).

`--config.actor=flow` for the flow-policy variant (Heun, K=2). Reference: 10,000 epochs, eval every 200,
seeds 42/123/456 (run matrix of spec/ALGORITHM.md section 7); default tasks: all 30.
    python -m fmbpo_jax.main --config=configs/phase3.py --config.checkpoint=mt30_48M_4900000.pt \
        --config.data.dataset_dir=/data/mt30_store
"""
from configs.base import get_config as base_config


def get_config(variant: str = "baseline"):
    c = base_config()
    c.phase = 3
    c.name = f"phase3_{variant}"
    c.checkpoint_required = True
    c.finetune_wm = False
    c.epochs = 10_000
    c.eval.freq = 200
    c.chunk_epochs = 100
    c.checkpoint_freq = 1000
    c.seeds = "42,123,456"
    c.actor = {"baseline": "gaussian", "flowpolicy": "flow"}[variant]
    c.model.actor_substeps = 2
    c.model.actor_integrator = "heun"
    return c
