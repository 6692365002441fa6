"""guided-diffusion's ``respace``: ``SpacedDiffusion`` and ``space_timesteps`` over fastdiff's.

Every process ``script_util`` builds is a ``SpacedDiffusion`` (as in the original), made by
fastdiff's one process builder (``GaussianDiffusion.from_config``); user code may also build one the
original's way, ``SpacedDiffusion(use_timesteps, betas=..., model_mean_type=..., ...)``. The
model sees the kept steps' original timesteps through fastdiff's ``model_timesteps`` (what the
original's ``_WrappedModel`` does), in sampling, losses and guidance alike; ``_wrap_model`` gives
user samplers that call the model themselves the same mapping.
"""

from __future__ import annotations

import numpy as np

from ..diffusion import schedule
from ..diffusion.schedule import respace_betas
from .gaussian_diffusion import GaussianDiffusion

__all__ = ["GaussianDiffusion", "SpacedDiffusion", "space_timesteps"]


def space_timesteps(num_timesteps, section_counts) -> set[int]:
    """The original steps a respacing spec keeps (``"ddimN"``, ``"a,b,c"`` or a list of counts),
    as the original's set."""
    return set(schedule.space_timesteps(num_timesteps, section_counts))


class _WrappedModel:
    """``model`` taking a respaced process's steps: it is called with the steps the process gives
    the model (``model_timesteps``: the original steps, rescaled to 0..1000 when asked).

    Unlike the original's it is built from the process, not from a copy of its map.
    """

    def __init__(self, model, diffusion):
        self.model = model
        self.diffusion = diffusion

    def __call__(self, x, ts, **kwargs):
        return self.model(x, self.diffusion.model_timesteps(ts), **kwargs)


def _unwrapped(fn):
    """The model inside a ``_WrappedModel``: the process maps steps itself, so a wrapped model
    given back to it (as the original allows) must not map them twice."""
    return fn.model if isinstance(fn, _WrappedModel) else fn


class SpacedDiffusion(GaussianDiffusion):
    """The process keeping ``use_timesteps`` of the one ``betas`` define, with the same alpha_bar
    at every kept step (so a model trained on the full process samples it)."""

    def __init__(self, use_timesteps, **kwargs):
        betas = np.asarray(kwargs.pop("betas"), dtype=np.float64)
        if not ((betas > 0).all() and (betas <= 1).all()):  # the original checks the full process too
            raise ValueError("betas must lie in (0, 1]")
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

    def _wrap_model(self, model):
        """``model`` called with this process's respaced steps, for samplers that call it."""
        return model if isinstance(model, _WrappedModel) else _WrappedModel(model, self)

    def _scale_timesteps(self, t):
        return t  # as the original's: the wrapped model maps and scales

    # The original's entry points that wrap the model take a wrapped one as well.
    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(_unwrapped(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(_unwrapped(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(_unwrapped(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(_unwrapped(cond_fn), *args, **kwargs)

    def _step(self, sampler, model, x, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta=0.0):
        # A step calls cond_fn itself where the guidance runs on its own CUDA stream.
        return super()._step(
            sampler, _unwrapped(model), x, clip_denoised, denoised_fn, _unwrapped(cond_fn), model_kwargs, eta
        )
