"""Turn model options (preset, flag string, checkpoint) into loaded, checked networks.

A fastdiff safetensors checkpoint carries its guided-diffusion flags in its metadata, so it
needs no preset; a guided-diffusion ``.pt`` needs ``--preset`` or ``--flags`` to say what
it is. Flags become typed configs here (the CLI and Python callers are their edges). Problems
with the user's files and flags raise one-line RunError messages before sampling; anything
else is a bug and keeps its traceback. Networks are built on the meta device first, so flags that
do not fit the weights cost no memory.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastdiff.config import ConfigError
from fastdiff.diffusion import DiffusionConfig, GaussianDiffusion
from fastdiff.models.checkpoint import (
    ASSETS,
    CheckpointError,
    check_fits,
    check_torch_file,
    file_sha256,
    load_state_dict,
    load_weights,
    read_header,
    read_metadata,
)
from fastdiff.models.config import NetConfig
from fastdiff.models.flags import SAMPLING_FLAGS, configs_from_flags, flags_of, known_flags, parse_flags
from fastdiff.models.presets import PRESETS, Preset, build_network, get_preset
from fastdiff.runs.device import resolve_device
from fastdiff.runs.errors import RunError, check_arguments
from fastdiff.runs.plan import class_list

BUNDLED_MODEL = ASSETS / "mnist" / "diffusion.safetensors"
BUNDLED_CLASSIFIER = ASSETS / "mnist" / "classifier.safetensors"
# What weights do not fix: how their network runs, their training loss, DDPM's fixed variance
_FREE_NET = ("use_fp16", "use_checkpoint", "dropout")
_FREE_PROCESS = ("use_kl", "rescale_learned_sigmas", "sigma_small")


@dataclass
class LoadedModel:
    """A network with its config, the process it was trained with, and what sampling needs to
    know about it."""

    model: nn.Module
    net: NetConfig
    process: DiffusionConfig
    identity: dict
    metadata: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.net.image_size

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def class_cond(self) -> bool:
        return self.net.num_classes is not None

    @property
    def null_label(self) -> int | None:
        return self.metadata.get("null_label")

    @property
    def num_real_classes(self) -> int | None:
        """Classes to sample: a classifier-free-guidance model's null label is not one of them."""
        if self.null_label is not None:
            return int(self.null_label)
        return self.net.num_classes

    @property
    def class_names(self) -> list[str] | None:
        """The training data's class names (folders or prefixes), index = class id."""
        names = self.metadata.get("class_names")
        ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
        return names if ok else None

    @property
    def num_timesteps(self) -> int:
        return self.process.steps

    @property
    def default_classifier_scale(self) -> float:
        return float(self.metadata.get("default_classifier_scale", 1.0))

    def diffusion(self, respacing: str):
        """The process for a respacing that respacing_for() has checked."""
        return GaussianDiffusion.from_config(self.process, respacing)

    def bundled_classifier(self, device: torch.device) -> LoadedModel | None:
        if not BUNDLED_CLASSIFIER.exists():
            return None
        return load_classifier(
            BUNDLED_CLASSIFIER, preset=None, flag_string=None, image_size=self.image_size, device=device
        )


def _training_run(path: Path) -> tuple[str, str] | None:
    """(what ``path`` is, the weights to pass instead) for a training run's folder or latest.json
    (its latest weights) or one of its state files (the optimizer's, the run's only .pt: the
    weights of its step)."""
    from fastdiff.training import checkpoint as ckpt

    state = ckpt.CHECKPOINT_FILE.fullmatch(path.name)
    state = state if state and state[1] == "state" else None
    folder = path if path.is_dir() else path.parent if path.name == ckpt.LATEST or state else None
    try:
        record = None if folder is None else ckpt.latest_checkpoint(folder)
    except CheckpointError:
        return None
    if record is None:
        return None
    if not state:
        return "a training run", ckpt.weights_files(folder, record)
    step = ckpt.step_record(int(state[2]), record["ema"])  # the run's EMA rates, the latest record's
    return "a training run's state", ckpt.weights_files(folder, step)


def check_file(path: Path, what: str) -> None:
    run = _training_run(path)
    if run is not None:
        raise RunError(f"{what} {path} is {run[0]}, not a weights file: pass {run[1]}")
    if path.is_dir():
        raise RunError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise RunError(f"{what} not found: {path}")


def _one_line(e: Exception) -> RunError:
    return RunError(" ".join(str(e).split()))


