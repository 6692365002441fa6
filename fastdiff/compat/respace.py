"""guided-diffusion's ``respace``: ``SpacedDiffusion`` and ``space_timesteps`` over fastdiff's.

Every process ``script_util`` builds is a ``SpacedDiffusion`` (as in the original), made by
fastdiff's one process builder (``GaussianDiffusion.from_config``); user code may also build one the
original's way, ``SpacedDiffusion(use_timesteps, betas=..., model_mean_type=..., ...)``. The
model sees the kept steps' original timesteps through fastdiff's ``model_timesteps`` (what the
original's ``_WrappedModel`` does), in sampling, losses and guidance alike.
"""

from __future__ import annotations

import numpy as np

from ..diffusion.schedule import respace_betas, space_timesteps
from .gaussian_diffusion import GaussianDiffusion

__all__ = ["SpacedDiffusion", "space_timesteps"]


class SpacedDiffusion(GaussianDiffusion):
    """The process keeping ``use_timesteps`` of the one ``betas`` define, with the same alpha_bar
    at every kept step (so a model trained on the full process samples it)."""

    def __init__(self, use_timesteps, **kwargs):
        betas = np.asarray(kwargs.pop("betas"), dtype=np.float64)
        kept_betas, timestep_map = respace_betas(np.cumprod(1.0 - betas), use_timesteps)
        super().__init__(kept_betas, timestep_map=timestep_map, original_num_steps=len(betas), **kwargs)

    @classmethod
    def from_config(cls, config, respacing="") -> SpacedDiffusion:
        """The process fastdiff's ``from_config`` builds, as this class (it is respaced already:
        the tables are taken over, not recomputed)."""
        process = GaussianDiffusion.from_config(config, respacing)
        spaced = cls.__new__(cls)
        vars(spaced).update(vars(process))
        return spaced
