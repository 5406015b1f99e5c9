"""Phase 4: joint training from scratch, flow WM (Heun K=4) + flow policy (Heun K=2), 10,000 epochs."""
from configs.base import get_config as base_config


def get_config():
    c = base_config()
    c.phase = 4
    c.name = "phase4_fullflow"
    c.finetune_wm = True
    c.world_model = "flow"
    c.actor = "flow"
    c.model.wm_substeps = 4
    c.model.actor_substeps = 2
    c.epochs = 10_000
    c.eval.freq = 200
    c.seeds = "42,123,456"
    return c
