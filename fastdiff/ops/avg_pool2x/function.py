"""``avg_pool2x``: 2x2 average pooling with stride 2, on an NCHW CPU tensor without PyTorch's
pooling kernels.

PyTorch's CPU avg_pool2d and its backward loop over NCHW windows one output at a time: at one
thread they took 1.3-1.5 ms and 1.4-2.2 ms for [16, 32, 32, 32] (the bundled classifier's
down block, four pools in each guided step, run under autograd for the gradient by x), where
three strided adds and a scale take 0.5 ms, and the gradient (each input pixel a quarter of its
output's, written as four strided copies of one quarter-size product) 0.5 ms. The adds run in
the reference's order, ``((x00 + x01) + x10) + x11``, and ``* 0.25`` is its ``/ 4``: the same
numbers, and the same gradient. Channels-last tensors (PyTorch's kernel vectorizes over the
channels there), other devices, odd sizes, traces and transforms take the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff.ops._backend import (
    OpInputError,
    check_tensor,
    force_reference,
    forward_ad_active,
    in_func_transform,
    new_output,
    traced,
)
from fastdiff.ops.avg_pool2x.reference import avg_pool2x_reference


def _pool(x: Tensor) -> Tensor:
    out = x[..., ::2, ::2] + x[..., ::2, 1::2]
    return out.add_(x[..., 1::2, ::2]).add_(x[..., 1::2, 1::2]).mul_(0.25)


class _Strided(torch.autograd.Function):
    """:func:`_pool` with its gradient in the same terms; a create_graph backward takes the
    broadcast form, which autograd differentiates."""

    @staticmethod
    def forward(ctx, x):
        return _pool(x)

    @staticmethod
    def backward(ctx, dy):
        n, c, h, w = dy.shape
        if torch.is_grad_enabled():
            quarter = (dy * 0.25)[:, :, :, None, :, None]
            return quarter.expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
        dx = new_output((n, c, h, 2, w, 2), dtype=dy.dtype, device=dy.device)
        torch.mul(dy, 0.25, out=dx[:, :, :, 0, :, 0])
        dx[:, :, :, 0, :, 1] = dx[:, :, :, 0, :, 0]
        dx[:, :, :, 1] = dx[:, :, :, 0]
        return dx.view(n, c, 2 * h, 2 * w)


def _fast(x: Tensor) -> bool:
    """Whether x takes the strided path: a non-empty NCHW fp32/fp64 CPU tensor of even size
    (PyTorch sums 16-bit windows in fp32, rounding once), outside the traced and transformed
    runs that must see the reference's op."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous():
        return False
    if force_reference() or traced() or in_func_transform() or forward_ad_active():
        return False  # before any test of a size: a traced value in torch.jit.trace, which warns
    return x.numel() > 0 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0


def avg_pool2x(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 2, 2)`` for x [N, C, H, W]: the same numbers. Under
    ``torch.jit.script`` it is the reference."""
    if torch.jit.is_scripting():
        return avg_pool2x_reference(x)
    return _dispatch(x)


def _dispatch(x):
    """avg_pool2x's checks and dispatch, in a function TorchScript never compiles."""
    check_tensor("avg_pool2x", "x", x)
    if x.dim() != 4:
        raise OpInputError(f"avg_pool2x: x must be [N, C, H, W], got {tuple(x.shape)}")
    if not _fast(x):
        return avg_pool2x_reference(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Strided.apply(x)
    return _pool(x)
