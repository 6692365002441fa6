"""Drop-in names of other diffusion codebases over fastdiff objects."""

from . import guided_diffusion

__all__ = ["guided_diffusion"]
