"""The diffusion layer: schedules, the Gaussian process and its losses, samplers and guidance."""

from .errors import SamplingError
from .gaussian import GaussianDiffusion, create_diffusion, create_diffusion_from_flags
from .guidance import ClassifierFreeGuidance, ClassifierGuidance
from .samplers import SAMPLERS, sample, sample_steps
from .schedule import get_named_beta_schedule, space_timesteps

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "GaussianDiffusion",
    "SamplingError",
    "create_diffusion",
    "create_diffusion_from_flags",
    "get_named_beta_schedule",
    "sample",
    "sample_steps",
    "space_timesteps",
]
