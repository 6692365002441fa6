"""guided-diffusion's ``unet`` module: its network classes with the original's constructor
arguments, built as fastdiff networks.

fastdiff's networks take a typed config; these subclasses translate the original keyword
arguments (attention as downsample factors, ``out_channels`` given) into one, so code that builds
``UNetModel(image_size=..., ...)`` by hand runs under ``fastdiff gd-run`` unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect

from fastdiff.config import ConfigError
from fastdiff.models import unet as _unet
from fastdiff.models.checkpoint import CheckpointError, check_fits
from fastdiff.models.config import ClassifierConfig, SuperResConfig, UNetConfig
from fastdiff.models.presets import build_network
from fastdiff.models.unet import (  # noqa: F401 (the original module's other public names)
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
)
from fastdiff.ops import QKVAttention, QKVAttentionLegacy  # noqa: F401 (the attention the blocks run)
from fastdiff.ops.attention.module import count_flops_attn  # noqa: F401 (its thop hook)

# The helpers the original's unet imports, which scripts also reach through it.
from .fp16_util import convert_module_to_f16, convert_module_to_f32  # noqa: F401
from .nn import (  # noqa: F401
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


def _torso(image_size, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult, **kw):
    """Config fields from the original's arguments; attention is given as downsample factors."""
    return dict(
        image_size=image_size,
        model_channels=model_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // int(ds) for ds in attention_resolutions),
        dropout=float(dropout),
        channel_mult=tuple(channel_mult),
        **kw,
    )


def _learn_sigma(in_channels: int, out_channels: int) -> bool:
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(
            f"out_channels {out_channels}: fastdiff's UNet outputs in_channels ({in_channels}) or, with"
            " a learned variance, twice that"
        )
    return out_channels == 2 * in_channels


def unconverted(config):
    """``config`` to build from, with fp32 weights whatever its ``use_fp16`` says (the network then
    keeps ``config`` itself), as the original's networks are built: the script casts the torso once
    the weights are in (``convert_to_fp16()`` when sampling, ``MixedPrecisionTrainer`` when
    training), so fp32 weights it loads first (a ``--resume_checkpoint``) are not rounded to fp16."""
    return dataclasses.replace(config, use_fp16=False)


def recompute_as_the_original(net):
    """``net``'s checkpointed res blocks recompute in the backward pass from the random state of
    that moment, as the original's ``CheckpointFunction`` does: with ``use_checkpoint`` and
    dropout, the gradient takes new masks and the global stream advances past them, so a seeded
    training run draws the original's timesteps, noise and masks after its first step."""
    for block in net.modules():
        if isinstance(block, ResBlock):
            block.preserve_rng_state = False
    return net


class _FitsOrSays:
    """The original's scripts load ``--model_path`` / ``--classifier_path`` straight into the
    network their flags built; a checkpoint made for other flags raises fastdiff's
    CheckpointError (what differs, and which presets it fits), which gd-run prints as its error,
    where torch's strict load gave a traceback. Built in fp32 (``unconverted``)."""

    def __init__(self, config):
        super().__init__(unconverted(config))
        self.config = config
        recompute_as_the_original(self)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if strict:
            self._check_class_count(state_dict)
            check_fits(state_dict, self)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_class_count(self, state_dict) -> None:
        """Weights that would fit but for their class count (a fastdiff run on the user's own
        classes, under an original script built for ImageNet's 1000) are one line saying so:
        the shape listing named a label table, not the cause. The classes are the user's: a
        classifier-free-guidance model's null label is none (fastdiff sample's count too)."""
        want = self.config.num_classes
        if want is None:
            return
        want_shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        have_shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
        counts = {
            have_shapes[k][0]
            for k, shape in want_shapes.items()
            if shape[:1] == (want,)
            and len(have_shapes.get(k, ())) == len(shape)
            and have_shapes[k][1:] == shape[1:]
        } - {want}
        if len(counts) != 1 or 0 in counts:  # an empty label table is no network: the listing says so
            return
        (have,) = counts
        try:
            check_fits(state_dict, build_network(dataclasses.replace(self.config, num_classes=have), "meta"))
        except CheckpointError:  # something else differs too: the full listing says what
            return
        classes = f"{have} classes"
        if getattr(state_dict, "null_label", None) == have - 1:  # dist_util.Weights of a CFG model
            classes = f"{have - 1} classes (and classifier-free guidance's null label)"
        what, command = "checkpoint", "fastdiff sample"
        if isinstance(self, _unet.EncoderUNetModel):
            what = "classifier checkpoint"
        elif isinstance(self, _unet.SuperResModel):  # an upsampler: `fastdiff sample` has no low-res input
            what, command = "upsampler checkpoint", "fastdiff upsample"
        imagenet = " (guided-diffusion's scripts assume ImageNet's 1000)" if want == 1000 else ""
        raise CheckpointError(
            f"the {what} has {classes}, the script's network {want}{imagenet}: sample it with "
            f"`{command}`, which takes any class count"
        )


class UNetModel(_FitsOrSays, _unet.UNetModel):
    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        config = UNetConfig(
            **_torso(
                image_size, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult
            ),
            in_channels=in_channels,
            learn_sigma=_learn_sigma(in_channels, out_channels),
            conv_resample=conv_resample,
            dims=dims,
            num_classes=num_classes,
            use_checkpoint=use_checkpoint,
            use_fp16=use_fp16,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        super().__init__(config)


# The original's SuperResModel hands its keywords on to UNetModel: what they leave out takes
# UNetModel's defaults, not the config's (which has scale-shift norm and 4 heads).
_UNET_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(UNetModel.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}


class SuperResModel(_FitsOrSays, _unet.SuperResModel):
    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        **kw,
    ):
        kw = {**_UNET_DEFAULTS, **kw}
        dropout, channel_mult = kw.pop("dropout"), kw.pop("channel_mult")
        config = SuperResConfig(
            **_torso(
                image_size, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult
            ),
            in_channels=in_channels,
            learn_sigma=_learn_sigma(in_channels, out_channels),
            small_size=image_size,  # the original's model does not record it
            **kw,
        )
        super().__init__(config)


class EncoderUNetModel(_FitsOrSays, _unet.EncoderUNetModel):
    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        config = ClassifierConfig(
            **_torso(
                image_size, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult
            ),
            in_channels=in_channels,
            num_classes=out_channels,
            conv_resample=conv_resample,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_fp16=use_fp16,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
            pool=pool,
        )
        super().__init__(config)


# fastdiff's network class -> the compat class the original's builders return in its place.
_COMPAT_CLASS = {
    _unet.UNetModel: UNetModel,
    _unet.SuperResModel: SuperResModel,
    _unet.EncoderUNetModel: EncoderUNetModel,
}
