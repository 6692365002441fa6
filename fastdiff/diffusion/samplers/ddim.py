"""DDIM update (Song et al. 2020, eq. 12) with stochasticity eta, as guided-diffusion's ddim_sample."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .rule import per_sample


class DDIMStep:
    """x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - sigma^2) * eps + sigma * noise.

    eps is the one implied by the (clipped, guided) pred_xstart, so x0-prediction models and
    clipping work as in the original. eta = 0 is deterministic and draws no noise.
    """

    guidance = "score"

    def __init__(self, diffusion, *, eta: float = 0.0, device="cpu", dtype=None):
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        # float32 arithmetic on float32 alpha_bars, as the original's step computes them, so its
        # coefficients are the original's to the bit (float64 tables then rounded differ in the
        # last bit, enough to move a pixel of a seeded run by one level). A float64 run computes
        # them in float64: float32's 1 - alpha_bar near t = 0 was off by 1e-3 relative, which
        # moved a float64 DDIM sample by up to 3e-3 mid-run against the float64 arithmetic.
        work = torch.float64 if dtype == torch.float64 else torch.float32
        abar, abar_prev = (
            torch.from_numpy(np.asarray(a, dtype=np.float64)).to(work)
            for a in (diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev)
        )
        sigma = self.eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        self.c_x0, self.c_eps, self.sigma = (
            c.to(device=device, dtype=dtype or torch.float32)
            for c in (torch.sqrt(abar_prev), torch.sqrt(1 - abar_prev - sigma**2), sigma)
        )

    def init_state(self, x: Tensor):
        return None

    def __call__(self, out: dict, x: Tensor, t: Tensor, noise: Tensor | None, state):
        x_prev = per_sample(self.c_x0, t, x) * out["pred_xstart"] + per_sample(self.c_eps, t, x) * out["eps"]
        if self.needs_noise:
            # sigma is 0 at the last step, so no mask is needed.
            x_prev = x_prev + per_sample(self.sigma, t, x) * noise
        return x_prev, state
