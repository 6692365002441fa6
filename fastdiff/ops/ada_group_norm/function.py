"""ada_group_norm as the custom op ``fastdiff::ada_group_norm`` with autograd.

A torch.library custom op (with a fake implementation) is opaque to torch.compile, CUDA-graph
capture and torch.export, which trace through it instead of into the Triton launch. The backward
is a second custom op for the same reason. Dispatch happens per call: where no kernel runs,
``ada_group_norm`` is the reference's native-op chain (no custom op at all).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings

import torch
from torch import Tensor

from .._backend import (
    KERNEL_DTYPES,
    OpInputError,
    check_count,
    check_tensor,
    constant_result,
    force_reference,
    forward_ad_active,
    in_func_transform,
    notice_fallback,
    onnx_exporting,
    traced,
    triton_missing,
    use_triton,
    wants_triton,
)
from .channels_last import ada_group_norm_channels_last, is_channels_last
from .reference import (
    ada_group_norm_backward_reference,
    ada_group_norm_reference,
    group_stats_reference,
    stat_dtype,
)


@functools.cache
def _cuda_kernel():
    """The optional CUDA-extension kernel module (a separate layer), or None where it is absent."""
    if importlib.util.find_spec(f"{__package__}.cuda_kernel") is None:
        return None
    try:
        return importlib.import_module(f"{__package__}.cuda_kernel")
    except ImportError as e:  # a broken optional layer must not take the Triton path down with it
        warnings.warn(
            f"fastdiff.ops.ada_group_norm: cuda_kernel does not import ({e}); using Triton", stacklevel=2
        )
        return None


@constant_result
def _cuda_extension_ready() -> bool:
    """The CUDA extension is present and loads (a constant while torch.compile traces)."""
    ck = _cuda_kernel()
    return ck is not None and ck.available()


def _kernel_allowed(x: Tensor) -> bool:
    """Whether a kernel may take x at all. Not inside a torch.func transform, forward-mode AD or
    an ONNX export (see ``in_func_transform``, ``forward_ad_active``, ``onnx_exporting``). fp64
    runs the kernels only in the interpreter (to gradcheck their math); on CUDA it takes the
    reference, the kernels being built for fp16/bf16/fp32."""
    if torch.jit.is_tracing():  # a traced graph runs where fastdiff's custom ops are unknown (libtorch)
        return False
    if force_reference() or x.numel() == 0 or in_func_transform() or forward_ad_active() or onnx_exporting():
        return False
    return x.dtype in KERNEL_DTYPES or (x.dtype == torch.float64 and not x.is_cuda)


def _has_kernel(x: Tensor) -> bool:
    """Whether the custom op runs a kernel on x: decided without measuring or reading files, so
    torch.compile traces it (the compile engine's step reaches the kernels); which kernel runs
    is picked inside the op, on real tensors (:func:`_pick_kernel`)."""
    return _kernel_allowed(x) and (use_triton(x) or (x.is_cuda and _cuda_extension_ready()))


def _pick_kernel(x: Tensor, num_groups: int, has_scale: bool = False, activation: str | None = "silu"):
    """Kernel module for x (cuda_kernel where it is measured faster or Triton is absent, else
    triton_kernel), or None for the reference. The CUDA choice may be measured here."""
    if not _kernel_allowed(x):
        return None
    if x.is_cuda and _cuda_extension_ready():
        ck = _cuda_kernel()
        if not use_triton(x) or ck.preferred(x, num_groups, has_scale, activation):
            return ck
    if use_triton(x):
        from . import triton_kernel

        return triton_kernel
    return None


@torch.library.custom_op("fastdiff::ada_group_norm", mutates_args=())
def ada_group_norm_op(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
    activation: str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (y, mean, rstd); mean/rstd [N, G] are saved for the backward."""
    kernel = _pick_kernel(x, num_groups, scale is not None, activation)
    if kernel is not None:
        return kernel.forward(x, num_groups, weight, bias, scale, shift, eps, activation)
    y = ada_group_norm_reference(x, num_groups, weight, bias, scale, shift, eps, activation)
    return (y, *group_stats_reference(x, num_groups, eps))


@ada_group_norm_op.register_fake
def _(x, num_groups, weight, bias, scale, shift, eps, activation):
    stats = (x.shape[0], num_groups)
    sd = stat_dtype(x)
    return torch.empty_like(x), x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd)


