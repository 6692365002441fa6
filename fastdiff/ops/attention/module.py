"""Drop-in replacements for guided-diffusion's QKVAttention / QKVAttentionLegacy modules
(same constructor and ``n_heads`` attribute, no parameters, so state dicts do not change)."""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from fastdiff.ops.attention.function import attention

torch.fx.wrap("attention")  # one call node under torch.fx.symbolic_trace, as for ada_group_norm


def count_flops_attn(model: nn.Module, _x, y) -> None:
    """thop's hook for QKVAttention / QKVAttentionLegacy
    (``thop.profile(model, inputs, custom_ops={QKVAttention: QKVAttention.count_flops})``): adds
    guided-diffusion's count for the two matmuls, ``2 * b * spatial**2 * c``, from the shape of
    ``y[0]`` (read as the original reads it, so profiles of both compare)."""
    b, c, *spatial = y[0].shape
    ops = 2 * b * math.prod(spatial) ** 2 * c
    model.total_ops += torch.tensor([float(ops)], dtype=torch.float64)


class _HeadAttention(nn.Module):
    __constants__ = ["n_heads", "order"]  # for torch.jit.script
    order = "new"
    count_flops = staticmethod(count_flops_attn)

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return attention(qkv, self.n_heads, self.order)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"


class QKVAttention(_HeadAttention):
    """qkv [B, 3*H*d, T] split into q, k, v first, then into heads -> [B, H*d, T]."""


class QKVAttentionLegacy(_HeadAttention):
    """qkv [B, 3*H*d, T] split into heads first, each holding its q, k, v -> [B, H*d, T]."""

    order = "legacy"
