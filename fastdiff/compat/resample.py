"""guided-diffusion's ``resample``: timestep samplers built from a diffusion object.

The weighting (uniform, or the loss' second moment) is fastdiff's ``training.resample``; these
classes give it the original's surface: constructed from ``diffusion``, ``sample(batch_size,
device)`` drawing from numpy's global RNG with ``np.random.choice`` (so a seeded script draws the
original's timesteps), and ``LossAwareSampler.update_with_local_losses`` gathering every rank's
losses first.
"""

from __future__ import annotations

import numpy as np
import torch

from ..training import dist
from ..training import resample as fastdiff_resample

__all__ = [
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "ScheduleSampler",
    "UniformSampler",
    "create_named_schedule_sampler",
]


class ScheduleSampler(fastdiff_resample.ScheduleSampler):
    """Importance sampling of t with weights ``1 / (T p_t)``, as fastdiff's, drawn the original's way."""

    def __init__(self, diffusion):
        super().__init__(diffusion.num_timesteps)
        self.diffusion = diffusion

    def weights(self) -> np.ndarray:
        """The unnormalised probabilities of each step, as the original's numpy array."""
        return super().weights().numpy()

    def sample(self, batch_size, device):
        """-> (timesteps, weights) on ``device``."""
        w = self.weights()
        p = w / np.sum(w)
        indices = np.random.choice(len(p), size=(batch_size,), p=p)
        weights = 1 / (len(p) * p[indices])
        return torch.from_numpy(indices).long().to(device), torch.from_numpy(weights).float().to(device)


class UniformSampler(ScheduleSampler, fastdiff_resample.UniformSampler):
    pass


class LossAwareSampler(ScheduleSampler):
    """A sampler that learns from the losses; every rank keeps the same history."""

    def update_with_local_losses(self, local_ts, local_losses) -> None:
        """This rank's (t, loss) pairs, gathered over the ranks (rank order; every rank's batch
        the same size, as the training loop's are), then recorded."""
        ts = dist.all_gather_cat(local_ts)
        losses = dist.all_gather_cat(local_losses)
        self.update_with_all_losses(ts.tolist(), losses.tolist())

    def update_with_all_losses(self, ts, losses) -> None:
        """Record losses already gathered from every rank (lists or tensors)."""
        self.update_with_losses(torch.as_tensor(ts), torch.as_tensor(losses))


class LossSecondMomentResampler(LossAwareSampler, fastdiff_resample.LossSecondMomentResampler):
    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        fastdiff_resample.LossSecondMomentResampler.__init__(
            self, diffusion.num_timesteps, history_per_term, uniform_prob
        )
        self.diffusion = diffusion


def create_named_schedule_sampler(name, diffusion) -> ScheduleSampler:
    """The sampler fastdiff's ``create_named_schedule_sampler`` names ("uniform",
    "loss-second-moment"; its one-line error otherwise), as this module's class for ``diffusion``."""
    named = fastdiff_resample.create_named_schedule_sampler(name, diffusion.num_timesteps)
    uniform = isinstance(named, fastdiff_resample.UniformSampler)
    return (UniformSampler if uniform else LossSecondMomentResampler)(diffusion)
