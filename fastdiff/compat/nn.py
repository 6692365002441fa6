"""guided-diffusion's ``nn`` helpers, from fastdiff's own building blocks.

``normalization`` and ``GroupNorm32`` are fastdiff's GroupNorm (fp32 statistics, fused kernels);
``checkpoint`` is non-reentrant torch checkpointing that recomputes from the backward pass's
random state, as the original's hand-written autograd function, ``CheckpointFunction`` (not
provided), does.
"""

from __future__ import annotations

from torch.nn import Linear as linear  # noqa: N813 (the original's name)
from torch.nn import SiLU

from ..diffusion.gaussian import mean_flat
from ..models.nn import avg_pool_nd, conv_nd, maybe_checkpoint, normalization, timestep_embedding, zero_module
from ..ops import GroupNorm
from ..training.ema import update_ema as _update_ema

__all__ = [
    "GroupNorm32",
    "SiLU",
    "avg_pool_nd",
    "checkpoint",
    "conv_nd",
    "linear",
    "mean_flat",
    "normalization",
    "scale_module",
    "timestep_embedding",
    "update_ema",
    "zero_module",
]


class GroupNorm32(GroupNorm):
    """The original's GroupNorm32: fastdiff's GroupNorm whose output keeps the input's dtype
    under autocast too (``keep_dtype``), as the original's ``.type(x.dtype)`` does."""

    def __init__(self, *args, keep_dtype: bool = True, **kwargs):
        super().__init__(*args, keep_dtype=keep_dtype, **kwargs)


def update_ema(target_params, source_params, rate=0.99) -> None:
    """``target = rate * target + (1 - rate) * source`` in place (the original's default rate)."""
    _update_ema(target_params, source_params, rate)


def scale_module(module, scale):
    """Multiply a module's parameters by ``scale`` (in place); returns the module."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def checkpoint(func, inputs, params, flag):
    """``func(*inputs)``, recomputed in the backward pass instead of stored when ``flag``, from
    the random state of that moment as the original's (``params`` is the original's
    bookkeeping; torch's checkpointing finds them itself)."""
    return maybe_checkpoint(func, *inputs, enabled=flag, preserve_rng_state=False)
