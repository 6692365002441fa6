"""Nearest 2x upsampling followed by a same-padded 3x3 conv, as guided-diffusion's ``Upsample``
(``use_conv``) and its BigGAN up ResBlock compute them: the numbers to match."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_conv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [N, C, H, W], weight [O, C, 3, 3] -> [N, O, 2H, 2W]."""
    # a float scale: TorchScript, which compiles this where upsample_conv is scripted, takes no int
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
