"""Nearest 2x upsampling + 3x3 conv (ADM's Upsample) as one transposed conv, + reference."""

from fastdiff.ops.upsample_conv.function import fusable, upsample_conv
from fastdiff.ops.upsample_conv.reference import upsample_conv_reference

__all__ = ["fusable", "upsample_conv", "upsample_conv_reference"]
