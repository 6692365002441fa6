"""Drop-in replacements for guided-diffusion's QKVAttention / QKVAttentionLegacy modules
(same constructor and ``n_heads`` attribute, no parameters, so state dicts do not change)."""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.ops.attention.function import attention


class _HeadAttention(nn.Module):
    order = "new"

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
