"""Swap fastdiff's fused layers into an existing network (guided-diffusion's own, or any torch
model with the same building blocks) without touching its weights or state_dict keys."""

from __future__ import annotations

from torch import nn

from fastdiff.ops.ada_group_norm.module import GroupNorm, GroupNormSiLU
from fastdiff.ops.attention.module import QKVAttention, QKVAttentionLegacy

_ATTENTION = {"QKVAttention": QKVAttention, "QKVAttentionLegacy": QKVAttentionLegacy}


def _is_foreign_group_norm(m: nn.Module) -> bool:
    # fastdiff's GroupNorm family subclasses nn.GroupNorm too: leave it be (patch is idempotent)
    return isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm)


def _is_silu(m: nn.Module) -> bool:
    # old guided-diffusion versions ship their own ``SiLU`` module (x * sigmoid(x))
    return isinstance(m, nn.SiLU) or type(m).__name__ == "SiLU"


def _attention_class(m: nn.Module):
    cls = _ATTENTION.get(type(m).__name__)
    if cls is None or isinstance(m, cls) or not hasattr(m, "n_heads"):
        return None
    return cls


def _group_norm(old: nn.GroupNorm, cls: type[GroupNorm]) -> GroupNorm:
    """Same hyper-parameters, sharing the old Parameter objects (device, dtype, optimizer state
    and state_dict keys stay as they were). GroupNorm32's fp32 statistics and input-dtype output
    are what fastdiff's GroupNorm does for every input dtype, as does nn.GroupNorm's output dtype."""
    new = cls(old.num_groups, old.num_channels, old.eps, old.affine, device="meta")
    new.weight, new.bias = old.weight, old.bias
    return new.train(old.training)


def _patch_children(module: nn.Module, group_norm: bool, attention: bool, fuse: bool) -> None:
    children = list(module.named_children())
    fuse = fuse and isinstance(module, nn.Sequential)
    for i, (name, child) in enumerate(children):
        attn = _attention_class(child) if attention else None
        if attn is not None:
            setattr(module, name, attn(child.n_heads))
        elif group_norm and _is_foreign_group_norm(child):
            pair = fuse and i + 1 < len(children) and _is_silu(children[i + 1][1])
            setattr(module, name, _group_norm(child, GroupNormSiLU if pair else GroupNorm))
            if pair:
                # Identity keeps the Sequential's indices, hence its state_dict keys
                setattr(module, children[i + 1][0], nn.Identity())
        else:
            # ADM's ResBlock with use_scale_shift_norm runs out_layers[0] (the norm) alone and
            # out_layers[1:] after scale/shift: fusing SiLU into out_layers[0] would be wrong there
            sliced = name == "out_layers" and bool(getattr(module, "use_scale_shift_norm", False))
            _patch_children(child, group_norm, attention, not sliced)


def patch(model: nn.Module, *, group_norm: bool = True, attention: bool = True) -> nn.Module:
    """Replace, in place, every nn.GroupNorm (subclasses such as GroupNorm32 included) by
    fastdiff's GroupNorm, a GroupNorm directly followed by SiLU in an nn.Sequential by one fused
    GroupNormSiLU (nn.Identity where the SiLU was), and every ADM attention module (class named
    QKVAttention / QKVAttentionLegacy with ``n_heads``) by fastdiff's. Returns ``model``.

    Only children are swapped: a bare GroupNorm/attention passed as ``model`` is returned as is.
    """
    _patch_children(model, group_norm, attention, fuse=True)
    return model
