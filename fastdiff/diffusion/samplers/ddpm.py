"""Ancestral (DDPM) update: x_{t-1} ~ N(mean, variance) of p(x_{t-1} | x_t)."""

from __future__ import annotations

import torch
from torch import Tensor


class DDPMStep:
    """guided-diffusion's p_sample; classifier guidance shifts the mean (``condition_mean``)."""

    guidance = "mean"
    needs_noise = True

    def __init__(self, diffusion, *, eta: float = 0.0, device="cpu", dtype=None):
        """Uses only the process's own mean and variance (``eta`` has no meaning here)."""

    def init_state(self, x: Tensor):
        return None

    def __call__(self, out: dict, x: Tensor, t: Tensor, noise: Tensor, state):
        # No noise on the last step (t == 0): the sample is the posterior mean.
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise, state
