"""guided-diffusion's command-line flags, converted to and from fastdiff's typed configs.

This is the one edge where flags exist: a MODEL_FLAGS string copied from guided-diffusion's
README, ``--flags``, a checkpoint's metadata (written as flags, so older fastdiff files and
newer ones read each other) and the compat layer. Flag names and defaults are the original's;
two are fastdiff additions: ``num_classes`` (1000 in the original, fixed) and ``in_channels`` (3),
so small datasets such as MNIST fit the same networks. The sampling scripts' flags are refused
with the fastdiff option that does the job: in a flag string (what a user typed) whatever their
value, as fastdiff's defaults are not the scripts' (``--use_ddim False`` is a choice); in a flag
dict unless at the scripts' default (guided-diffusion's defaults dicts hold
``timestep_respacing``). The training scripts' flags (--lr, --ema_rate) are refused the same way,
naming fastdiff train's option. Nothing a user gives is silently dropped.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping
from typing import Any

from fastdiff.config import ConfigError, closest, unknown_choice
from fastdiff.diffusion.config import DiffusionConfig

from .config import ClassifierConfig, NetConfig, SuperResConfig, UNetConfig


class FlagError(ConfigError):
    """A flag string, flag name or flag value a user gave is not valid (one line at the CLI)."""


NUM_CLASSES = 1000
CONFIGS: dict[str, type[NetConfig]] = {
    "diffusion": UNetConfig,
    "superres": SuperResConfig,
    "classifier": ClassifierConfig,
}

# flag -> config field, per network kind (class_cond/num_classes of the UNets are handled apart).
_UNET_TORSO = {
    "num_channels": "model_channels",
    "num_res_blocks": "num_res_blocks",
    "num_heads": "num_heads",
    "num_heads_upsample": "num_heads_upsample",
    "num_head_channels": "num_head_channels",
    "attention_resolutions": "attention_resolutions",
    "channel_mult": "channel_mult",
    "dropout": "dropout",
    "use_checkpoint": "use_checkpoint",
    "use_scale_shift_norm": "use_scale_shift_norm",
    "resblock_updown": "resblock_updown",
    "use_fp16": "use_fp16",
    "use_new_attention_order": "use_new_attention_order",
    "learn_sigma": "learn_sigma",
    "in_channels": "in_channels",
}
_NET_FLAGS: dict[str, dict[str, str]] = {
    "diffusion": {"image_size": "image_size", **_UNET_TORSO},
    "superres": {"large_size": "image_size", "small_size": "small_size", **_UNET_TORSO},
    "classifier": {
        "image_size": "image_size",
        "in_channels": "in_channels",
        "classifier_width": "model_channels",
        "classifier_depth": "num_res_blocks",
        "classifier_attention_resolutions": "attention_resolutions",
        "channel_mult": "channel_mult",
        "classifier_use_fp16": "use_fp16",
        "classifier_use_scale_shift_norm": "use_scale_shift_norm",
        "classifier_resblock_updown": "resblock_updown",
        "classifier_pool": "pool",
        "num_classes": "num_classes",
    },
}
_CLASS_FLAGS = ("class_cond", "num_classes")  # the UNets': num_classes only counts when class_cond
_DIFFUSION_FLAGS = {
    "diffusion_steps": "steps",
    "noise_schedule": "noise_schedule",
    "learn_sigma": "learn_sigma",
    "sigma_small": "sigma_small",
    "use_kl": "use_kl",
    "predict_xstart": "predict_xstart",
    "rescale_timesteps": "rescale_timesteps",
    "rescale_learned_sigmas": "rescale_learned_sigmas",
}
# The sampling scripts' flags: (default, what fastdiff takes instead).
SAMPLING_FLAGS: dict[str, tuple[Any, str]] = {
    "timestep_respacing": ("", "--steps or --respacing"),
    "use_ddim": (False, "--sampler ddim"),
    "clip_denoised": (True, "--clip-denoised / --no-clip-denoised"),
    "num_samples": (10000, "--num-samples"),
    "batch_size": (16, "--batch-size"),
    "model_path": ("", "--checkpoint"),
    "classifier_path": ("", "--classifier"),
    "classifier_scale": (1.0, "--classifier-scale"),
    "base_samples": ("", "--low-res"),
}
# The training scripts' own flags (image_train, super_res_train, classifier_train; batch_size is a
# sampling flag too): no model's, so refused wherever they come, with what fastdiff does instead.
TRAINING_FLAGS: dict[str, str] = {
    "data_dir": "fastdiff train takes --data",
    "val_data_dir": "fastdiff train-classifier takes --val-data",
    "lr": "fastdiff train takes --lr",
    "weight_decay": "fastdiff train takes --weight-decay",
    "lr_anneal_steps": "fastdiff train takes --anneal (to 0 at --max-steps)",
    "anneal_lr": "fastdiff train-classifier takes --anneal (to 0 at --max-steps)",
    "iterations": "fastdiff train-classifier takes --max-steps",
    "microbatch": "fastdiff train takes --microbatch (0: off)",
    "ema_rate": "fastdiff train takes --ema",
    "log_interval": "fastdiff train takes --log-every",
    "save_interval": "fastdiff train takes --save-every",
    "eval_interval": "fastdiff train-classifier takes --eval-every",
    "resume_checkpoint": "fastdiff train takes --resume (with the run's --out)",
    "schedule_sampler": "fastdiff train takes --schedule-sampler",
    "fp16_scale_growth": "fastdiff train's --precision fp16 grows its loss scale itself",
    "noised": "fastdiff train-classifier always trains on noised images",
}
# guided-diffusion's *_defaults() key lists (compat builds its argparsers from them).
_MODEL_KEYS = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "num_heads",
    "num_heads_upsample",
    "num_head_channels",
    "attention_resolutions",
    "channel_mult",
    "dropout",
    "class_cond",
    "use_checkpoint",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_fp16",
    "use_new_attention_order",
)
_DIFFUSION_KEYS = (
    "learn_sigma",
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
)
_CLASSIFIER_KEYS = (
    "image_size",
    "classifier_use_fp16",
    "classifier_width",
    "classifier_depth",
    "classifier_attention_resolutions",
    "classifier_use_scale_shift_norm",
    "classifier_resblock_updown",
    "classifier_pool",
)


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() else value


def _join(values) -> str:
    return ",".join(str(int(v)) if float(v).is_integer() else str(v) for v in values)


def flags_of(net: NetConfig, diffusion: DiffusionConfig | None = None) -> dict[str, Any]:
    """The complete guided-diffusion flags of a network (and its process): what checkpoint
    metadata and run records store."""
    if not isinstance(net, NetConfig):  # a network: its config is net.config
        raise TypeError(f"flags_of: net must be a network config (NetConfig), got {type(net).__name__}")
    if diffusion is not None and not isinstance(diffusion, DiffusionConfig):
        raise TypeError(
            f"flags_of: diffusion must be a DiffusionConfig or None, got {type(diffusion).__name__}"
        )
    fields = {f.name: getattr(net, f.name) for f in dataclasses.fields(net)}
    flags: dict[str, Any] = {}
    for flag, field in _NET_FLAGS[net.kind].items():
        value = fields[field]
        flags[flag] = _join(value) if isinstance(value, tuple) else value
    if net.kind != "classifier":
        flags["class_cond"] = net.num_classes is not None
        flags["num_classes"] = NUM_CLASSES if net.num_classes is None else net.num_classes
    if diffusion is not None:
        for flag, field in _DIFFUSION_FLAGS.items():
            flags[flag] = getattr(diffusion, field)
    return flags


def _defaults(keys, kind: str) -> dict[str, Any]:
    flags = {**flags_of(CONFIGS[kind](), DiffusionConfig()), "timestep_respacing": ""}
    return {k: flags[k] for k in keys}


def model_defaults() -> dict[str, Any]:
    """The UNet flags of guided-diffusion's model_and_diffusion_defaults()."""
    return _defaults(_MODEL_KEYS, "diffusion")


