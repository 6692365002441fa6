"""nn.Module front-ends of ada_group_norm, drop-in for ADM's GroupNorm32 (+ SiLU, + scale-shift)."""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from .._backend import autocast_available
from .function import ada_group_norm


def autocast_input(x: Tensor, keep_dtype: bool) -> Tensor:
    """x as nn.GroupNorm takes it under autocast: fp32 where autocast runs group_norm in fp32
    (its fp32 list on every device type but the CPU, whose list lacks group_norm), so the layer
    returns fp32 as nn.GroupNorm does there; the fused op alone, like any custom op, has no
    autocast rule. ``keep_dtype`` (GroupNorm32's rule) leaves x as it is, and so is what is no
    tensor, for the op to refuse in its terms."""
    if keep_dtype or not isinstance(x, Tensor):
        return x
    device = x.device.type
    if device == "cpu" or x.dtype not in (torch.float16, torch.bfloat16):
        return x
    return x.float() if autocast_available(device) and torch.is_autocast_enabled(device) else x


# one call node each under torch.fx.symbolic_trace (feature extractors, FX quantization), as
# nn.GroupNorm is a leaf there: traced into, the op's argument checks met a Proxy where a tensor goes
torch.fx.wrap("ada_group_norm")
torch.fx.wrap("autocast_input")


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same constructor, parameters, state_dict) with fp32 statistics for any input
    dtype, like guided-diffusion's GroupNorm32, through the fused op. Under autocast it returns
    the dtype nn.GroupNorm does (fp32 on CUDA, the input's on the CPU); ``keep_dtype=True``
    returns the input's everywhere, as GroupNorm32 does (fastdiff's networks; patch() gives it to
    a GroupNorm32 it replaces)."""

    __constants__ = [*nn.GroupNorm.__constants__, "activation", "keep_dtype"]  # for torch.jit.script
    activation: str | None = None
    keep_dtype = False  # what a layer pickled before it existed reads

    def __init__(self, *args, keep_dtype: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_dtype = keep_dtype

    def extra_repr(self) -> str:
        return super().extra_repr() + (", keep_dtype=True" if self.keep_dtype else "")

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript keeps the input's dtype (no autocast there)
            x = autocast_input(x, self.keep_dtype)
        w, b = self.weight, self.bias
        return ada_group_norm(x, self.num_groups, w, b, None, None, self.eps, self.activation)


class GroupNormSiLU(GroupNorm):
    """GroupNorm followed by SiLU in one pass (ADM's ``normalization(ch), SiLU()`` pairs)."""

    activation = "silu"


class AdaGroupNormSiLU(GroupNorm):
    """``SiLU(GroupNorm(x) * (1 + scale) + shift)``: ADM ResBlock out_norm with use_scale_shift_norm.

    ``forward(x, scale, shift)``: scale/shift [N, C] (or [N, C, 1, 1], ADM's ``emb_out.chunk(2, 1)``).
    """

    activation = "silu"

    def forward(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        if not torch.jit.is_scripting():
            x = autocast_input(x, self.keep_dtype)
        w, b = self.weight, self.bias
        return ada_group_norm(x, self.num_groups, w, b, scale, shift, self.eps, self.activation)
