"""Fused kernels as drop-in PyTorch layers, usable in any network.

Each op runs its Triton kernel on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``) and its plain PyTorch reference everywhere else, so importing this
package needs neither triton nor CUDA. Where a kernel's best configuration depends on the GPU
(GroupNorm's backend, attention tiles), run a first call inside ``with autotuning():`` to measure
it once, before any CUDA graph capture; ``fastdiff.Sampler`` does so in its warm-up.
"""

from ._tuning import autotuning
from .ada_group_norm import AdaGroupNormSiLU, GroupNorm, GroupNormSiLU, ada_group_norm
from .attention import QKVAttention, QKVAttentionLegacy, attention
from .patch import patch

__all__ = [
    "AdaGroupNormSiLU",
    "GroupNorm",
    "GroupNormSiLU",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ada_group_norm",
    "attention",
    "autotuning",
    "patch",
]
