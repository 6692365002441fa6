"""ADM attention through ``F.scaled_dot_product_attention``: the fast path where no Triton kernel
runs (the CPU, CUDA without triton).

SDPA reaches PyTorch's fused (flash / memory-efficient) kernels only for 4-D ``[B, H, T, d]``
inputs with d contiguous; 3-D inputs take its unfused math path, slower than ADM's einsum. So the
packed qkv is permuted into that layout once (one copy for q, k and v together). Autograd is
PyTorch's own, and torch.compile / torch.export trace straight through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention(qkv: torch.Tensor, num_heads: int, order: str) -> torch.Tensor:
    """[B, 3*H*d, T] -> [B, H*d, T]; same math as ``attention_reference`` (q.k / sqrt(d))."""
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if order == "legacy":  # channels ordered (head, q/k/v, d)
        parts = qkv.reshape(bs, num_heads, 3, ch, length).permute(2, 0, 1, 4, 3)
    else:  # channels ordered (q/k/v, head, d)
        parts = qkv.reshape(bs, 3, num_heads, ch, length).permute(1, 0, 2, 4, 3)
    q, k, v = parts.contiguous().unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, d]
    return out.transpose(-1, -2).reshape(bs, num_heads * ch, length)
