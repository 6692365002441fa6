"""ada_group_norm kernel layer backed by the CUDA C++ extension in csrc/ (same API as triton_kernel).

Neither backend wins everywhere, so on a GPU the backend for a shape is chosen by measurement,
ahead of time (``fastdiff.ops.autotuning``, the Sampler's warm-up, before any CUDA graph
capture; see ``fastdiff/ops/_tuning.py``); outside it an unmeasured shape runs Triton.
``FASTDIFF_GN_BACKEND=cuda|triton`` forces one.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .._backend import poison_outputs
from .._cuda_build import load_extension
from .._tuning import Choices, gpu_name, measuring, time_ms

_ACTIVATIONS = {None: False, "silu": True}
_CHOICES = Choices("ada_group_norm")  # key -> "cuda" | "triton"


@functools.cache
def available() -> bool:
    """CUDA present and the extension loads (built or JIT-compiled once per process)."""
    return torch.cuda.is_available() and load_extension() is not None


def _silu(activation: str | None) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"ada_group_norm: activation must be 'silu' or None, got {activation!r}")
    return _ACTIVATIONS[activation]


def forward(x, num_groups, weight, bias, scale, shift, eps, activation):
    """-> (y, mean, rstd); mean/rstd fp32 [N, G]; y same dtype/memory format as x."""
    ext = load_extension()
    y, mean, rstd = ext.ada_group_norm_forward(
        x, num_groups, weight, bias, scale, shift, float(eps), _silu(activation), poison=poison_outputs()
    )
    return y, mean, rstd


def backward(dy, x, num_groups, weight, bias, scale, shift, mean, rstd, activation, *, param_grads=True):
    """-> (dx, dweight, dbias, dscale, dshift), None where the input was None or ``param_grads``
    is False (the kernel computes them with dx; they are dropped)."""
    ext = load_extension()
    grads = tuple(
        ext.ada_group_norm_backward(
            dy,
            x,
            num_groups,
            weight,
            bias,
            scale,
            shift,
            mean,
            rstd,
            _silu(activation),
            poison=poison_outputs(),
        )
    )
    return grads if param_grads else (grads[0], None, None, None, None)


def _key(x: torch.Tensor, num_groups: int, has_scale: bool, activation: str | None) -> str:
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = "cl" if cl else "c"
    device = gpu_name(x.device) if x.is_cuda else x.device.type
    shape = "x".join(map(str, x.shape))
    dtype = str(x.dtype).removeprefix("torch.")
    return f"{device}|{shape}|g{num_groups}|{dtype}|{fmt}|scale={int(has_scale)}|{activation}"


def _measure(x: torch.Tensor, num_groups: int, has_scale: bool, activation: str | None) -> bool:
    """Time both forwards on x's shape; True when CUDA is at least as fast."""
    try:
        triton_kernel = importlib.import_module(f"{__package__}.triton_kernel")
    except ImportError:
        return True
    c = x.shape[1]
    x = x.detach()
    weight = torch.ones(c, device=x.device, dtype=torch.float32)
    bias = torch.zeros_like(weight)
    scale = shift = None
    if has_scale:
        scale = torch.zeros(x.shape[0], c, device=x.device, dtype=x.dtype)
        shift = torch.zeros_like(scale)
    args = (x, num_groups, weight, bias, scale, shift, 1e-5, activation)
    try:
        t_cuda = time_ms(lambda: forward(*args))
    except RuntimeError:
        return False
    try:
        t_triton = time_ms(lambda: triton_kernel.forward(*args))
    except Exception:  # a Triton compile/launch problem means CUDA wins by default
        return True
    return t_cuda <= t_triton


def preferred(
    x: torch.Tensor, num_groups: int, has_scale: bool = False, activation: str | None = "silu"
) -> bool:
    """Whether the CUDA kernel should run x's shape: forced by env, else the recorded choice
    (measured once per key inside ``autotuning``; Triton where none is recorded)."""
    forced = os.environ.get("FASTDIFF_GN_BACKEND", "").lower()
    if forced in ("cuda", "triton"):
        return forced == "cuda"
    if not available():
        return False
    key = _key(x, num_groups, has_scale, activation)
    choice = _CHOICES.get(key)
    if choice is None:
        if not measuring(x):
            return False
        choice = "cuda" if _measure(x, num_groups, has_scale, activation) else "triton"
        _CHOICES.put(key, choice)
    return choice == "cuda"
