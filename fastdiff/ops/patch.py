"""Swap fastdiff's fused layers into an existing network (guided-diffusion's own, or any torch
model with the same building blocks) without touching its weights or state_dict keys."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fastdiff.ops._backend import OpTypeError, autocast_available
from fastdiff.ops.ada_group_norm.module import AdaGroupNormSiLU, GroupNorm, GroupNormSiLU
from fastdiff.ops.attention.module import QKVAttention, QKVAttentionLegacy
from fastdiff.ops.upsample_conv import fusable, upsample_conv

_ATTENTION = {"QKVAttention": QKVAttention, "QKVAttentionLegacy": QKVAttentionLegacy}
_log = logging.getLogger(__name__)


_RESBLOCK_ATTRS = ("in_layers", "emb_layers", "out_layers", "skip_connection")


def outside_autocast(x: torch.Tensor):
    """A context in which ``x``'s device computes in the tensors' own dtypes even under
    ``torch.autocast``. ADM's mixed precision (guided-diffusion's fp16 mode) puts only the torso in
    fp16: the embeddings, the ResBlocks' embedding projections and the output head stay fp32. An
    fp16 output conv would overflow first: its weight gradient is a sum over every pixel."""
    device = x.device.type  # autocast exists for some device types only (not "meta")
    if autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def has_hooks(m: nn.Module) -> bool:
    """Whether m has hooks of its own: code that reads m's weights instead of calling it (a folded
    upsampler, a matmul in a conv's place) would skip them, so it calls m instead."""
    hooks = (m._forward_pre_hooks, m._forward_hooks, m._backward_pre_hooks, m._backward_hooks)
    return any(hooks)


def _foldable_conv(conv) -> bool:
    """:func:`fusable` and no hooks of its own: upsample_conv reads the weight without calling the
    conv, so its hooks would not run (torch.nn.utils.weight_norm's pre-hook among them: the
    weight would be the one the last call computed). Checked on every call: hooks added after
    patching count too."""
    return fusable(conv) and not has_hooks(conv)


def _is_nearest_upsample(m: nn.Module) -> bool:
    """guided-diffusion's (or fastdiff's) Upsample without its own conv, on 2-D images (and no
    hooks, which a folded upsampling would skip)."""
    named = type(m).__name__ == "Upsample" and not has_hooks(m)
    return named and getattr(m, "use_conv", None) is False and getattr(m, "dims", None) == 2


