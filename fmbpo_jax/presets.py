"""Behaviour presets: one switch per reference bug (docs/differences.md describes each one).

`reference` reproduces the PyTorch original exactly, bugs included; `fixed` (the default) repairs what is
broken. Every field can be overridden on its own; the README's "Differences from the reference" table
lists them.
"""
from __future__ import annotations

# field: (reference value, fixed value, bug id, what it changes)
BEHAVIOURS: dict[str, tuple[object, object, str, str]] = {
    "reward_loss": ("mse_bins", "two_hot_ce", "B1", "WM reward loss: MSE of every logit to the raw reward vs soft CE on two-hot(symlog r)"),
    "reward_symexp": (False, True, "B1", "actor reads rewards as softmax expectation without vs with symexp"),
    "velocity_head": ("simnorm", "linear", "B3", "flow velocity head: NormedLinear+SimNorm vs linear head with SimNorm on the integrated latent"),
    "action_masks": (False, True, "B4", "task action masks on actor actions (and planner samples)"),
    "train_task_emb": (False, True, "B5", "task embedding excluded from vs trained with the WM optimizer"),
    "critic_target": ("one_step", "td_lambda", "B6", "critic targets: dones=1 everywhere (1-step TD) vs TD(lambda) over the imagined horizon"),
    "terminal_discount": ("gamma_h_plus_1", "gamma_h", "B7", "terminal value discounted by gamma^(H+1) vs gamma^H"),
    "wm_updates": ("policy_batch", "iterations", "B9", "one WM step on the policy batch vs wm_iterations steps on wm_batch_size batches"),
    "episode_subsampling": ("reference", "all", "B10", "episodes subsampled with replacement vs all episodes once"),
    "planning_eval": ("plain", "mppi", "B8", "'planning' evaluation: a second plain evaluation vs MPPI with the WM and policy prior"),
    "critic_minibatches": ("contiguous", "shuffled", "B16", "critic minibatches contiguous in time vs shuffled rows"),
    "logstd_clamp": ("forward", "stored", "B21", "actor log-std clamped to its minimum only before each forward (the stored value and the Gaussian actor_stddev can sit below it) vs kept at or above it"),
    "wm_emb_grad": ("accumulate", "fresh", "B22", "the untrained task embedding's gradient is never zeroed (it sums every update's WM- and actor-loss gradients into the WM clip norm) vs a fresh gradient per WM step"),
}

PRESETS = ("reference", "fixed")


def preset_values(preset: str) -> dict[str, object]:
    """All behaviour fields for a preset name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    col = 0 if preset == "reference" else 1
    return {name: spec[col] for name, spec in BEHAVIOURS.items()}
