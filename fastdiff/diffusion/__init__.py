"""The diffusion layer: schedules, the Gaussian process and its losses, samplers and guidance."""

from .config import DiffusionConfig
from .errors import SamplingError
from .gaussian import GaussianDiffusion
from .guidance import ClassifierFreeGuidance, ClassifierGuidance
from .samplers import SAMPLERS, sample, sample_steps
from .schedule import get_named_beta_schedule, space_timesteps

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "DiffusionConfig",
    "GaussianDiffusion",
    "SamplingError",
    "get_named_beta_schedule",
    "sample",
    "sample_steps",
    "space_timesteps",
]
