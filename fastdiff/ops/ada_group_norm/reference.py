"""Plain PyTorch ada_group_norm: the semantics every kernel is tested against.

The forward follows guided-diffusion's chain exactly: ``GroupNorm32`` normalizes *and* applies
weight/bias in fp32 (or fp64) and casts to ``x.dtype``; the scale-shift and SiLU then run in
``x.dtype``. The fused kernels compute the whole chain in fp32 and round once, so they are at
least as accurate; tests measure both against this function evaluated in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import in_func_transform


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype every path keeps the group statistics in: fp32, fp64 for an fp64 x. An fp32 x
    is answered without torch.promote_types, a dispatched op (~1 us, every norm calls this)."""
    if x.dtype == torch.float32:
        return x.dtype
    return torch.promote_types(x.dtype, torch.float32)


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [N, C, 1, ...] so it broadcasts over x's trailing dims; ADM's [N, C, 1, ...]
    chunks as they are (a reshape to their own shape cost as much as the multiply-add)."""
    if t.dim() == x.dim():
        return t
    return t.reshape([t.shape[0], t.shape[1]] + [1] * (x.dim() - 2))


def _in_place(h: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``h op other`` may be written into h's storage: where the result keeps h's dtype
    (type promotion would make the in-place form round differently), outside torch.func
    transforms (under vmap, scale/shift may be batched where x, hence h, is not) and outside a
    torch.jit.trace (see :func:`_silu_in_place`)."""
    if other.dtype != h.dtype and torch.promote_types(h.dtype, other.dtype) != h.dtype:
        return False
    if torch.jit.is_scripting():  # TorchScript has no torch.func transforms
        return True
    return not (in_func_transform() or torch.jit.is_tracing())


def _silu_in_place(h: torch.Tensor) -> bool:
    """Where no gradient is recorded for h, and no torch.jit.trace runs: the trace's sanity check
    traces again under no_grad, where an in-place form picked by ``requires_grad`` made the two
    graphs differ (TracingCheckError for any network holding the norms, with trace's defaults)."""
    return not (h.requires_grad or torch.jit.is_tracing())


def ada_group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> torch.Tensor:
    """``act((GN(x) * weight + bias) * (1 + scale) + shift)``, GN in fp32 like GroupNorm32.
    Annotated for TorchScript, which compiles it where the modules are scripted."""
    sd = stat_dtype(x)
    if weight is None and bias is not None:
        # F.group_norm's CPU backward fails for a bias without a weight ("tensor does not have a
        # device", torch 2.13); a weight of ones is the same math
        weight = torch.ones_like(bias)
    # each cast only where the dtype changes: a no-op .to() costs a dispatch (~1 us, 5 a call)
    xs = x if x.dtype == sd else x.to(sd)
    if (
        not xs.is_contiguous()
        and (not xs.requires_grad or torch.jit.is_tracing())
        and ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))
    ):
        # F.group_norm's CPU backward crashes (segfault, torch 2.13) on a channels_last input that
        # needs no gradient while weight or bias does (frozen features, trained norms); a traced
        # graph may meet such an input (and its trace's check, run under no_grad, does)
        xs = xs.contiguous()
    w = weight if weight is None or weight.dtype == sd else weight.to(sd)
    b = bias if bias is None or bias.dtype == sd else bias.to(sd)
    if torch.jit.is_tracing():
        # F.group_norm is this op after a Python test of the sizes, traced values in a trace,
        # where the test warns (TracerWarning) that the graph holds only its outcome
        h = torch.group_norm(xs, num_groups, w, b, eps, torch.backends.cudnn.enabled)
    else:
        h = F.group_norm(xs, num_groups, w, b, eps)
    if h.dtype != x.dtype:
        h = h.to(x.dtype)
    # h is this function's own tensor (no autograd formula here needs it afterwards), so the
    # chain updates it in place: the same values, without an allocation per step (the CPU path).
    # Not where autograd would save the value an in-place op overwrites (SiLU's input for its
    # backward, h for a scale that needs a gradient): it would clone h first, a copy more than
    # the out-of-place op (the classifier's forward under guidance, 15 copies a guided step).
    if scale is not None:
        s = 1 + _per_channel(scale, x)
        h = h.mul_(s) if _in_place(h, s) and not s.requires_grad else h * s
    if shift is not None:
        t = _per_channel(shift, x)
        h = h.add_(t) if _in_place(h, t) else h + t
    if activation is not None:
        if activation != "silu":
            raise ValueError("activation must be 'silu' or None, got " + activation)
        h = F.silu(h, inplace=_silu_in_place(h))
    return _like(h if h.dtype == x.dtype else h.to(x.dtype), x)