def adm_upsample_forward(up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ADM's Upsample forward for any module with guided-diffusion's Upsample attributes: with
    its 3x3 conv on 2-D images, one :func:`upsample_conv` (no upsampled tensor is made)."""
    if up.use_conv and up.dims == 2 and _foldable_conv(up.conv):
        return upsample_conv(x, up.conv.weight, up.conv.bias)
    if up.dims == 3:
        x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
    else:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
    return up.conv(x) if up.use_conv else x


def adm_resblock_forward(
    block: nn.Module, x: torch.Tensor, emb: torch.Tensor, *, fold_upsample: bool = True
) -> torch.Tensor:
    """ADM's ResBlock forward for any module with guided-diffusion's ResBlock attributes, on the
    fused ops: ``in_layers`` / ``out_layers`` hold a GroupNormSiLU (or, with scale-shift, an
    AdaGroupNormSiLU taking scale and shift) with ``nn.Identity`` in the SiLU's slot; an up
    block's upsampling and first conv are one :func:`upsample_conv` unless ``fold_upsample`` is
    False (``patch(..., upsample=False)``). improved-diffusion's ResBlock has no ``updown``."""
    if getattr(block, "updown", False):  # BigGAN up/down block: resample between norm+SiLU and conv
        *norm_act, conv = block.in_layers
        h = x
        for layer in norm_act:
            h = layer(h)
        if fold_upsample and _is_nearest_upsample(block.h_upd) and _foldable_conv(conv):
            h = upsample_conv(h, conv.weight, conv.bias)
        else:
            h = conv(block.h_upd(h))
        x = block.x_upd(x)
    else:
        h = block.in_layers(x)
    with outside_autocast(emb):
        emb_out = block.emb_layers(emb).to(h.dtype)
    if block.use_scale_shift_norm:
        scale, shift = emb_out.chunk(2, dim=1)
        h = block.out_layers[0](h, scale, shift)
        for layer in itertools.islice(block.out_layers, 2, None):
            h = layer(h)
    else:
        h = block.out_layers(h + emb_out[(...,) + (None,) * (h.dim() - 2)])
    return block.skip_connection(x) + h


def _is_adm_resblock(m: nn.Module) -> bool:
    """guided-diffusion's ResBlock by name and layout, or improved-diffusion's: its predecessor,
    the same block without BigGAN up/down (no ``updown``, ``h_upd``, ``x_upd``)."""
    if type(m).__name__ != "ResBlock" or not callable(getattr(m, "_forward", None)):
        return False
    updown = ("h_upd", "x_upd") if getattr(m, "updown", False) else ()
    return all(hasattr(m, a) for a in _RESBLOCK_ATTRS + updown)


def _is_scale_shift_resblock(m: nn.Module) -> bool:
    """guided-diffusion's (or improved-diffusion's) ResBlock with use_scale_shift_norm, not yet on
    the fused AdaGN."""
    return (
        _is_adm_resblock(m)
        and bool(getattr(m, "use_scale_shift_norm", False))
        and isinstance(m.out_layers, nn.Sequential)
        and len(m.out_layers) >= 2
        and (_is_foreign_group_norm(m.out_layers[0]) or type(m.out_layers[0]) is GroupNorm)
        and _is_silu(m.out_layers[1])
        and _swappable(m.out_layers[0])
        and _swappable(m.out_layers[1])
    )


def _fuse_resblock(block: nn.Module, upsample: bool) -> str:
    """The model-specific part of ``patch``: guided-diffusion's ResBlock applies its out norm
    alone, then ``* (1 + scale) + shift``, then SiLU; that chain becomes one AdaGroupNormSiLU and
    the block's ``_forward`` (which its ``forward`` calls, under checkpointing or not) becomes
    :func:`adm_resblock_forward`. Returns what it replaced, for the log."""
    old = type(block.out_layers[0]).__name__
    block.out_layers[0] = _group_norm(block.out_layers[0], AdaGroupNormSiLU)
    block.out_layers[1] = nn.Identity().train(block.out_layers[1].training)
    block._forward = _bound(adm_resblock_forward, block, fold_upsample=upsample)
    folds = upsample and getattr(block, "updown", False) and _is_nearest_upsample(block.h_upd)
    folds = folds and _foldable_conv(block.in_layers[-1])
    also = "; h_upd + in_layers' conv -> upsample_conv" if folds else ""
    return f"out_layers.0-1 ({old}, scale-shift, SiLU) -> AdaGroupNormSiLU{also}"


def _bound(forward, module: nn.Module, **kwargs):
    """``forward`` bound to ``module`` as a partial, not a bound method: a patched model still
    pickles (``torch.save(model)``), which a bound method of a module-level function does not."""
    return functools.partial(forward, module, **kwargs)


def _has_state_dict_hooks(m: nn.Module) -> bool:
    """Hooks on m's state_dict or its loading (``register_load_state_dict_pre_hook``: an old
    checkpoint's keys renamed as they load): a swapped-in module would save and load without them."""
    hooks = (m._state_dict_pre_hooks, m._state_dict_hooks)
    return any(hooks + (m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks))


def _is_compiled_alone(m: nn.Module) -> bool:
    """Whether ``m.compile(...)`` compiled m on its own (torch keeps the compiled call on it);
    a model compiled whole holds it on the model, which patch never swaps."""
    return getattr(m, "_compiled_call_impl", None) is not None


def _why_not_swappable(m: nn.Module) -> str | None:
    """Why m cannot be swapped out, or None: a module swapped out would take its hooks with it
    (its state_dict's too), or its compilation, whose options (mode, backend) no public API reads
    back to compile the new one alike; and a parametrized weight is computed on access, not a
    Parameter the new module could share."""
    if has_hooks(m) or _has_state_dict_hooks(m):
        return "it has hooks"
    if _is_compiled_alone(m):
        return "it is compiled on its own: patch first, then compile"
    return "it is parametrized" if parametrize.is_parametrized(m) else None


def _swappable(m: nn.Module) -> bool:
    return _why_not_swappable(m) is None


def _is_foreign_group_norm(m: nn.Module) -> bool:
    """An nn.GroupNorm to replace: fastdiff's own family subclasses it too (left be: patch is
    idempotent); a subclass with its own forward is replaced only when it is guided-diffusion's
    GroupNorm32 (fp32 statistics, what fastdiff's GroupNorm computes), since any other forward
    may compute something more; nor one with state of its own (a buffer, a Parameter or a module
    nn.GroupNorm lacks), which the replacement would drop from the state_dict."""
    return isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm) and _why_group_norm_kept(m) is None


