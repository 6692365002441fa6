"""guided-diffusion's ``script_util`` names, returning fastdiff models and processes.

Code written against guided-diffusion (``create_model_and_diffusion(**args)``, then
``diffusion.ddim_sample_loop(model, shape, cond_fn=..., model_kwargs=...)``) runs unchanged.
The sampling loops here are thin faces over ``fastdiff.diffusion.samplers.sample_steps``: the
same step functions ``fastdiff.diffusion.sample`` uses, with the user's ``cond_fn`` as the
guidance callable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from ..diffusion.gaussian import GaussianDiffusion, create_diffusion_from_flags
from ..diffusion.samplers import sample_steps
from ..models import presets

NUM_CLASSES = 1000


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion with guided-diffusion's sampling-loop methods.

    As in the original, ``cond_fn(x, t, **model_kwargs)`` returns the scaled gradient and is
    called with the original (or 0..1000-rescaled) timesteps, like the model. Unlike the
    original, a loop that produced NaN/Inf raises ``SamplingError`` after its last step.
    """

    def _progressive(
        self,
        sampler,
        model,
        shape,
        noise,
        clip_denoised,
        denoised_fn,
        cond_fn,
        model_kwargs,
        device,
        progress,
        eta=0.0,
    ) -> Iterator[dict]:
        for _, x, pred_xstart in sample_steps(
            self,
            model,
            shape,
            sampler=sampler,
            eta=eta,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            noise=noise,
            device=device,
            progress=progress,
        ):
            yield {"sample": x, "pred_xstart": pred_xstart}

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Yield {"sample", "pred_xstart"} after each ancestral step."""
        return self._progressive(
            "ddpm", model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress
        )

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """The final sample of ancestral sampling."""
        return _last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Yield {"sample", "pred_xstart"} after each DDIM step."""
        return self._progressive(
            "ddim",
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            cond_fn,
            model_kwargs,
            device,
            progress,
            eta,
        )

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """The final sample of DDIM sampling."""
        return _last_sample(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta
            )
        )


def _last_sample(steps: Iterator[dict]):
    return deque(steps, maxlen=1)[0]["sample"]


# script_util's keyword builder (steps, learn_sigma, ..., timestep_respacing).
create_gaussian_diffusion = SpacedDiffusion.from_flags


def diffusion_defaults() -> dict:
    return presets.diffusion_defaults()


def model_and_diffusion_defaults() -> dict:
    return {**presets.model_defaults(), **presets.diffusion_defaults()}


def classifier_defaults() -> dict:
    return presets.classifier_defaults()


def sr_model_and_diffusion_defaults() -> dict:
    return {**presets.sr_defaults(), **presets.diffusion_defaults()}


def _complete(name: str, defaults: dict, flags: dict) -> dict:
    """Flags over their defaults; unknown names are a TypeError, as for the original's signatures."""
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise TypeError(f"{name}() got unexpected flag(s): {', '.join(unknown)}")
    return {**defaults, **flags}


def create_model_and_diffusion(**flags):
    """-> (UNetModel, SpacedDiffusion) from ``model_and_diffusion_defaults()`` flags."""
    flags = _complete("create_model_and_diffusion", model_and_diffusion_defaults(), flags)
    return presets.create_unet(**flags), create_diffusion_from_flags(flags, SpacedDiffusion)


def create_classifier(**flags):
    """The noisy-image classifier (EncoderUNetModel) from ``classifier_defaults()`` flags."""
    return presets.create_classifier(**_complete("create_classifier", classifier_defaults(), flags))


def sr_create_model_and_diffusion(**flags):
    """-> (SuperResModel, SpacedDiffusion) from ``sr_model_and_diffusion_defaults()`` flags."""
    flags = _complete("sr_create_model_and_diffusion", sr_model_and_diffusion_defaults(), flags)
    return presets.create_superres(**flags), create_diffusion_from_flags(flags, SpacedDiffusion)
