"""guided-diffusion's ``unet`` names: networks built by hand with the original's arguments, the
attention modules and helpers its namespace holds, and its thop hook."""

from __future__ import annotations

import importlib

import pytest
import torch
from builders import build_classifier, build_superres, build_unet
from test_compat_scripts import ORIGINAL as CHECKOUT
from test_compat_scripts import needs_original

from fastdiff import ops
from fastdiff.compat import fp16_util, nn, unet
from fastdiff.config import ConfigError
from fastdiff.models import unet as fastdiff_unet
from fastdiff.ops.attention import module as attention_module

ORIGINAL = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), num_head_channels=32)


def _same(a: torch.nn.Module, b: torch.nn.Module, *inputs) -> None:
    assert a.config == b.config and list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a.eval()(*inputs), b.eval()(*inputs))


def test_the_original_arguments_build_the_flags_network():
    # attention_resolutions are downsample factors here (the original's), pixels in the flags
    a = unet.UNetModel(
        32,
        3,
        out_channels=6,
        attention_resolutions=(2,),
        num_classes=10,
        use_scale_shift_norm=True,
        **ORIGINAL,
    )
    b = build_unet(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", num_head_channels=32,
        attention_resolutions="16", class_cond=True, num_classes=10, learn_sigma=True, num_heads=1,
    )  # fmt: skip
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 900]), torch.tensor([1, 7])
    _same(a, b, x, t, y)
    assert isinstance(a, fastdiff_unet.UNetModel) and a.attention_resolutions == (2,)

    classifier = {**ORIGINAL, "num_head_channels": 64}  # the classifier flags' fixed head width
    c = unet.EncoderUNetModel(
        32, 3, out_channels=10, attention_resolutions=(4,), pool="attention", **classifier
    )
    d = build_classifier(
        image_size=32, classifier_width=32, classifier_depth=1, channel_mult="1,2", num_classes=10,
        classifier_attention_resolutions="8", classifier_use_scale_shift_norm=False,
        classifier_resblock_updown=False,
    )  # fmt: skip
    _same(c, d, x, t)

    # the keywords left out take the original UNetModel's defaults (no scale-shift norm, one head),
    # not the config's: its emb_layers had twice the rows the original's checkpoints hold
    e = unet.SuperResModel(32, 3, out_channels=3, attention_resolutions=(2,), **ORIGINAL)
    assert e.in_channels == 6 and e.input_blocks[0][0].in_channels == 6
    f = build_superres(
        large_size=32, small_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        num_head_channels=32, attention_resolutions="16", use_scale_shift_norm=False, num_heads=1,
    )  # fmt: skip
    _same(e, f, x, t, torch.randn(2, 3, 8, 8))


def test_an_output_fastdiff_cannot_make_is_refused():
    with pytest.raises(ConfigError, match="out_channels 5"):
        unet.UNetModel(32, 3, out_channels=5, attention_resolutions=(2,), **ORIGINAL)


def test_the_attention_and_helpers_are_fastdiffs_own():
    """One implementation each: the network's attention modules are the classes unet names, so
    ``custom_ops={unet.QKVAttention: ...}`` finds them."""
    assert unet.QKVAttention is ops.QKVAttention and unet.QKVAttentionLegacy is ops.QKVAttentionLegacy
    for name in "normalization timestep_embedding conv_nd linear zero_module checkpoint avg_pool_nd".split():
        assert getattr(unet, name) is getattr(nn, name), name
    assert unet.convert_module_to_f16 is fp16_util.convert_module_to_f16
    for new_order, cls in ((True, unet.QKVAttention), (False, unet.QKVAttentionLegacy)):
        model = unet.UNetModel(
            16, 3, out_channels=3, attention_resolutions=(2,), use_new_attention_order=new_order, **ORIGINAL
        )
        assert {
            type(m) for m in model.modules() if isinstance(m, ops.QKVAttention | ops.QKVAttentionLegacy)
        } == {cls}


def _thop_count(module: torch.nn.Module, y: torch.Tensor, hook) -> float:
    """What thop adds for ``module`` given output ``y``: it keeps a float64 ``total_ops`` buffer."""
    module.register_buffer("total_ops", torch.zeros(1, dtype=torch.float64))
    hook(module, (None,), y)
    return module.total_ops.item()