def _like(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h laid out like x (channels_last in, channels_last out), copying only when it differs."""
    if h.stride() == x.stride():
        return h
    out = torch.empty_like(x)
    return h if h.stride() == out.stride() else out.copy_(h)


def group_stats_reference(x, num_groups, eps=1e-5):
    """(mean, rstd) per (sample, group), [N, G] in fp32 (fp64 for fp64 x): what backward needs."""
    n = x.shape[0]
    xg = x.to(stat_dtype(x)).reshape(n, num_groups, -1)
    var, mean = torch.var_mean(xg, dim=2, correction=0)
    return mean, torch.rsqrt(var + eps)


def ada_group_norm_backward_reference(dy, x, num_groups, weight, bias, scale, shift, mean, rstd, activation):
    """Closed-form gradients in fp32 (fp64 for fp64 x), the same math as the Triton backward.

    Written out instead of calling autograd because it runs inside the custom op, where autograd
    is off. Returns (dx, dweight, dbias, dscale, dshift), None where the input was None.
    """
    sd = stat_dtype(x)
    n, c = x.shape[0], x.shape[1]
    xs = x.to(sd).reshape(n, num_groups, c // num_groups, -1)
    g = dy.to(sd).reshape(xs.shape)

    def chan(t, default):
        if t is None:
            return torch.full((1, num_groups, c // num_groups, 1), default, dtype=sd, device=x.device)
        return t.to(sd).reshape(-1, num_groups, c // num_groups, 1)

    w, b, s1, t = chan(weight, 1.0), chan(bias, 0.0), 1 + chan(scale, 0.0), chan(shift, 0.0)
    xhat = (xs - mean.to(sd)[:, :, None, None]) * rstd.to(sd)[:, :, None, None]
    if activation == "silu":
        z = (xhat * w + b) * s1 + t
        sig = torch.sigmoid(z)
        g = g * sig * (1 + z * (1 - sig))
    a_sum = g.sum(3, keepdim=True)  # per (n, c): sum over space of dz
    b_sum = (g * xhat).sum(3, keepdim=True)  # per (n, c): sum of dz * xhat
    gamma = s1 * w
    m = xs.shape[2] * xs.shape[3]
    c1 = (gamma * a_sum).sum((2, 3), keepdim=True) / m
    c2 = (gamma * b_sum).sum((2, 3), keepdim=True) / m
    dx = torch.empty_like(x)  # keeps x's memory format (channels_last in, channels_last out)
    dx.copy_((rstd.to(sd)[:, :, None, None] * (g * gamma - c1 - xhat * c2)).reshape(x.shape))

    def out(t, val):
        return None if t is None else val.reshape(t.shape).to(t.dtype)

    a_nc, b_nc, s1_nc = a_sum.reshape(n, c), b_sum.reshape(n, c), s1.reshape(-1, c)
    return (
        dx,
        out(weight, (s1_nc * b_nc).sum(0)),
        out(bias, (s1_nc * a_nc).sum(0)),
        out(scale, w.reshape(1, c) * b_nc + b.reshape(1, c) * a_nc),
        out(shift, a_nc),
    )
