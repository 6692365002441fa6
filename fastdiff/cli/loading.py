"""Turn CLI model options (preset, flag string, checkpoint) into loaded, checked networks.

A fastdiff safetensors checkpoint carries its guided-diffusion flags in its metadata, so it
needs no preset; a guided-diffusion ``.pt`` needs ``--preset`` or ``--flags`` to say what
it is. Problems with the user's files and flags surface as one-line ``click.ClickException``
messages before sampling; anything else is a bug and keeps its traceback. Networks are built on
the meta device first, so flags that do not fit the weights cost no memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
from torch import nn

from fastdiff.diffusion import create_diffusion_from_flags
from fastdiff.diffusion.schedule import get_named_beta_schedule
from fastdiff.models.checkpoint import (
    CheckpointError,
    check_fits,
    file_sha256,
    load_state_dict,
    load_weights,
    read_header,
    read_metadata,
)
from fastdiff.models.presets import (
    channel_mult_for,
    create_classifier,
    create_unet,
    get_preset,
    known_flags,
    parse_flags,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_MODEL = ASSETS / "mnist" / "diffusion.safetensors"
BUNDLED_CLASSIFIER = ASSETS / "mnist" / "classifier.safetensors"


@dataclass
class LoadedModel:
    """A network with its flags and what sampling needs to know about it."""

    model: nn.Module
    flags: dict
    identity: dict
    metadata: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.flags["image_size"])

    @property
    def in_channels(self) -> int:
        return int(self.flags.get("in_channels", 3))

    @property
    def class_cond(self) -> bool:
        return getattr(self.model, "num_classes", None) is not None

    @property
    def null_label(self) -> int | None:
        return self.metadata.get("null_label")

    @property
    def num_real_classes(self) -> int | None:
        """Classes to sample: a classifier-free-guidance model's null label is not one of them."""
        if self.null_label is not None:
            return int(self.null_label)
        n = getattr(self.model, "num_classes", None)
        return None if n is None else int(n)

    @property
    def num_timesteps(self) -> int:
        return int(self.flags.get("diffusion_steps", 1000))

    @property
    def default_classifier_scale(self) -> float:
        return float(self.metadata.get("default_classifier_scale", 1.0))

    def diffusion(self, respacing: str):
        """The process for a respacing that respacing_for() has checked."""
        return create_diffusion_from_flags({**self.flags, "timestep_respacing": respacing})

    def bundled_classifier(self, device: torch.device) -> LoadedModel | None:
        if not BUNDLED_CLASSIFIER.exists():
            return None
        return load_classifier(
            BUNDLED_CLASSIFIER, preset=None, flag_string=None, image_size=self.image_size, device=device
        )


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise click.ClickException(f"{what} not found: {path}")


def _one_line(e: Exception) -> click.ClickException:
    return click.ClickException(" ".join(str(e).split()))


_POSITIVE = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "num_classes",
    "in_channels",
    "diffusion_steps",
    "classifier_width",
    "classifier_depth",
    "num_heads",
)


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)) and isinstance(value, bool):
        return False
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def check_flags(flags: dict, kind: str) -> None:
    """The flags' names, types and ranges: what a user or a checkpoint's metadata can get wrong."""
    known = known_flags()
    for name, value in flags.items():
        if name not in known:
            raise click.ClickException(f"unknown {kind} flag --{name}")
        if not _type_ok(value, known[name]):
            raise click.ClickException(
                f"{kind} flag --{name} {value!r}: expected a {type(known[name]).__name__}"
            )
        if name in _POSITIVE and value < 1:
            raise click.ClickException(f"{kind} flag --{name} must be at least 1, got {value}")
    width = flags.get("classifier_width" if kind == "classifier" else "num_channels")
    try:
        mult = channel_mult_for(int(flags.get("image_size", 64)), flags.get("channel_mult", ""))
        for key in ("attention_resolutions", "classifier_attention_resolutions"):
            [int(r) for r in flags.get(key, "").split(",") if r.strip()]
        get_named_beta_schedule(flags.get("noise_schedule", "linear"), 2)
    except ValueError as e:  # the presets' and schedules' own validators
        raise click.ClickException(f"{kind} flags: {e}") from None
    if width is not None and any(int(m * width) % 32 for m in mult):
        raise click.ClickException(
            f"{kind} flags: every level's width (channel_mult x {width}) must be a multiple of 32 (GroupNorm)"
        )


