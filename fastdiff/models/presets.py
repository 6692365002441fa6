"""Named presets for every released ADM checkpoint (and the bundled MNIST pair), and the one
function that builds a network from its config.

Each preset is written as the MODEL_FLAGS / CLASSIFIER_FLAGS string of guided-diffusion's README
(so it can be compared with it line by line) and held as typed configs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fastdiff.config import unknown_choice
from fastdiff.diffusion.config import DiffusionConfig

from .config import ClassifierConfig, NetConfig, SuperResConfig, UNetConfig
from .flags import FlagError, configs_from_flags, parse_flags
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NETWORKS: dict[type[NetConfig], type[nn.Module]] = {
    UNetConfig: UNetModel,
    SuperResConfig: SuperResModel,
    ClassifierConfig: EncoderUNetModel,
}


def build_network(config: NetConfig, device: torch.device | str | None = None) -> nn.Module:
    """The network a config describes; ``device="meta"`` builds it without allocating weights."""
    network = NETWORKS.get(type(config))
    if network is None:  # a flag dict or a preset name: say what goes here, not a KeyError
        kinds = ", ".join(c.__name__ for c in NETWORKS)
        raise TypeError(f"build_network: config must be one of {kinds}, got {type(config).__name__}")
    if device is None:
        return network(config)
    meta = torch.device(device).type == "meta"
    with torch.device(device), _NoRandomFillsOnMeta() if meta else contextlib.nullcontext():
        return network(config)


class _NoRandomFillsOnMeta(TorchFunctionMode):
    """Skips the random initialisations of meta tensors, which have no values to fill: on torch
    2.10 a meta tensor's ``uniform_`` went through its Python decomposition, whose shape check
    imported sympy, so building a network weightless cost 2.5 s where building it on the CPU
    took 0.04 s (torch 2.11's does not)."""

    _FILLS = frozenset(
        {
            "uniform_",
            "normal_",
            "kaiming_uniform_",
            "kaiming_normal_",
            "xavier_uniform_",
            "xavier_normal_",
            "trunc_normal_",
        }
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else (kwargs or {}).get("tensor")
        if (
            getattr(func, "__name__", None) in self._FILLS
            and isinstance(first, torch.Tensor)
            and first.is_meta
        ):
            return first
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Preset:
    """A named network and the process it was trained with."""

    name: str
    net: NetConfig
    process: DiffusionConfig
    description: str = ""

    @property
    def kind(self) -> str:
        return self.net.kind


def _preset(name: str, kind: str, flag_text: str, description: str) -> Preset:
    return Preset(name, *configs_from_flags(kind, parse_flags(flag_text)), description)


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
    if not (isinstance(name, str) and name in PRESETS):
        raise FlagError(unknown_choice("preset", name, PRESETS))
    return PRESETS[name]


def build_preset(name: str, device: torch.device | str | None = None) -> nn.Module:
    """Instantiate a preset's network (``device="meta"``: without weights)."""
    return build_network(get_preset(name).net, device)
