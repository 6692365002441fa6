"""``attention`` as a torch.library custom op, so torch.compile, CUDA graphs and torch.export
see one opaque node with a fake (meta) implementation and a registered backward.

Dispatch per call: the Triton kernels for fp16/bf16/fp32 wherever ``use_triton`` says so
(CUDA, or CPU under ``TRITON_INTERPRET=1``: no silent fallback there); otherwise PyTorch's fused
SDPA kernels (``sdpa.py``, plain autograd, no custom op); float64 takes the custom op's reference
(the kernels' softmax statistics are fp32), and ``FASTDIFF_OPS=reference`` the reference's plain
ops, whose autograd graph is the original's (the op's closed-form backward rounds otherwise).
Inside a ``torch.func`` transform no custom op runs (``in_func_transform``); under forward-mode
AD the reference does (``forward_ad_active``).
"""

from __future__ import annotations

import torch

from fastdiff.ops._backend import (
    KERNEL_DTYPES,
    OpInputError,
    autocast_available,
    check_count,
    check_tensor,
    force_reference,
    forward_ad_active,
    in_func_transform,
    nested_func_grad,
    notice_fallback,
    triton_missing,
    use_triton,
    wants_triton,
)
from fastdiff.ops.attention.reference import (
    ORDERS,
    attention_reference,
    backward_reference,
    forward_reference,
    softmax_dtype,
)
from fastdiff.ops.attention.sdpa import sdpa_attention

# Heads wider than 256 channels go to SDPA: the kernels keep [rows, d] fp32 accumulators in
# registers, which at a 512-channel block spill with every tile that still feeds the tensor cores
# (.ci/check_triton_compile.py: 16-bit dQ up to 1264 B, fp32 dK/dV 536 B where T % 16 != 0).
# So does a single position (T = 1, attention at a 1x1 level, whose output is v): compiled for
# T = 1, every stride is the constant 1 and dK/dV spills even at the smallest tiles.
_MAX_HEAD_DIM = 256


def _kernel_for(qkv: torch.Tensor, num_heads: int) -> bool:
    if qkv.numel() == 0 or qkv.dtype not in KERNEL_DTYPES or not use_triton(qkv):
        return False
    return qkv.shape[1] // (3 * num_heads) <= _MAX_HEAD_DIM and qkv.shape[2] > 1


@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _attention(qkv: torch.Tensor, num_heads: int, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_for(qkv, num_heads):
        from fastdiff.ops.attention import triton_kernel

        return triton_kernel.forward(qkv, num_heads, order)
    return forward_reference(qkv, num_heads, order)


@_attention.register_fake
def _(qkv, num_heads, order):
    bs, width, length = qkv.shape
    out = qkv.new_empty((bs, width // 3, length))
    return out, qkv.new_empty((bs * num_heads, length), dtype=softmax_dtype(qkv.dtype))


@torch.library.custom_op("fastdiff::attention_backward", mutates_args=())
def _attention_backward(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int, order: str
) -> torch.Tensor:
    if _kernel_for(qkv, num_heads):
        from fastdiff.ops.attention import triton_kernel

        return triton_kernel.backward(dout, qkv, out, lse, num_heads, order)
    return backward_reference(dout, qkv, out, lse, num_heads, order)


@_attention_backward.register_fake
def _(dout, qkv, out, lse, num_heads, order):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, order = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.order = num_heads, order
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the backward op has no derivative of its own, so
        # the gradient comes from the reference's graph, which has one
        (dqkv,) = torch.autograd.grad(
            attention_reference(qkv, ctx.num_heads, ctx.order), qkv, dout, create_graph=True
        )
        return dqkv, None, None
    return _attention_backward(dout, qkv, out, lse, ctx.num_heads, ctx.order), None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(qkv: torch.Tensor, num_heads: int, order: str = "new") -> torch.Tensor:
    """ADM attention: qkv [B, 3*H*d, T] -> [B, H*d, T], softmax(q.k / sqrt(d)) v per head.

    ``order="new"`` splits q, k, v first, then heads (QKVAttention); ``"legacy"`` splits heads
    first, each head's channels holding q, k, v (QKVAttentionLegacy). Under ``torch.jit.script``
    (no custom op, checks or kernels there) it is SDPA, and a ``torch.jit.trace`` records
    SDPA's or the reference's native ops.
    """
    if torch.jit.is_scripting():
        return sdpa_attention(qkv, num_heads, order)
    return _dispatch(qkv, num_heads, order)


def _dispatch(qkv, num_heads, order):
    """attention's checks and dispatch, in a function TorchScript never compiles (it reads a
    function's whole source, f-strings and all, before it skips what scripting does not run)."""
    check_tensor("attention", "qkv", qkv)
    num_heads = check_count("attention", "num_heads", num_heads)
    if order not in ORDERS:
        raise OpInputError(f"attention: order must be one of {ORDERS}, got {order!r}")
    if num_heads < 1:
        raise OpInputError(f"attention: num_heads must be at least 1, got {num_heads}")
    # sizes are traced values in a torch.jit.trace, where a Python test of one warns (TracerWarning)
    # that the graph holds only its outcome on the example; the native ops check them anyway
    if qkv.dim() != 3 or (not torch.jit.is_tracing() and qkv.shape[1] % (3 * num_heads)):
        raise OpInputError(f"attention: qkv must be [B, 3*{num_heads}*d, T], got shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise OpInputError(f"attention: qkv must be a floating-point tensor, got {qkv.dtype}")
    if forward_ad_active():  # neither the custom op nor SDPA's fused kernels have a forward derivative
        return attention_reference(qkv, num_heads, order)
    # plain PyTorch inside a torch.func transform, which cannot see the custom op's autograd, and
    # in a torch.jit.trace, whose graph runs where fastdiff's custom ops are unknown (libtorch)
    if in_func_transform() or torch.jit.is_tracing():
        plain = force_reference() or nested_func_grad()
        return (attention_reference if plain else sdpa_attention)(qkv, num_heads, order)
    if force_reference():  # the original's own ops, and autograd's graph of them for the gradient
        return attention_reference(qkv, num_heads, order)
    if qkv.dtype != torch.float64 and not wants_triton(qkv):
        # no kernel asked for (the CPU): SDPA, without use_triton's and triton_missing's checks
        return sdpa_attention(qkv, num_heads, order)
    if _kernel_for(qkv, num_heads) or qkv.dtype == torch.float64:
        device = qkv.device.type
        if qkv.dtype == torch.float32 and autocast_available(device) and torch.is_autocast_enabled(device):
            # a custom op has no autocast rule: cast as SDPA and the reference's matmuls are cast
            qkv = qkv.to(torch.get_autocast_dtype(device))
        return _attention(qkv, num_heads, order)[0]
    if qkv.dtype in KERNEL_DTYPES and (why := triton_missing(qkv)):
        notice_fallback("attention", why, "PyTorch's SDPA")
    return sdpa_attention(qkv, num_heads, order)