def _flags_from(
    preset: str | None, flag_string: str | None, checkpoint: Path | None, kind: str
) -> tuple[dict, dict]:
    """(flags, metadata) from a preset, a flag string over it, or the checkpoint's own metadata."""
    metadata = {}
    if checkpoint is not None and checkpoint.suffix == ".safetensors":
        try:
            metadata = read_metadata(checkpoint)
        except CheckpointError as e:
            raise _one_line(e) from None
    flags: dict = {}
    if preset is not None:
        try:
            p = get_preset(preset)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        if p.kind != kind:
            raise click.ClickException(f"preset '{preset}' is a {p.kind} model, not a {kind} model")
        flags = dict(p.flags)
    elif "flags" in metadata:
        if not isinstance(metadata["flags"], dict):
            raise click.ClickException(f"{checkpoint}: its metadata 'flags' is not a map of flags")
        flags = dict(metadata["flags"])
    elif flag_string is None:
        raise click.ClickException(
            f"say which {kind} model this is: pass a preset or a guided-diffusion flag string"
        )
    if flag_string is not None:
        try:
            flags.update(parse_flags(flag_string))
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    check_flags(flags, kind)
    return flags, metadata


def _build(create, flags: dict, checkpoint: Path, preset: str | None, device: torch.device) -> nn.Module:
    """Check the weights' shapes against a weightless build, then build and load for real."""
    with torch.device("meta"):
        skeleton = create(**flags)
    try:
        if checkpoint.suffix == ".safetensors":
            check_fits(read_header(checkpoint)[0], skeleton, preset)
            state = None
        else:
            state = load_state_dict(checkpoint)
            check_fits(state, skeleton, preset)
        model = create(**flags)
        load_weights(model, checkpoint if state is None else state, preset=preset)
    except CheckpointError as e:
        raise _one_line(e) from None
    return model.to(device).eval().requires_grad_(False)


def _identity(path: Path, flags: dict) -> dict:
    """What run.json records of a network: the weights by content, not only by path."""
    return {"checkpoint": str(path.resolve()), "sha256": file_sha256(path), "flags": flags}


def check_classifier(model: LoadedModel, clf: LoadedModel) -> None:
    """The classifier must see the model's images and name the model's classes (its size is checked
    before it is built)."""
    if clf.in_channels != model.in_channels:
        raise click.ClickException(
            f"the classifier takes {clf.in_channels}-channel images, the model makes {model.in_channels}"
        )
    if model.class_cond and clf.num_real_classes != model.num_real_classes:
        raise click.ClickException(
            f"the classifier has {clf.num_real_classes} classes, the model {model.num_real_classes}"
        )


def load_diffusion_model(*, preset, flag_string, checkpoint, device) -> LoadedModel:
    """The diffusion network: from options, or the bundled MNIST model when none are given."""
    if preset is None and flag_string is None and checkpoint is None:
        if not BUNDLED_MODEL.exists():
            raise click.ClickException(
                "this fastdiff build has no bundled model; pass --preset and --checkpoint"
            )
        checkpoint = BUNDLED_MODEL
    if checkpoint is None:
        raise click.ClickException("--checkpoint is required with --preset/--flags (the model's weights)")
    _check_file(checkpoint, "checkpoint")
    flags, metadata = _flags_from(preset, flag_string, checkpoint, "diffusion")
    model = _build(create_unet, flags, checkpoint, preset, device)
    return LoadedModel(model, flags, _identity(checkpoint, flags), metadata)


def load_classifier(path: Path, *, preset, flag_string, image_size: int, device) -> LoadedModel:
    """The noisy classifier; its preset defaults to the one for the model's image size."""
    _check_file(path, "classifier checkpoint")
    if preset is None and flag_string is None and path.suffix != ".safetensors":
        preset = f"classifier{image_size}"
    flags, metadata = _flags_from(preset, flag_string, path, "classifier")
    flags.setdefault("image_size", image_size)
    if flags["image_size"] != image_size:
        raise click.ClickException(
            f"classifier is for {flags['image_size']}px images, the model makes {image_size}px"
        )
    model = _build(create_classifier, flags, path, preset, device)
    return LoadedModel(model, flags, _identity(path, flags), metadata)
