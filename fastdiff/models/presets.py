"""guided-diffusion's command-line flags, the network builders they drive, and named presets
for every released ADM checkpoint.

Flags keep guided-diffusion's names and defaults so a MODEL_FLAGS string copied from its README
builds the same network. Two flags are fastdiff additions: ``num_classes`` (1000 in the
original, fixed) and ``in_channels`` (3), so small datasets such as MNIST fit the same builders.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .unet import EncoderUNetModel, SuperResModel, UNetModel


class FlagError(ValueError):
    """A flag string, flag value or preset name a user gave is not valid (one line at the CLI)."""


NUM_CLASSES = 1000


def model_defaults() -> dict[str, Any]:
    """The UNet flags of guided-diffusion's model_and_diffusion_defaults()."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )


def diffusion_defaults() -> dict[str, Any]:
    """guided-diffusion's diffusion_defaults()."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults() -> dict[str, Any]:
    """guided-diffusion's classifier_defaults()."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )


def sr_defaults() -> dict[str, Any]:
    """The model flags of guided-diffusion's sr_model_and_diffusion_defaults() (no diffusion flags).

    The super-resolution builder takes its size from ``large_size`` and has no ``image_size``,
    ``channel_mult`` or ``use_new_attention_order`` flag in the original.
    """
    flags = model_defaults()
    for name in ("image_size", "channel_mult", "use_new_attention_order"):
        del flags[name]
    return dict(large_size=256, small_size=64, **flags)


def _extra_defaults() -> dict[str, Any]:
    """Flags accepted by parse_flags besides the model ones: fastdiff additions and the sampling
    scripts' flags (so a whole README command line parses)."""
    return dict(
        num_classes=NUM_CLASSES,
        in_channels=3,
        sigma_small=False,
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        model_path="",
        classifier_path="",
        classifier_scale=1.0,
        base_samples="",
    )


def known_flags() -> dict[str, Any]:
    """Every flag name parse_flags and the builders accept, with its default (which sets its type)."""
    return {
        **model_defaults(),
        **diffusion_defaults(),
        **classifier_defaults(),
        **sr_defaults(),
        **_extra_defaults(),
    }


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def _convert(name: str, text: str, default: Any) -> Any:
    """Type a flag value by its default's type, as guided-diffusion's argparser does."""
    try:
        if isinstance(default, bool):
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected True or False")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError as e:
        raise FlagError(f"bad value {text!r} for --{name}: {e}") from None
    return text


def parse_flags(text: str) -> dict[str, Any]:
    """Parse guided-diffusion flags ("--image_size 256 --class_cond True", or "--x=v") to typed values.

    Only the flags present are returned; unknown names raise FlagError naming them.
    """
    known = known_flags()
    tokens = shlex.split(text)
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise FlagError(f"expected a --flag, got {tok!r}")
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise FlagError(f"flag --{name} has no value")
            i += 1
            value = tokens[i]
        if name not in known:
            raise FlagError(f"unknown flag --{name}")
        out[name] = _convert(name, value, known[name])
        i += 1
    return out


_CHANNEL_MULT_BY_SIZE = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),  # not in guided-diffusion: for 32x32 datasets such as MNIST
}

_SR_CHANNEL_MULT_BY_SIZE = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() else value


def channel_mult_for(image_size: int, channel_mult: str | Iterable[float] = "", table=None) -> tuple:
    """The channel multipliers: the given ones, or guided-diffusion's choice for the image size."""
    if isinstance(channel_mult, str):
        if channel_mult.strip():
            return tuple(_number(m) for m in channel_mult.split(","))
        table = table or _CHANNEL_MULT_BY_SIZE
        if image_size not in table:
            raise FlagError(f"unsupported image size {image_size}; pass channel_mult")
        return table[image_size]
    return tuple(channel_mult)