def diffusion_defaults() -> dict[str, Any]:
    """guided-diffusion's diffusion_defaults()."""
    return _defaults(_DIFFUSION_KEYS, "diffusion")


def classifier_defaults() -> dict[str, Any]:
    """guided-diffusion's classifier_defaults()."""
    return _defaults(_CLASSIFIER_KEYS, "classifier")


def sr_defaults() -> dict[str, Any]:
    """The model flags of guided-diffusion's sr_model_and_diffusion_defaults() (no diffusion
    flags): ``large_size`` replaces ``image_size``; no ``channel_mult`` or attention order."""
    keys = ("large_size", "small_size") + tuple(
        k for k in _MODEL_KEYS if k not in ("image_size", "channel_mult", "use_new_attention_order")
    )
    return _defaults(keys, "superres")


def known_flags() -> dict[str, Any]:
    """Every flag name fastdiff reads, with its default (which sets its type)."""
    known: dict[str, Any] = {}
    for cls in CONFIGS.values():
        known.update(flags_of(cls(), DiffusionConfig()))
    return {**known, **{k: default for k, (default, _) in SAMPLING_FLAGS.items()}}


TRUE_WORDS = {"true", "t", "yes", "y", "1"}
FALSE_WORDS = {"false", "f", "no", "n", "0"}


def _unknown_flag(name: str, known) -> FlagError:
    """A flag guided-diffusion has not, with the one it looks like a typo of (--num_chanels, or
    the option's spelling --image-size): the full list is 40 flags long. A training script's flag
    names the option that does its job."""
    if name in TRAINING_FLAGS:
        return FlagError(f"--{name} is a training-script flag; {TRAINING_FLAGS[name]}")
    close = closest(name.replace("-", "_"), known)
    return FlagError(f"unknown flag --{name}" + (f"; did you mean --{close}?" if close else ""))


def _sampling_flag(name: str) -> FlagError:
    return FlagError(f"--{name} is a sampling-script flag; fastdiff takes {SAMPLING_FLAGS[name][1]}")


