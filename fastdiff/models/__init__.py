"""ADM networks (guided-diffusion layout), their presets and checkpoint I/O."""

from .checkpoint import CheckpointError, load_state_dict, load_weights, read_metadata, save_weights
from .presets import (
    PRESETS,
    Preset,
    build_preset,
    classifier_defaults,
    create_classifier,
    create_superres,
    create_unet,
    diffusion_defaults,
    get_preset,
    model_defaults,
    parse_flags,
    preset_flags,
    sr_defaults,
)
from .unet import EncoderUNetModel, SuperResModel, UNetModel

__all__ = [
    "PRESETS",
    "CheckpointError",
    "EncoderUNetModel",
    "Preset",
    "SuperResModel",
    "UNetModel",
    "build_preset",
    "classifier_defaults",
    "create_classifier",
    "create_superres",
    "create_unet",
    "diffusion_defaults",
    "get_preset",
    "load_state_dict",
    "load_weights",
    "model_defaults",
    "parse_flags",
    "preset_flags",
    "read_metadata",
    "save_weights",
    "sr_defaults",
]
