"""ADM attention on the [B, 3*H*d, T] qkv layout: flash-attention Triton kernels + reference."""

from fastdiff.ops.attention.function import attention
from fastdiff.ops.attention.module import QKVAttention, QKVAttentionLegacy
from fastdiff.ops.attention.reference import attention_reference

__all__ = ["attention", "attention_reference", "QKVAttention", "QKVAttentionLegacy"]