def _why_group_norm_kept(m: nn.GroupNorm) -> str | None:
    """Why :func:`_is_foreign_group_norm` refuses m, an nn.GroupNorm not fastdiff's, or None."""
    if why := _why_not_swappable(m):
        return why
    if m._buffers or m._modules or set(m._parameters) - {"weight", "bias"}:
        return "it holds state nn.GroupNorm has not"
    if type(m).forward is not nn.GroupNorm.forward and type(m).__name__ != "GroupNorm32":
        return "its class has a forward of its own"
    return None


def _is_silu(m: nn.Module) -> bool:
    # old guided-diffusion versions ship their own ``SiLU`` module (x * sigmoid(x)); an nn.SiLU
    # subclass with its own forward (a Swish with a beta) computes something else
    if isinstance(m, nn.SiLU):
        return type(m).forward is nn.SiLU.forward
    return type(m).__name__ == "SiLU"


# what a bare nn.Module holds: a module with nothing more has no settings of its own
_BARE_MODULE = frozenset(vars(nn.Module()))


def _is_heads_in_batch_attention(m: nn.Module) -> bool:
    """improved-diffusion's QKVAttention: named so, without ``n_heads`` and with nothing of its
    own (no parameter, buffer, submodule or attribute). Its AttentionBlock folds the heads into
    the batch first, so it attends with one head over the [B*H, 3*d, T] it is given, q, k and v
    in turn: guided-diffusion's QKVAttentionLegacy at one head (both orders are one at one head).
    ``m.compile()``'s compiled call is no setting: :func:`_why_not_swappable` names it."""
    own = vars(m).keys() - _BARE_MODULE - {"_compiled_call_impl"}
    return type(m).__name__ == "QKVAttention" and not hasattr(m, "n_heads") and not own


def _attention_replacement(m: nn.Module) -> nn.Module | None:
    """fastdiff's module for m, an ADM attention module (None for any other or one kept)."""
    cls = _ATTENTION.get(type(m).__name__)
    if cls is None or isinstance(m, cls) or _why_attention_kept(m):
        return None
    new = QKVAttentionLegacy(1) if _is_heads_in_batch_attention(m) else cls(m.n_heads)
    return new.train(m.training)


def _why_attention_kept(m: nn.Module) -> str | None:
    """Why a module named as an ADM attention class stays, or None. Without ``n_heads``, and with
    settings of its own (not improved-diffusion's), it is another code's class of that name,
    whose head count is unknown."""
    if not (hasattr(m, "n_heads") or _is_heads_in_batch_attention(m)):
        return "it has no n_heads"
    return _why_not_swappable(m)


def _why_kept(m: nn.Module, group_norm: bool, attention: bool) -> str | None:
    """Why patch leaves m, a module of a kind it replaces (a GroupNorm or ADM attention module
    not fastdiff's), as it is, for the report; None for any other module."""
    if group_norm and isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm):
        return _why_group_norm_kept(m)
    cls = _ATTENTION.get(type(m).__name__)
    if attention and cls is not None and not isinstance(m, cls):
        return _why_attention_kept(m)
    return None


def _group_norm(old: nn.GroupNorm, cls: type[GroupNorm]) -> GroupNorm:
    """Same hyper-parameters, sharing the old Parameter objects (device, dtype, optimizer state
    and state_dict keys stay as they were). GroupNorm32's fp32 statistics are what fastdiff's
    GroupNorm computes for every input dtype; under autocast its output keeps the input's dtype
    for a GroupNorm32 (``keep_dtype``) and follows nn.GroupNorm's rule for an nn.GroupNorm."""
    keep_dtype = old.keep_dtype if isinstance(old, GroupNorm) else type(old).__name__ == "GroupNorm32"
    new = cls(old.num_groups, old.num_channels, old.eps, old.affine, device="meta", keep_dtype=keep_dtype)
    new.weight, new.bias = old.weight, old.bias
    return new.train(old.training)


