"""2x2 average pooling with stride 2, as guided-diffusion's ``Downsample`` (``use_conv`` False)
and its BigGAN down ResBlock compute it: the numbers to match."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def avg_pool2x_reference(x: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W] -> [N, C, H // 2, W // 2]."""
    return F.avg_pool2d(x, kernel_size=2, stride=2)
