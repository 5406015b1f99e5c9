"""Errors of convert_ckpt. Every one carries a message meant for the person running the converter."""
from __future__ import annotations

from convert_ckpt.torch_mapping import StateDictError

# Re-exported so callers can catch everything from one place.
from convert_ckpt.safe_load import SafeLoadError, UnsafePickleError

__all__ = [
    "ConvertError",
    "CheckpointFormatError",
    "ConfigMismatchError",
    "StateDictError",
    "SafeLoadError",
    "UnsafePickleError",
    "KNOWN_LAYOUTS",
]

KNOWN_LAYOUTS = """known checkpoint layouts:
  tdmpc2-old  {'model': state_dict}: _task_emb.weight, _encoder.state.<i>.*, _dynamics.*, _reward.*, _pi.*,
              _Qs.params.<n>, _target_Qs.params.<n> (functorch stacks; TD-MPC2 b67b21c, released MT30 checkpoints)
  tdmpc2-new  {'model': state_dict}: the same world-model keys plus _Qs.params.<layer>.<weight|bias|ln.weight|ln.bias>,
              _detach_Qs_params.*, _target_Qs_params.*, buffers _action_masks, log_std_min, log_std_dif
  native      {'world_model': state_dict, ['actor': ..., 'critic': ...], metadata}: Flow-MBPO/PWM PWM.save()
              (actor, critic, world_model, obs_rms/rew_rms/ret_rms, *_opt, iter_count, ...) or
              pretrain_multitask_wm.py (world_model, world_model_opt, iter, obs_dim, act_dim, horizon, task_set, cfg);
              world_model is the MLP WorldModel (_dynamics.*) or the FlowWorldModel (_velocity.*)"""


class ConvertError(Exception):
    """Base class of the converter's own errors."""


class CheckpointFormatError(ConvertError, ValueError):
    """The file's top level / key layout matches none of the known layouts."""

    def __init__(self, msg: str, *, with_layouts: bool = True):
        super().__init__(f"{msg}\n{KNOWN_LAYOUTS}" if with_layouts else msg)


class ConfigMismatchError(ConvertError, ValueError):
    """A given configuration disagrees with the checkpoint (names the field, expected vs found)."""

    def __init__(self, module: str, field: str, expected, found, hint: str = ""):
        self.module, self.field, self.expected, self.found = module, field, expected, found
        msg = f"{module}: config field '{field}' disagrees with the checkpoint: expected {expected!r} (given), found {found!r} (checkpoint)"
        super().__init__(msg + (f"; {hint}" if hint else ""))
