"""DPM-Solver++(2M) (Lu et al. 2022): multistep second-order solver of the probability-flow ODE
in data (x0) prediction, on the diffusion's (respaced) steps.

With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
h = lambda_next - lambda_cur, one step is

    x_next = (sigma_next / sigma_cur) * x - alpha_next * expm1(-h) * D,
    D = x0_cur + (x0_cur - x0_prev) / (2 r),   r = h_prev / h.

The first step has no x0_prev and the last step (to abar = 1, sigma = 0, h = inf) returns x0,
so both are first order (D = x0_cur), as in the reference implementation. With fewer than 10
solver steps the step into t = 0 is first order too, as the authors' ``lower_order_final`` takes
it: it steadies few-step sampling (on the bundled model at 5, 8 and 10 times it matched or beat
second order in class match and sFID in all 9 settings, and in Frechet distance in 8; DESIGN.md).
Every coefficient is a float64 table indexed by the step, so a step has no Python branching on
its position.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .rule import device_tables, per_sample


def first_order_final(num_times: int) -> bool:
    """Whether the solver on ``num_times`` respaced times takes its step into t = 0 at first
    order: under 10 solver steps (the ``num_times - 1`` before the final x0), as the authors'
    ``lower_order_final`` does."""
    return num_times - 1 < 10


class DPMSolverPP2MStep:
    """The update rule; the state carries the previous step's x0 prediction."""

    guidance = "score_then_clip"  # the authors clip the guided x0 (correcting_x0_fn)
    needs_noise = False

    def __init__(self, diffusion, *, eta: float = 0.0, device="cpu", dtype=None):
        abar = diffusion.alphas_cumprod
        abar_next = diffusion.alphas_cumprod_prev  # sampling goes k -> k - 1
        n = len(abar)
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))
        with np.errstate(divide="ignore"):
            lam_next = 0.5 * (np.log(abar_next) - np.log1p(-abar_next))  # +inf at k = 0
        h = lam_next - lam
        ratio = np.sqrt(1 - abar_next) / np.sqrt(1 - abar)
        coef = -np.sqrt(abar_next) * np.expm1(-h)
        corr = np.zeros(n)
        # Second order for k = n-2 .. 1: the previous step was k + 1.
        inner = np.arange(1, n - 1)
        h_prev = lam[inner] - lam[inner + 1]
        corr[inner] = h[inner] / (2 * h_prev)
        if first_order_final(n):
            corr[1] = 0.0  # the step k = 1 -> 0 (n >= 2: a process keeps at least two times)
        self.ratio, self.coef, self.corr = device_tables(device, dtype, ratio, coef, corr)

    def init_state(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def __call__(self, out: dict, x: Tensor, t: Tensor, noise, x0_prev: Tensor):
        x0 = out["pred_xstart"]
        d = x0 + per_sample(self.corr, t, x) * (x0 - x0_prev)
        return per_sample(self.ratio, t, x) * x + per_sample(self.coef, t, x) * d, x0