def configs_of(flags: dict, kind: str) -> tuple[NetConfig, DiffusionConfig]:
    """The configs of flags a user or a checkpoint's metadata gave, or one line saying what is wrong."""
    try:
        return configs_from_flags(kind, flags)
    except ConfigError as e:
        raise RunError(f"{kind} flags: {e}") from None


def same_flags(old, new: dict, kind: str | None = None) -> bool:
    """Whether two records' flags describe the same network and process, compared as configs so
    an older fastdiff's spelling of them (partial, or with flags now left out) matches.
    ``kind`` None is a diffusion model or, with ``large_size``, an upsampler."""
    if old == new:
        return True
    if not isinstance(old, dict):
        return False
    kind = kind or ("superres" if "large_size" in new else "diffusion")
    try:
        return configs_from_flags(kind, old) == configs_from_flags(kind, new)
    except ConfigError:
        return False


def _preset(name: str) -> Preset:
    try:
        return get_preset(name)
    except ConfigError as e:
        raise RunError(str(e)) from None


def _configs_from(
    preset: str | None, flag_string: str | None, checkpoint: Path | None, kind: str, defaults: dict
) -> tuple[NetConfig, DiffusionConfig, dict]:
    """(network, process, metadata) from a preset, a flag string over it, or the checkpoint's own
    metadata; ``defaults`` lie under all of them."""
    metadata = {}
    if checkpoint is not None and checkpoint.suffix == ".safetensors":
        try:
            metadata = read_metadata(checkpoint)
        except CheckpointError as e:
            raise _one_line(e) from None
    made = metadata.get("kind")  # fastdiff's trainers name it: a classifier's flags are no model's
    if isinstance(made, str) and made != kind:
        from fastdiff.training.checkpoint import COMMANDS

        by = f" ({COMMANDS[made]}'s weights)" if made in COMMANDS else ""
        raise RunError(f"{checkpoint} holds a {made} model{by}, not a {kind} model")
    flags: dict = dict(defaults)
    if preset is not None:
        p = _preset(preset)
        if p.kind != kind:
            raise RunError(f"preset '{preset}' is a {p.kind} model, not a {kind} model")
        flags.update(flags_of(p.net, p.process))
    elif "flags" in metadata:
        if not isinstance(metadata["flags"], dict):
            raise RunError(f"{checkpoint}: its metadata 'flags' is not a map of flags")
        # an older fastdiff stored what --flags gave it; sampling flags never described the network
        flags.update({k: v for k, v in metadata["flags"].items() if k not in SAMPLING_FLAGS})
    elif flag_string is None:
        if checkpoint is not None and checkpoint.is_file():  # a file that is no checkpoint says so first
            try:
                check_torch_file(checkpoint)
            except CheckpointError as e:
                raise _one_line(e) from None
        raise RunError(f"say which {kind} model this is: pass a preset or a guided-diffusion flag string")
    if flag_string is not None:
        try:
            given = parse_flags(flag_string)
        except ConfigError as e:
            raise RunError(str(e)) from None
        if preset is None and "flags" in metadata:
            _check_agrees(given, flags, kind, checkpoint)
        flags.update(given)
    return (*configs_of(flags, kind), metadata)


def _check_agrees(given: dict, own: dict, kind: str, checkpoint: Path) -> None:
    """Flags given for a checkpoint that carries its own must describe its network and process:
    one that did not made a shape dump (another width or size) or sampled with another network
    or process than the weights were trained with, without a word (another --diffusion_steps,
    schedule or head count). What the weights do not fix (use_fp16, the loss, ...) may differ;
    a flag that makes no network beside the weights' others contradicts them too (the size
    error's fix, another channel_mult, would contradict them in turn)."""

    def fixed(configs: tuple[NetConfig, DiffusionConfig]) -> tuple[NetConfig, DiffusionConfig]:
        net, process = configs
        free_net = {name: getattr(base[0], name) for name in _FREE_NET}
        free_process = {name: getattr(base[1], name) for name in _FREE_PROCESS}
        return dataclasses.replace(net, **free_net), dataclasses.replace(process, **free_process)

    base = configs_of(own, kind)
    for name, value in given.items():
        try:
            agrees = fixed(configs_of({**own, name: value}, kind)) == base
        except RunError:  # no network with the weights' other flags (--image_size 33): theirs differ
            agrees = False
        if not agrees:
            theirs = own.get(name, known_flags()[name])
            raise RunError(
                f"flag --{name} {value} contradicts the flags {checkpoint} carries (--{name} {theirs}):"
                " its weights were trained with them; leave the flag out"
            )


