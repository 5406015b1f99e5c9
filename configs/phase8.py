"""Phase 8: WM pretraining on all 30 tasks (`:mlp` or `:flow`; flow = Heun K=4, uniform tau), 200,000 iters,
batch 1024, constant lr 3e-4, seed 42. Writes wm_best/ and wm_last/ in the workdir (phase 9's checkpoints)."""
from configs.base import get_config as base_config


def get_config(variant: str = "mlp"):
    if variant not in ("mlp", "flow"):
        raise ValueError(f"phase8 variant {variant!r}: mlp | flow")
    c = base_config()
    c.phase = 8
    c.name = f"phase8_{variant}_wm"
    c.mode = "pretrain_wm"
    c.world_model = variant
    c.model.wm_substeps = 4
    c.pretrain.iters = 200_000
    c.pretrain.batch_size = 1024
    c.pretrain.seed = 42
    c.seeds = "42"
    return c
