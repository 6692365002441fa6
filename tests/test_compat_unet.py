"""guided-diffusion's ``unet`` names: networks built by hand with the original's arguments."""

from __future__ import annotations

import pytest
import torch
from builders import build_classifier, build_superres, build_unet

from fastdiff.compat import unet
from fastdiff.config import ConfigError

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
    assert isinstance(b, unet.UNetModel.__mro__[1]) and a.attention_resolutions == (2,)

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

    e = unet.SuperResModel(32, 3, out_channels=3, attention_resolutions=(2,), **ORIGINAL)
    assert e.in_channels == 6 and e.input_blocks[0][0].in_channels == 6
    f = build_superres(
        large_size=32, small_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        num_head_channels=32, attention_resolutions="16", use_scale_shift_norm=False, num_heads=1,
    )  # fmt: skip
    assert list(e.state_dict()) == list(f.state_dict())


def test_an_output_fastdiff_cannot_make_is_refused():
    with pytest.raises(ConfigError, match="out_channels 5"):
        unet.UNetModel(32, 3, out_channels=5, attention_resolutions=(2,), **ORIGINAL)
