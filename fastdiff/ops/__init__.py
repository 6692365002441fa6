"""Fused kernels as drop-in PyTorch layers, usable in any network.

Each op runs its Triton kernel on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``) and PyTorch's fastest exact path everywhere else, so importing this
package needs neither triton nor CUDA; ``upsample_conv`` (ADM's upsampler as one transposed
conv) is PyTorch calls alone. Where the best choice depends on the GPU (GroupNorm's backend,
attention tiles, the upsampler's path), run a first call inside ``with autotuning():`` to
measure it once, before any CUDA graph capture; ``fastdiff.Sampler`` does so in its warm-up.
"""

from ._tuning import autotuning
from .ada_group_norm import AdaGroupNormSiLU, GroupNorm, GroupNormSiLU, ada_group_norm
from .attention import QKVAttention, QKVAttentionLegacy, attention
from .avg_pool2x import avg_pool2x
from .patch import patch
from .upsample_conv import upsample_conv

__all__ = [
    "AdaGroupNormSiLU",
    "GroupNorm",
    "GroupNormSiLU",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ada_group_norm",
    "attention",
    "autotuning",
    "avg_pool2x",
    "patch",
    "upsample_conv",
]