def _is_foreign_upsample_conv(m: nn.Module) -> bool:
    """guided-diffusion's Upsample with a conv on 2-D images, its forward not yet rewritten
    (fastdiff's own Upsample passes too; rewriting it changes nothing)."""
    return (
        type(m).__name__ == "Upsample"
        and getattr(m, "use_conv", None) is True
        and getattr(m, "dims", None) == 2
        and _foldable_conv(getattr(m, "conv", None))
        and "forward" not in vars(m)
    )


def _is_foreign_up_resblock(m: nn.Module) -> bool:
    """guided-diffusion's BigGAN up ResBlock (nearest upsampling, then its 3x3 conv), its
    ``_forward`` not yet rewritten (by the scale-shift fusion above or an earlier patch). A
    scale-shift block whose out norm was left unfused (``group_norm=False``, hooks) keeps its own
    ``_forward``: :func:`adm_resblock_forward` passes scale and shift to the out norm."""
    return (
        _is_adm_resblock(m)
        and "_forward" not in vars(m)
        and bool(getattr(m, "updown", False))
        and (not getattr(m, "use_scale_shift_norm", False) or isinstance(m.out_layers[0], AdaGroupNormSiLU))
        and _is_nearest_upsample(m.h_upd)
        and isinstance(m.in_layers, nn.Sequential)
        and _foldable_conv(m.in_layers[-1])
    )


def _patch_children(
    module: nn.Module,
    group_norm: bool,
    attention: bool,
    upsample: bool,
    fuse: bool,
    path: str,
    done: list,
    kept: list,
) -> None:
    """Patch ``module`` (at ``path`` in the model) and its children, adding a (path, what,
    kind) to ``done`` for each replacement and a (path, kind, why) to ``kept`` for each module
    of a kind it replaces that it left as it was."""
    here = path or "(model)"
    if group_norm and _is_scale_shift_resblock(module):
        done.append((here, _fuse_resblock(module, upsample), AdaGroupNormSiLU.__name__))
    if upsample and _is_foreign_up_resblock(module):
        module._forward = _bound(adm_resblock_forward, module)
        done.append((here, "h_upd + in_layers' conv -> upsample_conv", "upsample_conv"))
    if upsample and _is_foreign_upsample_conv(module):
        module.forward = _bound(adm_upsample_forward, module)
        done.append((here, "upsampling + conv -> upsample_conv", "upsample_conv"))
    children = list(module.named_children())
    # only nn.Sequential's own forward surely feeds each child the previous child's output alone
    fuse = fuse and isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    # every slot: named_children() yields a module held in two slots once, so the child after a
    # GroupNorm there need not be the one its Sequential runs next
    slots = list(module._modules) if fuse else []  # (a ScriptModule's _modules does not iterate)
    for name, child in children:
        where = f"{path}.{name}" if path else name
        attn = _attention_replacement(child) if attention else None
        if attn is not None:
            setattr(module, name, attn)
            what = f"{type(child).__name__} -> fastdiff's"
            if not hasattr(child, "n_heads"):
                what += f" {type(attn).__name__}, 1 head (heads in the batch)"
            done.append((where, what, type(attn).__name__))
        elif group_norm and _is_foreign_group_norm(child):
            after = slots.index(name) + 1 if fuse else len(slots)
            nxt = module._modules[slots[after]] if after < len(slots) else None
            pair = nxt is not None and _is_silu(nxt) and _swappable(nxt)
            cls = GroupNormSiLU if pair else GroupNorm
            setattr(module, name, _group_norm(child, cls))
            what = f"{type(child).__name__} -> {cls.__name__}"
            if pair:
                # Identity keeps the Sequential's indices, hence its state_dict keys
                setattr(module, slots[after], nn.Identity().train(nxt.training))
                what += f" (with the {type(nxt).__name__} after it, now an Identity)"
            done.append((where, what, cls.__name__))
        else:
            if why := _why_kept(child, group_norm, attention):
                kept.append((where, type(child).__name__, why))
            # A scale-shift ResBlock not rewritten above (no guided-diffusion _forward) runs
            # out_layers[0] alone and out_layers[1:] after scale/shift: fusing SiLU there is wrong
            sliced = name == "out_layers" and bool(getattr(module, "use_scale_shift_norm", False))
            _patch_children(child, group_norm, attention, upsample, not sliced, where, done, kept)


