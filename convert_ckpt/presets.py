"""Known model sizes, to name the preset a converted checkpoint matches (or say "custom").

TD-MPC2 presets: nicklashansen/tdmpc2 `tdmpc2/common/__init__.py` MODEL_SIZE (read from the source):

    size  enc_dim  mlp_dim  latent_dim  num_enc_layers  num_q
    1       256      384       128           2            2
    5       256      512       512           2            5 (default)
    19     1024     1024       768           3            5
    48     1792     1792       768           4            5
    317    4096     4096      1376           5            8

The encoder has num_enc_layers - 1 hidden layers of enc_dim (`max(num_enc_layers-1, 1) * [enc_dim]`);
dynamics, reward, _pi and each Q have 2 hidden layers of mlp_dim. The size is the TD-MPC2 agent total
(WM + _pi + num_q Qs), so the world model alone is smaller (48M: WM 18,983,909 params).

Flow-MBPO presets (spec section 1.7): the MLP WM configs are the TD-MPC2 sizes above (5M = TD-MPC2 5M,
48M = TD-MPC2 48M); the flow WM at 48M uses units [1788, 1788] for both _velocity and _reward
(parameter parity with the MLP WM), at 5M [510, 510] or [512, 512].
"""
from __future__ import annotations

TDMPC2_MODEL_SIZE = {
    1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2),
    5: dict(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2, num_q=5),
    19: dict(enc_dim=1024, mlp_dim=1024, latent_dim=768, num_enc_layers=3, num_q=5),
    48: dict(enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4, num_q=5),
    317: dict(enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8),
}

# Flow WM widths of Flow-MBPO's flow configs (latent/encoder as the TD-MPC2 size of the same name).
FLOW_UNITS = {5: ((510, 510), (512, 512)), 48: ((1788, 1788),)}

MT30 = dict(num_tasks=30, task_dim=64, obs_dim=24, action_dim=6)


def match_preset(cfg, num_q: int | None = None) -> dict:
    """Name the preset a WMConfig matches: {'name': 'tdmpc2-48M' | 'flow-mbpo-48M-flow' | 'custom', 'mt30': bool, 'why': str}."""
    enc = tuple(cfg.encoder_units)
    units = tuple(cfg.units)
    mt30 = all(getattr(cfg, k) == v for k, v in MT30.items())
    for size, p in TDMPC2_MODEL_SIZE.items():
        if cfg.latent_dim != p["latent_dim"] or enc != (p["enc_dim"],) * max(p["num_enc_layers"] - 1, 1) or cfg.num_bins != 101:
            continue
        if cfg.kind == "mlp" and units == (p["mlp_dim"],) * 2:
            if num_q is not None and num_q != p["num_q"]:
                return dict(name="custom", mt30=mt30,
                            why=f"world model matches TD-MPC2 {size}M but num_q={num_q} (preset {p['num_q']})")
            return dict(name=f"tdmpc2-{size}M", mt30=mt30, why=f"TD-MPC2 MODEL_SIZE[{size}]")
        if cfg.kind == "flow" and units in FLOW_UNITS.get(size, ()):
            return dict(name=f"flow-mbpo-{size}M-flow", mt30=mt30, why=f"Flow-MBPO {size}M flow WM (units {list(units)})")
    return dict(name="custom", mt30=mt30, why="no known preset has these widths")
