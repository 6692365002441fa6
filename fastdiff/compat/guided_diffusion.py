"""guided-diffusion's ``script_util`` names, returning fastdiff models and processes.

Code written against guided-diffusion (``create_model_and_diffusion(**args)``, then
``diffusion.ddim_sample_loop(model, shape, cond_fn=..., model_kwargs=...)``) runs unchanged;
``fastdiff gd-run`` serves this module as ``guided_diffusion.script_util``. The processes are
``respace.SpacedDiffusion``; their sampling loops and ``FASTDIFF_GD_ENGINE`` are described in
``fastdiff.compat.gaussian_diffusion``.
"""

from __future__ import annotations

import argparse

from ..config import ConfigError
from ..diffusion import schedule
from ..diffusion.config import DiffusionConfig
from ..models import flags as gd_flags
from ..models.presets import build_network
from .gaussian_diffusion import ENGINE_ENV, loop_engine  # noqa: F401 (gd-run's and the tests' handle)
from .respace import SpacedDiffusion, space_timesteps  # noqa: F401 (script_util re-exports it)
from .unet import (  # noqa: F401 (as script_util)
    _COMPAT_CLASS,
    EncoderUNetModel,
    SuperResModel,
    UNetModel,
    recompute_as_the_original,
    unconverted,
)

# Read by create_model / sr_create_model at call time, as the original's builders read it:
# ``script_util.NUM_CLASSES = 10`` before building gives a 10-class model.
NUM_CLASSES = 1000


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """script_util's keyword builder of the (respaced) process. A respacing the process cannot
    take, or one keeping under 2 steps, is a ConfigError naming the flag (the original's
    ValueError or IndexError; gd-run's one line)."""
    config = DiffusionConfig(
        steps=steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
    )
    try:
        schedule.kept_steps(steps, timestep_respacing or [steps])
    except ValueError as e:
        raise ConfigError(f"timestep_respacing {timestep_respacing!r}: {e}") from None
    return SpacedDiffusion.from_config(config, timestep_respacing)


def _diffusion(f: dict) -> SpacedDiffusion:
    """The process of a bound flag dict (the builders' diffusion flags)."""
    return create_gaussian_diffusion(
        steps=f["diffusion_steps"],
        timestep_respacing=f["timestep_respacing"],
        **{
            k: f[k]
            for k in gd_flags.diffusion_defaults()
            if k not in ("diffusion_steps", "timestep_respacing")
        },
    )


def _network(kind: str, flags: dict):
    """The network the flags describe, as the compat class of its type: the original's builders
    return its ``unet`` classes (``isinstance`` holds), whose ``load_state_dict`` says in one
    error what a checkpoint made for other flags lacks; in fp32 whatever ``use_fp16`` says, as
    the original's (``unconverted``)."""
    _check_size(kind, flags)
    config = gd_flags.configs_from_flags(kind, flags)[0]
    net = build_network(unconverted(config))
    net.config = config
    net.__class__ = _COMPAT_CLASS[type(net)]  # same layout: only the constructor differs
    return recompute_as_the_original(net)


def _check_size(kind: str, flags: dict) -> None:
    """The classifier's and the upsampler's builders have no channel_mult, as the original's: a
    size without a table entry is the original's error, not fastdiff's advice to pass
    --channel_mult, which their scripts refuse as an unrecognized argument."""
    if kind == "diffusion":
        return
    name = "large_size" if kind == "superres" else "image_size"
    sizes = sorted(gd_flags.CONFIGS[kind]._channel_mult_table)
    if flags[name] not in sizes:
        what = "super-resolution model" if kind == "superres" else kind
        raise ConfigError(
            f"unsupported {name.replace('_', ' ')}: {flags[name]} (a {what} is built at"
            f" {', '.join(map(str, sizes))} pixels; the original's script has no --channel_mult)"
        )


def diffusion_defaults() -> dict:
    return gd_flags.diffusion_defaults()


def model_and_diffusion_defaults() -> dict:
    return {**gd_flags.model_defaults(), **gd_flags.diffusion_defaults()}


def classifier_defaults() -> dict:
    return gd_flags.classifier_defaults()


def classifier_and_diffusion_defaults() -> dict:
    return {**gd_flags.classifier_defaults(), **gd_flags.diffusion_defaults()}


def sr_model_and_diffusion_defaults() -> dict:
    """In the original's order: model_and_diffusion_defaults() less the flags the super-resolution
    builder lacks, then large_size and small_size."""
    values = {**gd_flags.sr_defaults(), **gd_flags.diffusion_defaults()}
    names = [k for k in model_and_diffusion_defaults() if k in _SR_MODEL_AND_DIFFUSION_ORDER]
    return {k: values[k] for k in [*names, "large_size", "small_size"]}