def _holds_fastdiff_layers(model: nn.Module) -> bool:
    """Whether an earlier patch (or fastdiff's own network) put fastdiff's layers in ``model``."""
    rewritten = (adm_resblock_forward, adm_upsample_forward)
    for m in model.modules():
        if isinstance(m, (GroupNorm, QKVAttention, QKVAttentionLegacy)):
            return True
        for attr in ("forward", "_forward"):
            bound = vars(m).get(attr)
            if isinstance(bound, functools.partial) and bound.func in rewritten:
                return True
    return False


def patch(
    model: nn.Module, *, group_norm: bool = True, attention: bool = True, upsample: bool = True
) -> nn.Module:
    """Replace, in place, every nn.GroupNorm (guided-diffusion's GroupNorm32 and subclasses without
    their own forward included) by fastdiff's GroupNorm, a GroupNorm directly followed by SiLU in
    an nn.Sequential (not a subclass with its own forward) by one fused GroupNormSiLU (nn.Identity
    where the SiLU was), guided-diffusion's (or improved-diffusion's) scale-shift ResBlock's norm +
    scale-shift + SiLU by one AdaGroupNormSiLU, every ADM attention module (class named
    QKVAttention / QKVAttentionLegacy with ``n_heads``, or improved-diffusion's QKVAttention, which
    has none: one head on a batch its caller folded the heads into) by fastdiff's, and guided-diffusion's
    upsamplers (an Upsample with its 3x3 conv, a BigGAN up ResBlock's upsampling and first conv) by
    one ``upsample_conv``; ``group_norm``, ``attention`` and ``upsample`` = False each leave their
    part as it was. A GroupNorm, SiLU or attention module with hooks (forward, backward or
    state_dict ones), a parametrization or a compilation of its own (``m.compile()``; a model
    compiled whole runs the swapped layers) stays as it is, as does an upsampler whose conv (or
    BigGAN h_upd) has hooks. Returns ``model``. What it replaced, and which GroupNorms and
    attention modules it kept and why, is logged by the ``fastdiff.ops.patch`` logger: a line per
    layer at DEBUG, the counts at INFO; a model with nothing to replace and none of fastdiff's
    layers warns (a bare layer, a network of other norms), naming what it kept. Code that also
    calls a fused Sequential's GroupNorm on its own (``self.body[0](x)``) would get the SiLU too:
    patch such a network with ``group_norm=False``.

    Only children are swapped: a bare GroupNorm/attention passed as ``model`` is returned as is.
    """
    if not isinstance(model, nn.Module):
        raise OpTypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    for name, flag in (("group_norm", group_norm), ("attention", attention), ("upsample", upsample)):
        if not isinstance(flag, bool):  # "False" or "no" would switch the part on
            raise OpTypeError(f"patch: {name} must be True or False, got {flag!r}")
    done: list[tuple[str, str, str]] = []
    kept: list[tuple[str, str, str]] = []
    _patch_children(model, group_norm, attention, upsample, True, "", done, kept)
    name = type(model).__name__
    for where, what, _ in done:
        _log.debug("patch(%s): %s: %s", name, where, what)
    for where, kind, why in kept:
        _log.debug("patch(%s): %s: %s kept (%s)", name, where, kind, why)
    counts = collections.Counter(kind for _, _, kind in done)
    report = ", ".join(f"{n} {k}" for k, n in counts.items()) or "nothing replaced"
    kept_counts = collections.Counter((kind, why) for _, kind, why in kept)
    left = ", ".join(f"{n} {kind} ({why})" for (kind, why), n in kept_counts.items())
    _log.info("patch(%s): %s%s", name, report, f"; kept as they were: {left}" if left else "")
    if not done and not _holds_fastdiff_layers(model):
        warnings.warn(
            f"fastdiff.ops.patch: nothing to replace in {name} (it swaps a model's GroupNorms, ADM "
            "attention and upsamplers without hooks, parametrizations or compilations of their own,"
            " never the model itself)" + (f"; kept as they were: {left}" if left else ""),
            stacklevel=2,
        )
    return model