def _convert(name: str, text: str, default: Any) -> Any:
    """Type a flag value by its default's type, as guided-diffusion's argparser does."""
    try:
        if isinstance(default, bool):
            if text.lower() in TRUE_WORDS:
                return True
            if text.lower() in FALSE_WORDS:
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

    Only the flags present are returned; unknown names and sampling-script flags raise FlagError
    naming them.
    """
    if not isinstance(text, str):  # shlex.split(None) reads stdin (python 3.11), a list has no .read
        raise TypeError(f"parse_flags: text must be a str, got {type(text).__name__}")
    known = known_flags()
    try:
        tokens = shlex.split(text)
    except ValueError as e:  # an unbalanced quote
        raise FlagError(f"flag string {text!r}: {e}") from None
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
            raise _unknown_flag(name, known)
        if name in SAMPLING_FLAGS:
            raise _sampling_flag(name)
        out[name] = _convert(name, value, known[name])
        i += 1
    return out


def format_flags(flags: dict[str, Any]) -> str:
    """A flag string that :func:`parse_flags` reads back (empty values quoted)."""
    return " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in flags.items())


def _typed(name: str, value: Any, default: Any) -> Any:
    """A flag value from a dict (metadata, compat keywords) checked against its default's type."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(default, int):
            ok = float(value).is_integer()
            value = int(value) if ok else value
    else:
        sequence = name.endswith(("resolutions", "channel_mult")) and isinstance(value, (tuple, list))
        ok = isinstance(value, str) or sequence
    if not ok:
        raise FlagError(f"flag --{name} {value!r}: expected a {type(default).__name__}")
    return value


def _tuple(name: str, value: Any, number) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    try:
        return tuple(number(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise FlagError(f"bad value {value!r} for --{name}: expected numbers like 16,8") from None


def configs_from_flags(
    kind: str,
    flags: dict[str, Any],
    spelled: Mapping[str, str] | None = None,
    flags_option: str | None = None,
) -> tuple[NetConfig, DiffusionConfig]:
    """The network and process configs of a (partial) flag dict; absent flags take the original's
    defaults. A flag of another network kind, or a sampling flag with a value, is a FlagError.
    ``spelled`` names a flag the user gave as an option instead ({"image_size": "--image-size"}),
    so an error names what they typed; ``flags_option`` names the option the flags go in (train's
    --flags), so an error's fix "pass --channel_mult 1" says where it goes: into the flags given
    (a second --flags option would replace them)."""
    if not (isinstance(kind, str) and kind in CONFIGS):
        raise ValueError(unknown_choice("network kind", kind, CONFIGS))
    if not isinstance(flags, Mapping):  # a flag string goes through parse_flags first
        raise TypeError(
            f"configs_from_flags: flags must be a dict (parse_flags(text)), got {type(flags).__name__}"
        )
    known = known_flags()
    net_flags = _NET_FLAGS[kind]
    net: dict[str, Any] = {}
    process: dict[str, Any] = {}
    class_cond, num_classes = False, NUM_CLASSES
    for name, value in flags.items():
        if name not in known:
            raise _unknown_flag(name, known)
        value = _typed(name, value, known[name])
        if name in SAMPLING_FLAGS:
            if value != SAMPLING_FLAGS[name][0]:
                raise _sampling_flag(name)
            continue
        if name in _DIFFUSION_FLAGS:
            process[_DIFFUSION_FLAGS[name]] = value
        if kind != "classifier" and name in _CLASS_FLAGS:
            class_cond = value if name == "class_cond" else class_cond
            num_classes = value if name == "num_classes" else num_classes
        elif name in net_flags:
            field = net_flags[name]
            if field == "attention_resolutions":
                value = _tuple(name, value, int)
            elif field == "channel_mult":
                value = _tuple(name, value, _number)
            net[field] = value
        elif name not in _DIFFUSION_FLAGS:
            hint = (
                " (a classifier's flags go in --classifier-flags)" if name in _NET_FLAGS["classifier"] else ""
            )
            raise FlagError(f"--{name} is not a {kind} model flag{hint}")
    if kind != "classifier":
        net["num_classes"] = num_classes if class_cond else None
    try:
        return CONFIGS[kind](**net), DiffusionConfig(**process)
    except FlagError:
        raise
    except ConfigError as e:
        raise as_flag_error(e, kind, spelled, flags_option) from None


def as_flag_error(
    e: ConfigError, kind: str, spelled: Mapping[str, str] | None = None, flags_option: str | None = None
) -> FlagError:
    """A config's error in the words of the flags the user wrote, not the config's fields (see
    :func:`configs_from_flags`); also for a config the data fitted (train's image size)."""
    fields = {**_NET_FLAGS[kind], **_DIFFUSION_FLAGS}
    names = {field: f"--{flag}" for flag, field in fields.items()}
    names.update({fields[f]: option for f, option in (spelled or {}).items() if f in fields})
    message = re.sub(r"\b[a-z_]+\b", lambda m: names.get(m[0], m[0]), str(e))
    if flags_option:
        message = re.sub(r"\bpass (--[a-z_]+ [0-9.,]+)", rf'add "\1" to {flags_option}', message)
    return FlagError(message)
