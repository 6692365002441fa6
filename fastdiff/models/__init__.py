"""ADM networks (guided-diffusion layout), their typed configs, presets and checkpoint I/O."""

from .checkpoint import CheckpointError, load_state_dict, load_weights, read_metadata, save_weights
from .config import ClassifierConfig, NetConfig, SuperResConfig, UNetConfig
from .flags import FlagError, configs_from_flags, flags_of, parse_flags
from .presets import PRESETS, Preset, build_network, build_preset, get_preset
from .unet import EncoderUNetModel, SuperResModel, UNetModel

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ClassifierConfig",
    "EncoderUNetModel",
    "FlagError",
    "NetConfig",
    "Preset",
    "SuperResConfig",
    "SuperResModel",
    "UNetConfig",
    "UNetModel",
    "build_network",
    "build_preset",
    "configs_from_flags",
    "flags_of",
    "get_preset",
    "load_state_dict",
    "load_weights",
    "parse_flags",
    "read_metadata",
    "save_weights",
]
