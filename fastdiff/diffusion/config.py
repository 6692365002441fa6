"""The diffusion process a network was trained with, as one typed value.

guided-diffusion passes these as loose flags; here they are a frozen config that presets,
checkpoints, training runs and sampling share, built with ``GaussianDiffusion.from_config``.
The respacing is not part of it: it is a choice of each sampling run.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastdiff.config import ConfigError, check_types, unknown_choice

NOISE_SCHEDULES = ("linear", "cosine")
LINEAR_MIN_STEPS = 20  # fewer linear steps give betas above 1


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """guided-diffusion's diffusion flags (``diffusion_steps`` is ``steps``), typed and checked."""

    steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = False
    sigma_small: bool = False
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    rescale_learned_sigmas: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        if self.steps < 2:
            raise ConfigError(f"diffusion_steps must be at least 2, got {self.steps}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ConfigError(unknown_choice("noise_schedule", self.noise_schedule, NOISE_SCHEDULES))
        if self.noise_schedule == "linear" and self.steps < LINEAR_MIN_STEPS:
            # The linear betas end at 0.02 * 1000 / steps: above 1 (a negative alpha) below 20
            # steps, a process guided-diffusion refuses too (whatever the respacing).
            raise ConfigError(
                f"the linear noise_schedule needs at least {LINEAR_MIN_STEPS} timesteps (its last"
                f" beta is 20 / steps, above 1 with fewer), got steps {self.steps}; the cosine"
                " schedule takes fewer"
            )

    @property
    def loss_type(self) -> str:
        if self.use_kl:
            return "rescaled_kl"
        return "rescaled_mse" if self.rescale_learned_sigmas else "mse"

    @property
    def model_var_type(self) -> str:
        if self.learn_sigma:
            return "learned_range"
        return "fixed_small" if self.sigma_small else "fixed_large"
