"""Plain PyTorch attention with guided-diffusion's exact semantics: the numbers to match.

``attention_reference`` is QKVAttention (``order="new"``) / QKVAttentionLegacy (``"legacy"``)
op for op (q and k each scaled by d**-1/4 in the input dtype, softmax in fp32 cast back; float64
inputs keep a float64 softmax so the reference can be the exact one in tests).
``forward_reference`` / ``backward_reference`` are what the custom op runs where no kernel
does (CPU without the interpreter, float64): the same outputs plus the logsumexp the
kernel saves, and the flash-attention backward written as plain tensor math.
"""

from __future__ import annotations

import math

import torch

ORDERS = ("new", "legacy")


def split_heads(qkv: torch.Tensor, num_heads: int, order: str):
    """(q, k, v), each [B*H, d, T] views, split as guided-diffusion does for ``order``."""
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if order == "legacy":
        return qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    q, k, v = qkv.chunk(3, dim=1)
    return tuple(t.reshape(bs * num_heads, ch, length) for t in (q, k, v))


def merge_heads(parts, num_heads: int, order: str) -> torch.Tensor:
    """Inverse of ``split_heads``: three [B*H, d, T] tensors back into [B, 3*H*d, T]."""
    bh, ch, length = parts[0].shape
    bs = bh // num_heads
    if order == "legacy":
        return torch.cat(parts, dim=1).reshape(bs, 3 * num_heads * ch, length)
    return torch.cat([p.reshape(bs, num_heads * ch, length) for p in parts], dim=1)


def _weights(qkv: torch.Tensor, num_heads: int, order: str):
    q, k, v = split_heads(qkv, num_heads, order)
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    return weight, v


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax and its logsumexp are computed in: fp32, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def attention_reference(qkv: torch.Tensor, num_heads: int, order: str = "new") -> torch.Tensor:
    """[B, 3*H*d, T] -> [B, H*d, T], exactly guided-diffusion's QKVAttention(Legacy)."""
    weight, v = _weights(qkv, num_heads, order)
    weight = torch.softmax(weight.to(softmax_dtype(weight.dtype)), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v)
    return a.reshape(qkv.shape[0], -1, qkv.shape[2])


def forward_reference(qkv: torch.Tensor, num_heads: int, order: str):
    """(out, lse): the reference output and the logsumexp [B*H, T] of the scaled scores
    (fp32, float64 for float64 inputs)."""
    weight, v = _weights(qkv, num_heads, order)
    weight = weight.to(softmax_dtype(weight.dtype))
    lse = weight.logsumexp(dim=-1)
    weight = torch.softmax(weight, dim=-1).type(v.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v).reshape(qkv.shape[0], -1, qkv.shape[2])
    return out, lse


def backward_reference(dout, qkv, out, lse, num_heads: int, order: str) -> torch.Tensor:
    """dqkv from the saved logsumexp, the same math as the kernel: P = exp(S - lse),
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d)."""
    dtype = softmax_dtype(qkv.dtype)
    q, k, v = (t.to(dtype) for t in split_heads(qkv, num_heads, order))
    ch = q.shape[1]
    bh, length = lse.shape
    do = dout.reshape(bh, ch, length).to(dtype)
    o = out.reshape(bh, ch, length).to(dtype)
    scale = 1 / math.sqrt(ch)
    p = torch.exp(torch.einsum("bct,bcs->bts", q, k) * scale - lse.to(dtype)[:, :, None])
    dv = torch.einsum("bts,bct->bcs", p, do)
    dp = torch.einsum("bct,bcs->bts", do, v)
    ds = p * (dp - (do * o).sum(dim=1)[:, :, None]) * scale
    dq = torch.einsum("bts,bcs->bct", ds, k)
    dk = torch.einsum("bts,bct->bcs", ds, q)
    return merge_heads([g.to(qkv.dtype) for g in (dq, dk, dv)], num_heads, order)
