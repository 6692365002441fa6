"""What fastdiff is measured against, in the same run.

GroupNorm family: guided-diffusion's eager chain (``GroupNorm32`` normalises ``x.float()`` and
casts back, then the ResBlock's ``h * (1 + scale) + shift`` and SiLU) and ``torch.compile`` of it.
Attention: guided-diffusion's einsum ``QKVAttention`` / ``QKVAttentionLegacy``, ``torch.compile``
of it, and ``F.scaled_dot_product_attention`` with the permutes and copies it needs to go from and
back to the ``[B, C, T]`` layout (a fair comparison has to pay for them: the U-Net hands attention
that layout), and xformers' ``memory_efficient_attention`` where xformers is installed (CUDA).
Upsampler: guided-diffusion's ``F.interpolate`` then conv, which is the op's reference itself.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from fastdiff.ops.upsample_conv.reference import upsample_conv_reference as upsample_eager  # noqa: F401


def gn_eager(x, num_groups, weight, bias, scale, shift, eps=1e-5):
    h = F.group_norm(x.float(), num_groups, weight, bias, eps).type(x.dtype)
    h = h * (1 + scale[..., None, None]) + shift[..., None, None]
    return F.silu(h)


def attention_eager(qkv, num_heads, order="new"):
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if order == "new":  # QKVAttention, op for op
        q, k, v = qkv.chunk(3, dim=1)
        q = (q * scale).view(bs * num_heads, ch, length)
        k = (k * scale).view(bs * num_heads, ch, length)
        v = v.reshape(bs * num_heads, ch, length)
    else:  # QKVAttentionLegacy
        q, k, v = qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
        q, k = q * scale, k * scale
    weight = torch.einsum("bct,bcs->bts", q, k)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v)
    return a.reshape(bs, -1, length)


def attention_sdpa(qkv, num_heads, order="new"):
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    split = (bs, 3, num_heads, ch, length) if order == "new" else (bs, num_heads, 3, ch, length)
    perm = (1, 0, 2, 4, 3) if order == "new" else (2, 0, 1, 4, 3)
    # [3, B, H, T, d] with d contiguous, the layout the fused SDPA kernels want
    q, k, v = qkv.reshape(split).permute(perm).contiguous().unbind(0)
    a = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, d]; default scale = d^-1/2
    return a.transpose(-1, -2).reshape(bs, width // 3, length)


@functools.cache
def xformers_available(device: torch.device) -> bool:
    """xformers' fused attention: a CUDA baseline, present only where its wheel was installed and
    imports against this torch (a wheel built for another torch is a skipped row, not a failure)."""
    if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or the extension failing to load against this torch
        return False
    return True


def attention_xformers(qkv, num_heads, order="new"):
    """``xformers.ops.memory_efficient_attention`` on ``[B, T, H, d]`` views, with the same layout
    changes as :func:`attention_sdpa` (xformers wants the head dim innermost too)."""
    import xformers.ops

    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    split = (bs, 3, num_heads, ch, length) if order == "new" else (bs, num_heads, 3, ch, length)
    perm = (1, 0, 4, 2, 3) if order == "new" else (2, 0, 4, 1, 3)
    q, k, v = qkv.reshape(split).permute(perm).contiguous().unbind(0)  # [B, T, H, d] each
    a = xformers.ops.memory_efficient_attention(q, k, v)  # default scale = d^-1/2
    return a.permute(0, 2, 3, 1).reshape(bs, width // 3, length)


def compile_enabled(device: torch.device) -> bool:
    """torch.compile baselines run on CUDA; ``FASTDIFF_BENCH_COMPILE=1`` forces them on the CPU too."""
    return device.type == "cuda" or os.environ.get("FASTDIFF_BENCH_COMPILE", "0") not in ("", "0")


def _raise_recompile_limits() -> None:
    """Every shape gets its own static graph (the fair baseline), so allow many of them."""
    cfg = torch._dynamo.config
    for names, value in (
        (("recompile_limit", "cache_size_limit"), 4096),
        (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 1 << 16),
    ):
        name = next((n for n in names if hasattr(cfg, n)), None)
        if name is not None:
            setattr(cfg, name, value)


@functools.cache
def compiled(fn):
    """``torch.compile`` with static shapes (what a fixed-resolution sampler would get)."""
    _raise_recompile_limits()
    return torch.compile(fn, dynamic=False, fullgraph=True)