# Positional parameter orders of the original builders (their signatures list every flag).
_MODEL_AND_DIFFUSION_ORDER = (
    "image_size class_cond learn_sigma num_channels num_res_blocks channel_mult num_heads"
    " num_head_channels num_heads_upsample attention_resolutions dropout diffusion_steps noise_schedule"
    " timestep_respacing use_kl predict_xstart rescale_timesteps rescale_learned_sigmas use_checkpoint"
    " use_scale_shift_norm resblock_updown use_fp16 use_new_attention_order"
).split()
_CLASSIFIER_ORDER = (
    "image_size classifier_use_fp16 classifier_width classifier_depth classifier_attention_resolutions"
    " classifier_use_scale_shift_norm classifier_resblock_updown classifier_pool"
).split()
_CLASSIFIER_AND_DIFFUSION_ORDER = (
    _CLASSIFIER_ORDER
    + (
        "learn_sigma diffusion_steps noise_schedule timestep_respacing use_kl predict_xstart"
        " rescale_timesteps rescale_learned_sigmas"
    ).split()
)
_SR_MODEL_AND_DIFFUSION_ORDER = (
    "large_size small_size class_cond learn_sigma num_channels num_res_blocks num_heads num_head_channels"
    " num_heads_upsample attention_resolutions dropout diffusion_steps noise_schedule timestep_respacing"
    " use_kl predict_xstart rescale_timesteps rescale_learned_sigmas use_checkpoint use_scale_shift_norm"
    " resblock_updown use_fp16"
).split()
_SR_MODEL_ORDER = (
    "large_size small_size num_channels num_res_blocks learn_sigma class_cond use_checkpoint"
    " attention_resolutions num_heads num_head_channels num_heads_upsample use_scale_shift_norm dropout"
    " resblock_updown use_fp16"
).split()
# create_model's own defaults (not model_and_diffusion_defaults'): image_size, num_channels and
# num_res_blocks have none.
_CREATE_MODEL_DEFAULTS = dict(
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
)
_CREATE_MODEL_ORDER = ["image_size", "num_channels", "num_res_blocks", *_CREATE_MODEL_DEFAULTS]


def _bind(name: str, order: list[str], defaults: dict, args: tuple, flags: dict) -> dict:
    """Positional and keyword flags over their defaults, by the original's parameter order.

    A flag missing from ``defaults`` is required; unknown or doubled names are a TypeError, as
    for the original's signatures.
    """
    if len(args) > len(order):
        raise TypeError(f"{name}() takes {len(order)} positional arguments but {len(args)} were given")
    doubled = sorted(set(order[: len(args)]) & set(flags))
    if doubled:
        raise TypeError(f"{name}() got multiple values for: {', '.join(doubled)}")
    unknown = sorted(set(flags) - set(order))
    if unknown:
        raise TypeError(f"{name}() got unexpected flag(s): {', '.join(unknown)}")
    bound = {**defaults, **dict(zip(order, args, strict=False)), **flags}
    missing = [k for k in order if k not in bound]
    if missing:
        raise TypeError(f"{name}() missing flag(s): {', '.join(missing)}")
    return bound


def create_model(*args, **flags):
    """The ADM UNet from the original create_model's arguments (NUM_CLASSES labels if class_cond)."""
    f = _bind("create_model", _CREATE_MODEL_ORDER, _CREATE_MODEL_DEFAULTS, args, flags)
    return _network("diffusion", {**f, "num_classes": NUM_CLASSES})


def create_model_and_diffusion(*args, **flags):
    """-> (UNetModel, SpacedDiffusion); missing flags take ``model_and_diffusion_defaults()``."""
    f = _bind(
        "create_model_and_diffusion", _MODEL_AND_DIFFUSION_ORDER, model_and_diffusion_defaults(), args, flags
    )
    model = create_model(**{k: f[k] for k in _CREATE_MODEL_ORDER})
    return model, _diffusion(f)


def create_classifier(*args, **flags):
    """The noisy-image classifier (EncoderUNetModel); 1000 logits whatever NUM_CLASSES says, as in
    the original."""
    f = _bind("create_classifier", _CLASSIFIER_ORDER, classifier_defaults(), args, flags)
    return _network("classifier", {**f, "num_classes": 1000})


def create_classifier_and_diffusion(*args, **flags):
    """-> (EncoderUNetModel, SpacedDiffusion) from ``classifier_and_diffusion_defaults()`` flags."""
    f = _bind(
        "create_classifier_and_diffusion",
        _CLASSIFIER_AND_DIFFUSION_ORDER,
        classifier_and_diffusion_defaults(),
        args,
        flags,
    )
    classifier = create_classifier(**{k: f[k] for k in _CLASSIFIER_ORDER})
    return classifier, _diffusion(f)


def sr_create_model(*args, **flags):
    """The ADM-U upsampler from the original sr_create_model's (all required) arguments."""
    f = _bind("sr_create_model", _SR_MODEL_ORDER, {}, args, flags)
    return _network("superres", {**f, "num_classes": NUM_CLASSES})


def sr_create_model_and_diffusion(*args, **flags):
    """-> (SuperResModel, SpacedDiffusion); missing flags take ``sr_model_and_diffusion_defaults()``."""
    f = _bind(
        "sr_create_model_and_diffusion",
        _SR_MODEL_AND_DIFFUSION_ORDER,
        sr_model_and_diffusion_defaults(),
        args,
        flags,
    )
    model = sr_create_model(**{k: f[k] for k in _SR_MODEL_ORDER})
    return model, _diffusion(f)


def str2bool(v) -> bool:
    """argparse type of boolean flags: yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if v.lower() in gd_flags.TRUE_WORDS:
        return True
    if v.lower() in gd_flags.FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError("boolean value expected")


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: dict) -> None:
    """One ``--name`` option per entry, typed by its default (str for None, str2bool for bools)."""
    for name, value in default_dict.items():
        kind = str if value is None else str2bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", default=value, type=kind)


def args_to_dict(args, keys) -> dict:
    return {k: getattr(args, k) for k in keys}