@torch.library.custom_op("fastdiff::ada_group_norm_backward", mutates_args=())
def ada_group_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    activation: str | None,
    param_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias, dscale, dshift); an empty tensor stands for the grad of a None input,
    and for every parameter grad when ``param_grads`` is False (a gradient by x alone)."""
    kernel = _pick_kernel(x, num_groups, scale is not None, activation)
    args = (dy, x, num_groups, weight, bias, scale, shift, mean, rstd, activation)
    if kernel is not None:
        grads = kernel.backward(*args, param_grads=param_grads)
    else:
        grads = ada_group_norm_backward_reference(*args)
        grads = grads if param_grads else (grads[0], None, None, None, None)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@ada_group_norm_backward_op.register_fake
def _(dy, x, num_groups, weight, bias, scale, shift, mean, rstd, activation, param_grads):
    return (torch.empty_like(x),) + tuple(
        x.new_empty(0)
        if t is None or not param_grads
        else torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (weight, bias, scale, shift)
    )


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, eps, activation = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    needed = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6])  # x, weight, bias, scale, shift
    inputs = (x, weight, bias, scale, shift)
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, double backward): the backward op has no
        # derivative of its own, so the gradients come from the reference's graph, which has one
        wrt = [t for t, need in zip(inputs, needed) if t is not None and need]
        y = ada_group_norm_reference(x, ctx.num_groups, *inputs[1:], ctx.eps, ctx.activation)
        grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
        dx, dw, db, dsc, dsh = (
            next(grads) if t is not None and need else None for t, need in zip(inputs, needed)
        )
        return dx, None, dw, db, dsc, dsh, None, None
    grads = torch.ops.fastdiff.ada_group_norm_backward(
        dy, x, ctx.num_groups, weight, bias, scale, shift, mean, rstd, ctx.activation, any(needed[1:])
    )
    dx, dw, db, dsc, dsh = (
        g if t is not None and need else None for g, t, need in zip(grads, inputs, needed)
    )
    return dx, None, dw, db, dsc, dsh, None, None


torch.library.register_autograd("fastdiff::ada_group_norm", _backward, setup_context=_setup_context)


def _channels_last_inference(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the CPU's channels-last path takes x: a channels-last CPU tensor that no gradient
    is recorded for, outside the traced and transformed runs that must see the reference's ops."""
    if x.device.type != "cpu" or not is_channels_last(x) or force_reference():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return False
    return not (traced() or in_func_transform() or forward_ad_active())


