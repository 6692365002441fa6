"""2x2 average pooling with stride 2 (ADM's Downsample without a conv), + reference."""

from fastdiff.ops.avg_pool2x.function import avg_pool2x
from fastdiff.ops.avg_pool2x.reference import avg_pool2x_reference

__all__ = ["avg_pool2x", "avg_pool2x_reference"]
