"""``upsample_conv``: nearest 2x upsampling and a 3x3 conv as one stride-2 transposed conv.

Each output pixel of the upsampled conv reads a 3x3 window of the upsampled image, which holds
only 2x2 distinct input pixels; summing the taps that land on the same input pixel gives, per
output phase, a 2x2 kernel on the input, and the four phases together are one 4x4 kernel
applied with stride 2 as a transposed conv. That is 16 multiply-adds per input pixel and channel
pair instead of 36, and no upsampled tensor is made. The sums change only the rounding.

Where it runs: the CPU takes it for every dtype but fp16 (fp32, one thread: 1.04-2.35x faster
from 3 to 256 channels at batch 1-16, 1.7x and 2.4x on the bundled model's two upsamplers; PyTorch's
CPU fp16 transposed conv is slower than its conv). On a GPU cuDNN's
transposed-conv kernels are a different family from its convs, so the choice per shape is
measured inside ``fastdiff.ops.autotuning`` (the Sampler's warm-up); an unmeasured shape takes
the transposed conv. ``FASTDIFF_OPS=reference`` runs the reference.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from fastdiff.ops._backend import (
    OpInputError,
    autocast_available,
    check_tensor,
    force_reference,
    in_func_transform,
)
from fastdiff.ops._tuning import Choices, fastest, gpu_name, measuring
from fastdiff.ops.upsample_conv.reference import upsample_conv_reference

_CHOICES = Choices("upsample_conv")  # key -> "fold" | "reference"
# frozen weights on the CPU -> (copy of the weight, folded): sampling folds each weight once
_FOLDED = WeakIdKeyDictionary()


def fold_weight(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> the transposed conv's [C, O, 4, 4] kernel; the sums of 1-4 taps are
    taken in fp32 at least (one GEMM against the 9x16 0/1 matrix) and rounded once."""
    o, c = weight.shape[:2]
    dtype = torch.promote_types(weight.dtype, torch.float32)
    device = weight.device.type
    # autocast would run the GEMM in bf16/fp16 (and a frozen weight's fold is kept for later calls)
    off = torch.autocast(device, enabled=False) if autocast_available(device) else nullcontext()
    with off:
        # kernel row k = output row - 2 * input row + 1 sums the 3x3 rows landing on that input row:
        # output phase 0 reads input rows (i-1, i) with taps (0 | 1+2), phase 1 (i, i+1) with (0+1 | 2).
        # Built on the device from eye (no host data: a CUDA graph can capture it)
        e = torch.eye(3, dtype=dtype, device=weight.device)
        rows = torch.stack([e[2], e[1] + e[2], e[0] + e[1], e[0]])
        taps = torch.kron(rows, rows).T  # [9, 16]
        folded = weight.transpose(0, 1).reshape(c * o, 9).to(dtype) @ taps
    return folded.to(weight.dtype).reshape(c, o, 4, 4)


def _folded_weight(weight: torch.Tensor) -> torch.Tensor:
    """The folded kernel, kept per weight where nothing can invalidate it unseen: on the CPU
    (no CUDA graph holds it), outside compilation, torch.func transforms (a batched weight has no
    storage) and autograd; folded again whenever the weight's values differ from the copy kept
    with it. A version counter would miss writes through ``.data`` (hand-written SGD, EMA updates
    such as ``ema.data.lerp_(...)``), and comparing costs a fraction of folding."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()  # a kept fold would be a constant in the trace, not the weight's
        or in_func_transform()
        or weight.device.type != "cpu"
        or (weight.requires_grad and torch.is_grad_enabled())
    ):
        return fold_weight(weight)
    hit = _FOLDED.get(weight)
    if (
        hit is None
        or hit[0].dtype != weight.dtype
        or hit[0].shape != weight.shape
        or not torch.equal(hit[0], weight)
    ):
        # normal tensors even when first folded under inference_mode: a later call with an input
        # that needs a gradient saves the fold for backward, which an inference tensor cannot be
        with torch.inference_mode(False), torch.no_grad():
            hit = (weight.clone(), fold_weight(weight))
        _FOLDED[weight] = hit
    return hit[1]


def _folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv_transpose2d(x, _folded_weight(weight), bias, stride=2, padding=1)


def _key(x: torch.Tensor, weight: torch.Tensor) -> str:
    layout = "cl" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else "c"
    dtype = str(x.dtype).removeprefix("torch.")
    return f"{gpu_name(x.device)}|{tuple(x.shape)}|{weight.shape[0]}|{dtype}|{layout}"


def _use_fold(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if force_reference():
        return False
    if not x.is_cuda:
        return x.dtype != torch.float16
    if torch.compiler.is_compiling():
        return True
    key = _key(x, weight)
    choice = _CHOICES.get(key)
    if choice is None and measuring(x):
        paths = {"fold": _folded, "reference": upsample_conv_reference}
        with torch.no_grad():
            choice = fastest(list(paths), lambda name: paths[name](x, weight, bias))
        if choice is not None:
            _CHOICES.put(key, choice)
    return choice != "reference"


def fusable(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain same-padded 3x3 ``nn.Conv2d`` (no subclass forward, groups,
    dilation or padding mode), so ``upsample_conv`` with its weight computes what it computes."""
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` with padding 1: x [N, C, H, W], weight [O, C, 3, 3],
    bias [O] or None -> [N, O, 2H, 2W]. Differentiable in all three. Under ``torch.jit.script``
    (no checks or kept folds there) it is the reference."""
    if torch.jit.is_scripting():
        return upsample_conv_reference(x, weight, bias)
    return _dispatch(x, weight, bias)


def _dispatch(x, weight, bias):
    """upsample_conv's checks and dispatch, in a function TorchScript never compiles (it reads a
    function's whole source, f-strings and all, before it skips what scripting does not run)."""
    check_tensor("upsample_conv", "x", x)
    check_tensor("upsample_conv", "weight", weight)
    check_tensor("upsample_conv", "bias", bias, optional=True)
    # sizes are traced values in a torch.jit.trace, where a Python test of one warns (TracerWarning)
    # that the graph holds only its outcome on the example; the native ops check them anyway
    sized = not torch.jit.is_tracing()
    if x.dim() != 4 or weight.dim() != 4 or (sized and tuple(weight.shape[1:]) != (x.shape[1], 3, 3)):
        raise OpInputError(
            f"upsample_conv: x must be [N, C, H, W] and weight [O, C, 3, 3], got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if sized and bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise OpInputError(f"upsample_conv: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not x.is_floating_point():
        raise OpInputError(f"upsample_conv: x must be a floating-point tensor, got {x.dtype}")
    device = x.device.type
    autocasting = autocast_available(device) and torch.is_autocast_enabled(device)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.device != x.device or (t.dtype != x.dtype and not autocasting)):
            # what F.conv2d refuses too (autocast casts them), said in the caller's terms
            raise OpInputError(
                f"upsample_conv: {name} must be {x.dtype} on {x.device} as x is, got {t.dtype} on {t.device}"
            )
    if _use_fold(x, weight, bias):
        return _folded(x, weight, bias)
    return upsample_conv_reference(x, weight, bias)
