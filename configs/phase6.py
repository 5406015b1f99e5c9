"""Phase 6: epoch sweep from scratch (`--config=configs/phase6.py:baseline` or `:fullflow`, `--config.epochs=`
15000 | 50000 | 100000 | 150000). fullflow: flow WM Heun K=8, flow policy Heun K=4. Eval every 500."""
from configs.base import get_config as base_config


def get_config(variant: str = "baseline"):
    if variant not in ("baseline", "fullflow"):
        raise ValueError(f"phase6 variant {variant!r}: baseline | fullflow")
    c = base_config()
    c.phase = 6
    c.name = f"phase6_{variant}"
    c.finetune_wm = True
    c.epochs = 15_000
    c.eval.freq = 500
    c.seeds = "42,123,456"
    if variant == "fullflow":
        c.world_model = "flow"
        c.actor = "flow"
        c.model.wm_substeps = 8
        c.model.actor_substeps = 4
    return c
