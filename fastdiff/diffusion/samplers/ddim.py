"""DDIM update (Song et al. 2020, eq. 12) with stochasticity eta, as guided-diffusion's ddim_sample."""

from __future__ import annotations

import numpy as np
from torch import Tensor


class DDIMStep:
    """x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - sigma^2) * eps + sigma * noise.

    eps is the one implied by the (clipped, guided) pred_xstart, so x0-prediction models and
    clipping work as in the original. eta = 0 is deterministic and draws no noise.
    """

    guidance = "score"

    def __init__(self, diffusion, eta: float = 0.0):
        self.diffusion = diffusion
        self.eta = float(eta)
        self.needs_noise = self.eta > 0

    def _arrays(self) -> dict[str, np.ndarray]:
        abar = self.diffusion.alphas_cumprod
        abar_prev = self.diffusion.alphas_cumprod_prev
        sigma = self.eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
        return {"c_x0": np.sqrt(abar_prev), "c_eps": np.sqrt(1 - abar_prev - sigma**2), "sigma": sigma}

    def prepare(self, device, dtype) -> dict[str, Tensor]:
        return self.diffusion.cached_tables(("ddim", self.eta), device, dtype, self._arrays)

    def init_state(self, x: Tensor):
        return None

    def __call__(self, out: dict, x: Tensor, t: Tensor, noise: Tensor | None, state):
        tables = self.prepare(x.device, x.dtype)
        shape = (-1, *([1] * (x.ndim - 1)))
        x_prev = (
            tables["c_x0"][t].view(shape) * out["pred_xstart"] + tables["c_eps"][t].view(shape) * out["eps"]
        )
        if self.needs_noise:
            # sigma is 0 at the last step, so no mask is needed.
            x_prev = x_prev + tables["sigma"][t].view(shape) * noise
        return x_prev, state
