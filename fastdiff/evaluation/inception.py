"""Inception-v3 as the 2015 TensorFlow graph ADM's evaluator runs (``classify_image_graph_def.pb``).

The FID variant differs from torchvision's ImageNet Inception-v3: average pools exclude padding,
the last block pools with max instead of average, batch norm eps is 1e-3 and the classifier has
1008 outputs. Inputs are resized to 299x299 the way TensorFlow 1's ``resize_bilinear`` does
(source = dest * in/out, no half-pixel offset) and scaled by (x - 128) / 128, as in the graph.

Outputs (the evaluator's tensors): ``pool`` = pool_3 (2048), ``spatial`` = mixed_6/conv, which is
Mixed_6d's 1x1 branch after ReLU, first 7 channels flattened in NHWC order (17*17*7 = 2023), and
``logits`` = pool @ fc.weight.T without the bias (what the evaluator's softmax sees).

The parameter names follow torchvision's ``Inception3``, as the FID weight files of pytorch-fid
(``pt_inception-2015-12-05-6726825d.pth``) and torch-fidelity
(``weights-inception-2015-12-05-6726825d.pth``) have them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPATIAL_CHANNELS = 7
INPUT_SIZE = 299


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU; ``conv`` / ``bn`` as the weight files name them."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35: 1x1, 5x5, double 3x3 and pooled branches (TF mixed, mixed_1, mixed_2)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class BlockB(nn.Module):
    """35 -> 17 reduction (TF mixed_3)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class BlockC(nn.Module):
    """17x17 with factorised 7x7 convolutions (TF mixed_4 .. mixed_7)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x, first_branch: torch.Tensor | None = None):
        b1 = self.branch1x1(x) if first_branch is None else first_branch
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = conv(d)
        return torch.cat([b1, b7, self.branch7x7dbl_5(d), self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction (TF mixed_8)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        t = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(t), F.max_pool2d(x, 3, stride=2)], 1
        )


class BlockE(nn.Module):
    """8x8 with split 1x3 / 3x1 branches (TF mixed_9: average pool, mixed_10: max pool)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(s),
                self.branch3x3_2b(s),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            1,
        )


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of NCHW ``x`` as TF1 ``resize_bilinear(align_corners=False)``: the source of
    output pixel i is i * in/out (clamped at the last pixel), not (i + 0.5) * in/out - 0.5."""

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        src = torch.arange(size, dtype=torch.float64, device=t.device) * (n / size)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (src - lo).to(t.dtype)
        shape = [1] * t.ndim
        shape[dim] = size
        a, b = t.index_select(dim, lo), t.index_select(dim, hi)
        return a + (b - a) * frac.view(shape)

    return along(along(x, 2), 3)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; ``forward(uint8-valued NCHW float) -> (pool, spatial, logits)``."""

    def __init__(self, num_logits: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_logits)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images``: N x 3 x H x W with values in [0, 255] (any size; resized to 299)."""
        x = (resize_like_tf1(images.float(), INPUT_SIZE) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        mixed_6_conv = self.Mixed_6d.branch1x1(x)
        x = self.Mixed_6d(x, first_branch=mixed_6_conv)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean((2, 3))
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        return pool, spatial, pool @ self.fc.weight.T
