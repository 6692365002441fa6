"""Fused kernels as drop-in PyTorch layers, usable in any network.

Each op runs its Triton kernel on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``) and its plain PyTorch reference everywhere else, so importing this
package needs neither triton nor CUDA.
"""

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
    "patch",
]
