"""ada_group_norm on a channels-last tensor without autograd: the CPU's inference path.

PyTorch's CPU group_norm is fast on NCHW, but on channels_last it is 6-11x slower at most of the
bundled model's shapes (1.2 ms against 0.11 ms for [16, 64, 16, 16], torch 2.13, one thread),
and a channels_last torso is what makes oneDNN's convolutions fast there (UNetModel runs its
inference passes on the CPU in it from a batch of 16). Viewed as [N, HW, C], per-channel sums are one
vectorized pass each; the statistics are two-pass (mean, then the centred squares) as exact as
the native kernel's, and the affine, scale and shift fold into one multiply-add per element:
``(x - mean) * rstd * w * (1 + scale) + (b * (1 + scale) + shift)``, the reference's chain up
to rounding.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import stat_dtype


def is_channels_last(x: Tensor) -> bool:
    """x [N, C, *] holds its channels innermost (channels_last, or the [B, C, T] view of one)
    and is not also plain contiguous (C or the spatial size 1: the native path takes it). Read
    from the strides alone: it is asked on every call."""
    if x.dim() < 3 or x.stride(1) != 1 or x.is_contiguous():
        return False
    dense = x.shape[1]
    for size, stride in zip(reversed(x.shape[2:]), reversed(x.stride()[2:])):
        if size != 1 and stride != dense:
            return False
        dense *= size
    return x.shape[0] == 1 or x.stride(0) == dense


@functools.cache
def _group_mean(c: int, num_groups: int, count: int, dtype: torch.dtype) -> Tensor:
    """[C, C]: channel sums [N, C] @ it = each channel's group mean over ``count`` elements (one
    small matmul where a view, sum, expand and divide were four ops of ~5 us each, per call)."""
    group = torch.arange(c) // (c // num_groups)
    with torch.inference_mode(False):  # kept for calls outside an inference_mode too
        return (group[:, None] == group[None, :]).to(dtype) / count


def ada_group_norm_channels_last(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
    activation: str | None,
) -> Tensor:
    """``act((GN(x) * weight + bias) * (1 + scale) + shift)`` for a channels-last x (see
    :func:`is_channels_last`), statistics in fp32 (fp64 for fp64 x); the output keeps x's layout.
    scale/shift are [N, C]. Not differentiable by design: the caller takes it where autograd is
    not recording. Few ops: at the bundled model's sizes each small op costs about as much as a
    tenth of a pass over x."""
    n, c = x.shape[0], x.shape[1]
    sd = stat_dtype(x)
    xs = x.movedim(1, -1).reshape(n, -1, c).to(sd)  # a view of x unless x is in a lower dtype
    to_mean = _group_mean(c, num_groups, xs.shape[1] * (c // num_groups), sd)
    # CPU autocast would run the matmuls in bf16/fp16, where a sum of squares overflows
    autocast = torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", enabled=False) if autocast else contextlib.nullcontext():
        d = xs - (xs.sum(1) @ to_mean).unsqueeze(1)
        a = ((d * d).sum(1) @ to_mean).add_(eps).rsqrt_()  # [N, C]: rstd, then the whole factor
    b = None if bias is None else bias.to(sd)
    if weight is not None:
        a.mul_(weight.to(sd))
    if scale is not None:
        s = scale.to(sd) + 1
        a.mul_(s)
        b = None if b is None else b * s
    if shift is not None:
        b = shift.to(sd) if b is None else b + shift.to(sd)
    a = a.unsqueeze(1)
    y = d.mul_(a) if b is None else torch.addcmul(b.unsqueeze(-2), d, a, out=d)  # b: [C] or [N, C]
    if activation is not None:
        F.silu(y, inplace=True)
    return y.to(x.dtype).view(n, *x.shape[2:], c).movedim(-1, 1)