def _build(net: NetConfig, checkpoint: Path, preset: str | None, device: torch.device) -> nn.Module:
    """Build weightless, check the weights' shapes (a safetensors file's from its header, before
    reading it), then load: the network takes the loaded tensors."""
    model = build_network(net, "meta")
    try:
        if checkpoint.suffix == ".safetensors":
            check_fits(read_header(checkpoint)[0], model, preset)
            state = None
        else:
            with warnings.catch_warnings():  # torch's note on an older pickle protocol is not the user's
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                state = load_state_dict(checkpoint)
            check_fits(state, model, preset)
        load_weights(model, checkpoint if state is None else state, preset=preset)
    except CheckpointError as e:
        raise _one_line(e) from None
    return model.to(device).eval().requires_grad_(False)


def recorded_path(checkpoint: Path) -> str:
    """A checkpoint's path as run.json records it: a bundled network as ``bundled:mnist/...``, so
    two installs record the same job in the same bytes; any other file by its absolute path."""
    path, assets = checkpoint.resolve(), ASSETS.resolve()
    if path.is_relative_to(assets):
        return f"bundled:{path.relative_to(assets).as_posix()}"
    return str(path)


def load_network(
    kind: str, checkpoint: Path, *, preset, flag_string, device, defaults=None, check=None
) -> LoadedModel:
    """A network of ``kind`` with its weights; ``check(net)`` runs on the config before any build."""
    net, process, metadata = _configs_from(preset, flag_string, checkpoint, kind, defaults or {})
    if check is not None:
        check(net)
    model = _build(net, checkpoint, preset, device)
    # What run.json records of a network: the weights by content, not only by path.
    identity = {
        "checkpoint": recorded_path(checkpoint),
        "sha256": file_sha256(checkpoint),
        "flags": flags_of(net, process),
    }
    return LoadedModel(model, net, process, identity, metadata)


def check_classifier(model: LoadedModel, clf: LoadedModel) -> None:
    """The classifier must see the model's images and name the model's classes (its size is checked
    before it is built)."""
    if clf.in_channels != model.in_channels:
        raise RunError(
            f"the classifier takes {clf.in_channels}-channel images, the model makes {model.in_channels}"
        )
    if model.class_cond and clf.num_real_classes != model.num_real_classes:
        raise RunError(
            f"the classifier has {clf.num_real_classes} classes, the model {model.num_real_classes}"
        )
    if (
        model.class_cond
        and None not in (clf.class_names, model.class_names)
        and clf.class_names != model.class_names
    ):
        raise RunError(
            f"the classifier's classes ({class_list(clf.class_names)}) are not the model's "
            f"({class_list(model.class_names)}): they were trained on other data"
        )


def load_diffusion_model(
    *,
    preset: str | None,
    flag_string: str | None,
    checkpoint: str | Path | None,
    device: str | torch.device,
) -> LoadedModel:
    """The diffusion network: from options, or the bundled MNIST model when none are given.
    ``device`` is a name as ``--device`` takes it (auto, cpu, cuda:N) or a torch.device."""
    check_arguments(load_diffusion_model, locals())
    device = resolve_device(str(device))
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if preset is None and flag_string is None and checkpoint is None:
        if not BUNDLED_MODEL.exists():
            raise RunError("this fastdiff build has no bundled model; pass --preset and --checkpoint")
        checkpoint = BUNDLED_MODEL
    if preset is not None:
        _preset(preset)  # a typo first: it is what the user will fix
    if checkpoint is None:
        raise RunError("--checkpoint is required with --preset/--flags (the model's weights)")
    check_file(checkpoint, "checkpoint")
    return load_network("diffusion", checkpoint, preset=preset, flag_string=flag_string, device=device)


def load_classifier(path: str | Path, *, preset, flag_string, image_size: int, device) -> LoadedModel:
    """The noisy classifier; its preset defaults to the one for the model's image size."""
    path = Path(path)
    check_file(path, "classifier checkpoint")
    if preset is None and flag_string is None and path.suffix != ".safetensors":
        preset = f"classifier{image_size}"
        if preset not in PRESETS:
            raise RunError(
                f"no classifier preset for {image_size}px images: say what {path} is with "
                "--classifier-preset or --classifier-flags"
            )

    def same_size(net: NetConfig) -> None:
        if net.image_size != image_size:
            raise RunError(f"classifier is for {net.image_size}px images, the model makes {image_size}px")

    return load_network(
        "classifier",
        path,
        preset=preset,
        flag_string=flag_string,
        device=device,
        defaults={"image_size": image_size},  # the model's size, not the flags' default
        check=same_size,
    )
