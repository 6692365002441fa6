"""A step built for a batch of ``size`` run for a smaller batch, its inputs padded.

Exact up to the kernels' rounding because every op of the guided step is per sample (convolutions,
GroupNorm and attention per sample, the classifier gradient of a sum of per-sample log-probs, the
update rules and their state) and the noise is drawn outside the step, x's shape from the caller's
generator, so the padding draws nothing. The caller fills the label and conditioning buffers'
extra rows (a valid label, zeros).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import _pytree

from fastdiff.diffusion.samplers import StepFn


class PaddedStep:
    """``run`` (a step for batches of ``size``) as a step for any batch of n < size: x, the noise
    and the sampler state get zero rows, t repeats its first row; the outputs and the state are
    cut back to n rows."""

    def __init__(self, run: StepFn, size: int):
        self.run, self.size = run, size

    def __call__(self, x: Tensor, t: Tensor, noise: Tensor | None, state):
        n = x.shape[0]

        def pad(v):
            if not (isinstance(v, Tensor) and v.dim() and v.shape[0] == n):
                return v
            return torch.cat([v, v.new_zeros(self.size - n, *v.shape[1:])])

        def cut(v):
            return v[:n] if isinstance(v, Tensor) and v.dim() and v.shape[0] == self.size else v

        t = torch.cat([t, t[:1].expand(self.size - n)])
        x_next, pred_xstart, state = self.run(pad(x), t, pad(noise), _pytree.tree_map(pad, state))
        return x_next[:n], pred_xstart[:n], _pytree.tree_map(cut, state)
