"""Turn CLI model options (preset, flag string, checkpoint) into loaded, checked networks.

A fastdiff safetensors checkpoint carries its guided-diffusion flags in its metadata, so it
needs no preset; a guided-diffusion ``.pt`` needs ``--preset`` or ``--flags`` to say what
it is. All problems surface as one-line ``click.ClickException`` messages before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
from torch import nn

from fastdiff.diffusion import create_diffusion_from_flags
from fastdiff.models.checkpoint import CheckpointError, load_weights, read_metadata
from fastdiff.models.presets import create_classifier, create_unet, get_preset, parse_flags

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
    def num_classes(self) -> int | None:
        """Real classes: a classifier-free-guidance model's null label is not one of them."""
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
        try:
            return create_diffusion_from_flags({**self.flags, "timestep_respacing": respacing})
        except ValueError as e:
            raise click.ClickException(f"respacing '{respacing}': {e}") from None

    def bundled_classifier(self, device: torch.device) -> LoadedModel | None:
        if not BUNDLED_CLASSIFIER.exists():
            return None
        return load_classifier(
            BUNDLED_CLASSIFIER, preset=None, flag_string=None, image_size=self.image_size, device=device
        )


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise click.ClickException(f"{what} not found: {path}")


def _flags_from(
    preset: str | None, flag_string: str | None, checkpoint: Path | None, kind: str
) -> tuple[dict, dict]:
    """(flags, metadata) from a preset, a flag string over it, or the checkpoint's own metadata."""
    metadata = {}
    if checkpoint is not None and checkpoint.suffix == ".safetensors":
        metadata = read_metadata(checkpoint)
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
    return flags, metadata


def _build(create, flags: dict, checkpoint: Path, preset: str | None, device: torch.device) -> nn.Module:
    try:
        model = create(**flags)
    except (ValueError, TypeError) as e:
        raise click.ClickException(str(e)) from None
    try:
        load_weights(model, checkpoint, preset=preset)
    except CheckpointError as e:
        raise click.ClickException(" ".join(str(e).split())) from None
    return model.to(device).eval().requires_grad_(False)


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
    identity = {"checkpoint": str(checkpoint.resolve()), "flags": flags}
    return LoadedModel(model, flags, identity, metadata)


def load_classifier(path: Path, *, preset, flag_string, image_size: int, device) -> LoadedModel:
    """The noisy classifier; its preset defaults to the one for the model's image size."""
    _check_file(path, "classifier checkpoint")
    if preset is None and flag_string is None and path.suffix != ".safetensors":
        preset = f"classifier{image_size}"
    flags, metadata = _flags_from(preset, flag_string, path, "classifier")
    if int(flags.get("image_size", image_size)) != image_size:
        raise click.ClickException(
            f"classifier is for {flags['image_size']}px images, the model makes {image_size}px"
        )
    model = _build(create_classifier, flags, path, preset, device)
    return LoadedModel(model, flags, {"checkpoint": str(path.resolve()), "flags": flags}, metadata)