def test_count_flops_attn_counts_as_the_original():
    # One implementation: the ops' own, and the attention classes' thop hooks (as the original's)
    assert unet.count_flops_attn is attention_module.count_flops_attn
    assert unet.QKVAttention.count_flops is unet.QKVAttentionLegacy.count_flops is unet.count_flops_attn
    # The original reads the shape of y[0] (thop passes the output): here [2, 64, 16] -> 64, 16.
    assert _thop_count(torch.nn.Module(), torch.zeros(2, 64, 16), unet.count_flops_attn) == 2 * 64 * 16
    assert _thop_count(torch.nn.Module(), torch.zeros(3, 8, 4, 5), unet.count_flops_attn) == 2 * 8 * 5**2 * 4
    # As a forward hook on the network's attention (as thop registers it).
    model = unet.UNetModel(16, 3, out_channels=3, attention_resolutions=(2,), **ORIGINAL)
    attention = next(m for m in model.modules() if isinstance(m, unet.QKVAttentionLegacy))
    attention.register_buffer("total_ops", torch.zeros(1, dtype=torch.float64))
    attention.register_forward_hook(unet.count_flops_attn)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert attention.total_ops.item() == 2 * 64 * 64  # y[0]: 64 channels at 8x8 positions


@needs_original
def test_count_flops_attn_is_the_originals(monkeypatch):
    monkeypatch.syspath_prepend(CHECKOUT)
    original = importlib.import_module("guided_diffusion.unet")
    for shape in ((2, 64, 16), (3, 8, 4, 5)):
        y = torch.randn(shape)
        want = _thop_count(torch.nn.Module(), y, original.count_flops_attn)
        assert _thop_count(torch.nn.Module(), y, unet.count_flops_attn) == want
        for name in ("QKVAttention", "QKVAttentionLegacy"):
            ours, theirs = getattr(unet, name)(2), getattr(original, name)(2)
            assert _thop_count(ours, y, ours.count_flops) == _thop_count(theirs, y, theirs.count_flops)


# Networks built by hand with the original's arguments that fastdiff once refused, though the
# original builds and runs them: (class, keyword arguments).
HAND_BUILT = {
    # the classifier has no up path: num_heads_upsample builds nothing (3 heads divide no width)
    "classifier_heads_upsample": (
        "EncoderUNetModel",
        dict(num_head_channels=-1, num_heads=2, num_heads_upsample=3, attention_resolutions=(2,)),
    ),
    # no res blocks: the down path keeps the input conv's width, attention is on the up path only
    "unet_depth_zero": (
        "UNetModel",
        dict(num_res_blocks=0, attention_resolutions=(1, 2), dropout=1.0, resblock_updown=True),
    ),
    # ... so num_heads only splits the middle block's 64 channels, heads_upsample the up path's 96
    "unet_depth_zero_heads": (
        "UNetModel",
        dict(
            num_res_blocks=0,
            channel_mult=(2, 3),
            attention_resolutions=(2,),
            num_head_channels=-1,
            num_heads=64,
            num_heads_upsample=32,
            use_scale_shift_norm=True,
        ),
    ),
    "superres_depth_zero": ("SuperResModel", dict(num_res_blocks=0, attention_resolutions=(2,))),
    # ... and a classifier has only the input conv's 64 channels: 1.5 x 32 = 48 builds nothing
    "classifier_depth_zero": (
        "EncoderUNetModel",
        dict(
            num_res_blocks=0,
            channel_mult=(2, 1.5),
            num_head_channels=64,
            attention_resolutions=(1, 2),
            pool="attention",
            resblock_updown=True,
        ),
    ),
}


def _hand_built(module, name: str) -> torch.nn.Module:
    cls, kw = HAND_BUILT[name]
    args = dict(image_size=16, in_channels=3, out_channels=6 if cls == "UNetModel" else 3, **ORIGINAL)
    return getattr(module, cls)(**{**args, **kw})


def _inputs(name: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 900])
    return (x, t, torch.randn(2, 3, 8, 8, generator=g)) if HAND_BUILT[name][0] == "SuperResModel" else (x, t)


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_hand_built_networks_the_original_builds_run(name):
    model = _hand_built(unet, name).eval()
    with torch.no_grad():
        assert torch.isfinite(model(*_inputs(name))).all()


@needs_original
@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_hand_built_networks_are_the_originals(name, monkeypatch):
    """The same state_dict keys and shapes, a strict load of the original's weights, the same outputs."""
    monkeypatch.syspath_prepend(CHECKOUT)
    theirs = _hand_built(importlib.import_module("guided_diffusion.unet"), name).eval()
    ours = _hand_built(unet, name).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.1)  # none zero: zeroed output convs would hide the torso
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict(), strict=True)
    inputs = _inputs(name)
    with torch.no_grad():
        want, got = theirs(*inputs), ours(*inputs)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