def _flattenable(x: Tensor) -> bool:
    dims = [(sz, st) for sz, st in zip(x.shape[2:], x.stride()[2:]) if sz != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def _per_sample(t: Tensor | None, n: int, c: int) -> Tensor | None:
    """scale/shift as [N, C]: from [N, C] (itself, but in a torch.jit.trace, where n and c are
    traced values), [N, C, 1, ...] (ADM's emb_out chunks) or [1, C]."""
    if t is None or (not torch.jit.is_tracing() and t.shape == (n, c)):
        return t
    return t.reshape(t.shape[0], c).expand(n, c)


def _check_sizes(x: Tensor, num_groups: int, weight, bias, scale, shift) -> None:
    """The sizes ada_group_norm takes, in its terms. Not while torch.jit.trace runs: sizes are
    traced values there, and a Python test of one warns (TracerWarning) that the graph holds only
    its outcome on the example, which the native ops check again anyway."""
    n, c = x.shape[0], x.shape[1]
    if num_groups <= 0 or c % num_groups:
        raise OpInputError(f"ada_group_norm: {c} channels are not divisible into {num_groups} groups")
    if x.numel() == num_groups:  # one value per group and a batch of one
        # nn.GroupNorm's ValueError for a group of one value in a batch of one (its statistics
        # are the value itself and 0): the kernels returned the bias where torch refuses
        shape = list(x.shape)
        raise OpInputError(
            f"ada_group_norm: expected more than 1 value per group, got x {shape} in {c} groups"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (c,):
            raise OpInputError(f"ada_group_norm: {name} must be [{c}], got {list(t.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        trailing = math.prod(t.shape[2:]) != 1  # a size other than 1 after C (ADM's [N, C, 1, 1])
        if t.dim() < 2 or t.shape[1] != c or trailing or t.shape[0] not in (1, n):
            raise OpInputError(f"ada_group_norm: {name} must be [N, C] = [{n}, {c}], got {list(t.shape)}")


def ada_group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> Tensor:
    """``act((GN(x) * weight + bias) * (1 + scale) + shift)`` fused, statistics in fp32.

    x: [N, C, *] (NCHW, channels_last or any trailing dims; the output keeps x's memory format);
    weight/bias: [C] or None; scale/shift: [N, C] (ADM's AdaGN, use_scale_shift_norm) or None;
    activation: "silu" or None. Under ``torch.jit.script`` (no custom op, checks or kernels
    there) it is the reference, and a ``torch.jit.trace`` records the reference's native ops.
    """
    if torch.jit.is_scripting():
        return ada_group_norm_reference(x, num_groups, weight, bias, scale, shift, eps, activation)
    return _dispatch(x, num_groups, weight, bias, scale, shift, eps, activation)


def _dispatch(x, num_groups, weight, bias, scale, shift, eps, activation):
    """ada_group_norm's checks and dispatch, in a function TorchScript never compiles (it reads
    a function's whole source, f-strings and all, before it skips what scripting does not run)."""
    check_tensor("ada_group_norm", "x", x)
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
        check_tensor("ada_group_norm", name, t, optional=True)
    num_groups = check_count("ada_group_norm", "num_groups", num_groups)
    if x.dim() < 2:
        raise OpInputError(f"ada_group_norm: x must be [N, C, *], got {list(x.shape)}")
    if not x.is_floating_point():
        raise OpInputError(f"ada_group_norm: x must be a floating-point tensor, got {x.dtype}")
    if activation not in ("silu", None):
        raise OpInputError(f"ada_group_norm: activation must be 'silu' or None, got {activation!r}")
    if not torch.jit.is_tracing():
        _check_sizes(x, num_groups, weight, bias, scale, shift)
    device = x.device
    for t in (weight, bias, scale, shift):
        if t is not None and t.device != device:
            raise OpInputError(f"ada_group_norm: all tensors must be on {device}, got one on {t.device}")
    n, c = x.shape[0], x.shape[1]
    # A CPU tensor no kernel is asked for (FASTDIFF_OPS not triton) has none: its path is chosen
    # without _has_kernel's checks, which cost about as much as the norm itself at batch 1 (the
    # bundled model's forward calls the op 46 times).
    cpu_only = device.type == "cpu" and not wants_triton(x)
    if cpu_only or not _has_kernel(x):
        # No kernel here (the CPU, float64, FASTDIFF_OPS=reference): PyTorch's native group_norm
        # chain with its own autograd is the fastest exact path, and traces like any torch code.
        if not cpu_only and _kernel_allowed(x) and (why := triton_missing(x)):
            notice_fallback("ada_group_norm", why)
        # The reference takes scale/shift as they come: it broadcasts ADM's [N, C, 1, 1] chunks
        # as they are, where making them [N, C] and back cost 4 ops a call.
        path = ada_group_norm_reference
        if _channels_last_inference(x, weight, bias, scale, shift):
            path = ada_group_norm_channels_last
            scale, shift = _per_sample(scale, n, c), _per_sample(shift, n, c)
        return path(x, num_groups, weight, bias, scale, shift, float(eps), activation)
    scale, shift = _per_sample(scale, n, c), _per_sample(shift, n, c)
    if not _flattenable(x):  # a permuted layout the kernels cannot stride through
        x = x.contiguous()
    op = torch.ops.fastdiff.ada_group_norm
    return op(x, num_groups, weight, bias, scale, shift, float(eps), activation)[0]