def attention_ds(image_size: int, attention_resolutions: str | Iterable[int]) -> tuple[int, ...]:
    """Resolutions ("32,16,8") to the downsample factors the networks take (image_size // res)."""
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    return tuple(image_size // int(r) for r in attention_resolutions)


def _merge(defaults: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Defaults updated by flags; names no builder knows are an error (typos), others are ignored."""
    unknown = sorted(set(flags) - set(known_flags()))
    if unknown:
        raise FlagError(f"unknown flag(s): {', '.join(unknown)}")
    extras = _extra_defaults()
    return {**defaults, "num_classes": extras["num_classes"], "in_channels": extras["in_channels"], **flags}


def _unet_kwargs(f: dict[str, Any], size: int, mult_table=None) -> dict[str, Any]:
    """UNetModel arguments from merged flags (shared by the diffusion UNet and the upsampler)."""
    return dict(
        image_size=size,
        in_channels=f["in_channels"],
        model_channels=f["num_channels"],
        out_channels=f["in_channels"] * (2 if f.get("learn_sigma", False) else 1),
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=attention_ds(size, f["attention_resolutions"]),
        dropout=f["dropout"],
        channel_mult=channel_mult_for(size, f["channel_mult"], mult_table),
        num_classes=f["num_classes"] if f["class_cond"] else None,
        use_checkpoint=f["use_checkpoint"],
        use_fp16=f["use_fp16"],
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
    )


def create_unet(**flags: Any) -> UNetModel:
    """The ADM diffusion UNet from guided-diffusion flags (create_model's semantics)."""
    f = _merge(model_defaults(), flags)
    return UNetModel(**_unet_kwargs(f, f["image_size"]))


def create_superres(**flags: Any) -> SuperResModel:
    """The ADM-U upsampler from guided-diffusion's super-resolution flags (sr_create_model)."""
    f = _merge({**sr_defaults(), "channel_mult": "", "use_new_attention_order": False}, flags)
    return SuperResModel(**_unet_kwargs(f, f["large_size"], _SR_CHANNEL_MULT_BY_SIZE))


def create_classifier(**flags: Any) -> EncoderUNetModel:
    """The ADM noisy-image classifier from guided-diffusion's classifier flags (64-channel heads)."""
    f = _merge({**classifier_defaults(), "channel_mult": ""}, flags)
    size = f["image_size"]
    return EncoderUNetModel(
        image_size=size,
        in_channels=f["in_channels"],
        model_channels=f["classifier_width"],
        out_channels=f["num_classes"],
        num_res_blocks=f["classifier_depth"],
        attention_resolutions=attention_ds(size, f["classifier_attention_resolutions"]),
        channel_mult=channel_mult_for(size, f["channel_mult"]),
        use_fp16=f["classifier_use_fp16"],
        num_head_channels=64,
        use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
        resblock_updown=f["classifier_resblock_updown"],
        pool=f["classifier_pool"],
    )


@dataclass(frozen=True)
class Preset:
    """A named network configuration: ``flags`` are complete guided-diffusion flags."""

    name: str
    kind: str  # "diffusion" | "classifier" | "superres"
    flags: dict[str, Any] = field(repr=False)
    description: str = ""


_BUILDERS = {"diffusion": create_unet, "classifier": create_classifier, "superres": create_superres}


def _preset(name: str, kind: str, flag_text: str, description: str) -> Preset:
    base = {
        "diffusion": model_defaults,
        "classifier": classifier_defaults,
        "superres": sr_defaults,
    }[kind]()
    return Preset(name, kind, {**base, **diffusion_defaults(), **parse_flags(flag_text)}, description)


# MODEL_FLAGS / CLASSIFIER_FLAGS of guided-diffusion's README for each released checkpoint.
_IMAGENET256 = (
    "--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True"
    " --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2"
    " --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
_CLASSIFIER = (
    "--classifier_attention_resolutions 32,16,8 --classifier_depth 2 --classifier_width 128"
    " --classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True"
    " --learn_sigma True --noise_schedule linear"
)
_LSUN = _IMAGENET256 + " --class_cond False --dropout 0.1"
# The bundled MNIST pair (recipes/README.md): 10 digits plus the classifier-free null label 10.
_MNIST = (
    "--image_size 32 --in_channels 1 --num_channels 32 --num_res_blocks 2 --channel_mult 1,2,2"
    " --attention_resolutions 16,8 --num_head_channels 32 --use_scale_shift_norm True --resblock_updown False"
    " --dropout 0.0 --class_cond True --num_classes 11 --learn_sigma True --diffusion_steps 1000"
    " --noise_schedule cosine"
)
_MNIST_CLASSIFIER = (
    "--image_size 32 --in_channels 1 --num_classes 10 --classifier_width 32 --classifier_depth 1"
    " --channel_mult 1,2,2 --classifier_attention_resolutions 8 --classifier_pool attention"
    " --diffusion_steps 1000 --noise_schedule cosine"
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _preset(
            "imagenet64",
            "diffusion",
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1"
            " --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192"
            " --num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order True"
            " --use_fp16 True --use_scale_shift_norm True",
            "ImageNet 64x64 class-conditional ADM (64x64_diffusion.pt)",
        ),
        _preset(
            "imagenet128",
            "diffusion",
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128"
            " --learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2"
            " --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
            "ImageNet 128x128 class-conditional ADM (128x128_diffusion.pt)",
        ),
        _preset(
            "imagenet256",
            "diffusion",
            _IMAGENET256 + " --class_cond True",
            "ImageNet 256x256 class-conditional ADM (256x256_diffusion.pt)",
        ),
        _preset(
            "imagenet256-uncond",
            "diffusion",
            _IMAGENET256 + " --class_cond False",
            "ImageNet 256x256 unconditional ADM (256x256_diffusion_uncond.pt)",
        ),
        _preset(
            "imagenet512",
            "diffusion",
            _IMAGENET256.replace("--image_size 256", "--image_size 512").replace(
                "--use_fp16 True", "--use_fp16 False"
            )
            + " --class_cond True",
            "ImageNet 512x512 class-conditional ADM (512x512_diffusion.pt)",
        ),
        _preset(
            "classifier64",
            "classifier",
            _CLASSIFIER.replace("--classifier_depth 2", "--classifier_depth 4").replace("linear", "cosine")
            + " --image_size 64",
            "ImageNet 64x64 noisy classifier (64x64_classifier.pt)",
        ),
        _preset(
            "classifier128",
            "classifier",
            _CLASSIFIER + " --image_size 128 --classifier_use_fp16 True",
            "ImageNet 128x128 noisy classifier (128x128_classifier.pt)",
        ),
        _preset(
            "classifier256",
            "classifier",
            _CLASSIFIER + " --image_size 256",
            "ImageNet 256x256 noisy classifier (256x256_classifier.pt)",
        ),
        _preset(
            "classifier512",
            "classifier",
            _CLASSIFIER + " --image_size 512",
            "ImageNet 512x512 noisy classifier (512x512_classifier.pt)",
        ),
        _preset(
            "upsampler64-256",
            "superres",
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256"
            " --small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4"
            " --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
            "ImageNet 64->256 class-conditional upsampler ADM-U (64_256_upsampler.pt)",
        ),
        _preset(
            "upsampler128-512",
            "superres",
            "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512"
            " --small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192"
            " --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True"
            " --use_scale_shift_norm True",
            "ImageNet 128->512 class-conditional upsampler ADM-U (128_512_upsampler.pt)",
        ),
        _preset(
            "lsun-bedroom", "diffusion", _LSUN, "LSUN bedroom 256x256 unconditional ADM (lsun_bedroom.pt)"
        ),
        _preset("lsun-cat", "diffusion", _LSUN, "LSUN cat 256x256 unconditional ADM (lsun_cat.pt)"),
        _preset("lsun-horse", "diffusion", _LSUN, "LSUN horse 256x256 unconditional ADM (lsun_horse.pt)"),
        _preset("mnist", "diffusion", _MNIST, "bundled MNIST 32x32 conditional ADM (CFG null label 10)"),
        _preset("mnist-classifier", "classifier", _MNIST_CLASSIFIER, "bundled MNIST 32x32 noisy classifier"),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise FlagError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_flags(name: str) -> dict[str, Any]:
    """A copy of a preset's flags (safe to update)."""
    return dict(get_preset(name).flags)


def build_preset(name: str, device: torch.device | str | None = None, **overrides: Any) -> nn.Module:
    """Instantiate a preset's network; ``device="meta"`` builds it without allocating weights."""
    preset = get_preset(name)
    builder = _BUILDERS[preset.kind]
    flags = {**preset.flags, **overrides}
    if device is None:
        return builder(**flags)
    with torch.device(device):
        return builder(**flags)
