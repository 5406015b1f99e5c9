"""Phase 9: the 2x2 factorial (WM type x policy type) on FROZEN phase-8 world models, 50,000 epochs.

`--config=configs/phase9.py:cond0..cond3`: cond0 MLP WM + Gaussian; cond1 MLP WM + flow policy;
cond2 flow WM + Gaussian; cond3 flow WM + flow policy. `--config.checkpoint=runs/phase8_{mlp|flow}_wm/wm_best`.
"""
from configs.base import get_config as base_config

CONDITIONS = {"cond0": ("mlp", "gaussian"), "cond1": ("mlp", "flow"), "cond2": ("flow", "gaussian"), "cond3": ("flow", "flow")}


def get_config(cond: str = "cond0"):
    if cond not in CONDITIONS:
        raise ValueError(f"phase9 condition {cond!r}: known {sorted(CONDITIONS)}")
    c = base_config()
    c.phase = 9
    c.name = f"phase9_{cond}"
    c.world_model, c.actor = CONDITIONS[cond]
    c.checkpoint_required = True
    c.finetune_wm = False
    c.epochs = 50_000
    c.eval.freq = 200
    c.seeds = "42,123,456"
    return c
