"""ADM attention through ``F.scaled_dot_product_attention``: the fast path where no Triton kernel
runs (the CPU, CUDA without triton).

SDPA reaches PyTorch's fused (flash / memory-efficient) kernels only for 4-D ``[B, H, T, d]``
inputs with d contiguous; 3-D inputs take its unfused math path, slower than ADM's einsum. So the
packed qkv is permuted into that layout once (one copy for q, k and v together), or not at all
where its channels are innermost already (a channels-last qkv). The fused
kernels' backward has no derivative of its own, so where a gradient may be taken eagerly the
call goes through :class:`_TwiceDifferentiable`, except inside :func:`first_order`; torch.compile,
torch.export, tracing and torch.func transforms see plain SDPA.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from fastdiff.ops._backend import in_func_transform
from fastdiff.ops.attention.reference import attention_reference


def _sdpa(qkv: torch.Tensor, num_heads: int, order: str) -> torch.Tensor:
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if order == "legacy":  # channels ordered (head, q/k/v, d)
        parts = qkv.reshape(bs, num_heads, 3, ch, length).permute(2, 0, 1, 4, 3)
    else:  # channels ordered (q/k/v, head, d)
        parts = qkv.reshape(bs, 3, num_heads, ch, length).permute(1, 0, 2, 4, 3)
    if parts.stride(-1) != 1:  # a channels-last qkv (UNetModel's CPU inference) has d contiguous already
        parts = parts.contiguous()
    q, k, v = parts.unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, d]
    return out.transpose(-1, -2).reshape(bs, num_heads * ch, length)


class _TwiceDifferentiable(torch.autograd.Function):
    """SDPA whose gradient can be differentiated again (a gradient penalty, ``create_graph=True``),
    as through guided-diffusion's einsums: the fused kernels' backward has no derivative (torch
    raised "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"), so a create_graph backward differentiates the reference instead. A plain
    backward runs SDPA's own, through the graph kept from the forward (recomputed for a second
    backward of a retained graph)."""

    @staticmethod
    def forward(ctx, qkv, num_heads, order):
        ctx.save_for_backward(qkv)
        ctx.num_heads, ctx.order = num_heads, order
        with torch.enable_grad():
            leaf = qkv.detach().requires_grad_()
            out = _sdpa(leaf, num_heads, order)
        ctx.inner = leaf, out
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        (qkv,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                out = attention_reference(qkv, ctx.num_heads, ctx.order)
            (dqkv,) = torch.autograd.grad(out, qkv, dout, create_graph=True)
            return dqkv, None, None
        inner, ctx.inner = ctx.inner, None  # its buffers go with this backward
        if inner is None:
            with torch.enable_grad():
                leaf = qkv.detach().requires_grad_()
                inner = leaf, _sdpa(leaf, ctx.num_heads, ctx.order)
        leaf, out = inner
        # the gradient of sum(out * dout) is dout exactly; passed as grad_outputs, a tensor made
        # torch.autograd.grad import sympy (0.3 s once a process, of a CPU sampling run's start)
        with torch.enable_grad():
            return torch.autograd.grad((out * dout).sum(), leaf)[0], None, None


_FIRST_ORDER = contextvars.ContextVar("fastdiff_attention_first_order", default=False)


@contextlib.contextmanager
def first_order():
    """Within: the gradients taken are not differentiated again (classifier guidance's gradient by
    x), so attention records SDPA's own backward in the caller's graph. _TwiceDifferentiable's
    inner graph and nested autograd.grad cost 8-10% of the bundled classifier's gradient at batch 1
    (one thread, torch 2.13); a create_graph backward in here is torch's error for SDPA's."""
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)


def sdpa_attention(qkv: torch.Tensor, num_heads: int, order: str) -> torch.Tensor:
    """[B, 3*H*d, T] -> [B, H*d, T]; same math as ``attention_reference`` (q.k / sqrt(d))."""
    if torch.jit.is_scripting():  # TorchScript has no autograd.Function: SDPA's own backward
        return _sdpa(qkv, num_heads, order)
    differentiable = torch.is_grad_enabled() and qkv.requires_grad
    traced = torch.compiler.is_compiling() or torch.jit.is_tracing() or in_func_transform()
    if differentiable and not traced and not _FIRST_ORDER.get():
        return _TwiceDifferentiable.apply(qkv, num_heads, order)
    return _sdpa(qkv, num_heads, order)
