"""DDIM update (Song et al. 2020, eq. 12) with stochasticity eta, as guided-diffusion's ddim_sample."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .rule import device_tables, per_sample


class DDIMStep:
    """x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - sigma^2) * eps + sigma * noise.

    eps is the one implied by the (clipped, guided) pred_xstart, so x0-prediction models and
    clipping work as in the original. eta = 0 is deterministic and draws no noise.
    """

    guidance = "score"

    def __init__(self, diffusion, *, eta: float = 0.0, device="cpu", dtype=None):
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        abar, abar_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
        sigma = self.eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
        self.c_x0, self.c_eps, self.sigma = device_tables(
            device, dtype, np.sqrt(abar_prev), np.sqrt(1 - abar_prev - sigma**2), sigma
        )

    def init_state(self, x: Tensor):
        return None

    def __call__(self, out: dict, x: Tensor, t: Tensor, noise: Tensor | None, state):
        x_prev = per_sample(self.c_x0, t, x) * out["pred_xstart"] + per_sample(self.c_eps, t, x) * out["eps"]
        if self.needs_noise:
            # sigma is 0 at the last step, so no mask is needed.
            x_prev = x_prev + per_sample(self.sigma, t, x) * noise
        return x_prev, state
