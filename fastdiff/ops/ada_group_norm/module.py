"""nn.Module front-ends of ada_group_norm, drop-in for ADM's GroupNorm32 (+ SiLU, + scale-shift)."""

from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from .function import ada_group_norm

# one call node under torch.fx.symbolic_trace (feature extractors, FX quantization), as nn.GroupNorm
# is a leaf there: traced into, the op's argument checks met a Proxy where a tensor goes
torch.fx.wrap("ada_group_norm")


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same constructor, parameters, state_dict) with fp32 statistics for any input
    dtype, like guided-diffusion's GroupNorm32, through the fused op."""

    __constants__ = [*nn.GroupNorm.__constants__, "activation"]  # for torch.jit.script
    activation: str | None = None

    def forward(self, x: Tensor) -> Tensor:
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
        w, b = self.weight, self.bias
        return ada_group_norm(x, self.num_groups, w, b, scale, shift, self.eps, self.activation)
