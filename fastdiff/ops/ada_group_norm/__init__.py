"""Fused (Ada)GroupNorm + SiLU: ``act((GN(x) * weight + bias) * (1 + scale) + shift)``."""

from .function import ada_group_norm
from .module import AdaGroupNormSiLU, GroupNorm, GroupNormSiLU
from .reference import ada_group_norm_reference

__all__ = ["ada_group_norm", "ada_group_norm_reference", "GroupNorm", "GroupNormSiLU", "AdaGroupNormSiLU"]
