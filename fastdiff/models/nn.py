"""Small building blocks shared by the ADM networks, and ``InDtype``, which runs one in a low
precision between fp32 inputs and outputs (the Sampler's and the exported graph's form).

The blocks keep guided-diffusion's numerics (fp32 GroupNorm statistics, through ``fastdiff.ops``; the
sinusoidal embedding's exact frequencies) so released checkpoints reproduce their outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastdiff.ops import GroupNorm, GroupNormSiLU


def normalization(channels: int, silu: bool = False) -> GroupNorm:
    """ADM's normalization layer (32 groups, fp32 statistics), fused with the SiLU after it when
    ``silu``: the slot of that SiLU then holds ``nn.Identity`` so module indices (and state_dict
    keys) stay guided-diffusion's. Its output keeps the input's dtype under autocast too, as
    GroupNorm32's does."""
    return (GroupNormSiLU if silu else GroupNorm)(32, channels, keep_dtype=True)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D/2D/3D convolution (attention uses 1D convs as per-position linears)."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D/2D/3D average pool (the non-conv downsampler)."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so residual branches start as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps: cos half, then sin half."""
    half = dim // 2
    # Built on the timesteps' device: no host->device copy per step (and nothing to break capture).
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def maybe_checkpoint(
    fn: Callable[..., torch.Tensor], *args: torch.Tensor, enabled: bool, preserve_rng_state: bool = True
) -> torch.Tensor:
    """Run ``fn`` under non-reentrant gradient checkpointing when enabled and grads are recorded.
    ``preserve_rng_state=False`` recomputes from the random state of the backward pass (new
    dropout masks, drawn from the global stream), as guided-diffusion's own checkpointing does."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)
    return fn(*args)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module: nn.Module) -> None:
    """Cast a conv's weights to fp16 (as guided-diffusion's fp16 torso; norms and linears stay fp32)."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module: nn.Module) -> None:
    """Undo :func:`convert_module_to_f16`."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


class InDtype(nn.Module):
    """Runs a network cast to a low-precision dtype on fp32 inputs and returns fp32, so the
    sampler's arithmetic (and the classifier gradient w.r.t. x) stays in fp32."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype
        self.num_classes = getattr(net, "num_classes", None)

    def forward(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        # Image-like conditioning (an upsampler's low_res) joins x in the network: the same dtype.
        kwargs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
        return self.net(x.to(self.dtype), t, **kwargs).float()
