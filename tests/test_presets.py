"""guided-diffusion flags, the typed configs they become, and the released-checkpoint presets."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from builders import build_classifier, build_superres, build_unet

from fastdiff.config import ConfigError
from fastdiff.diffusion import DiffusionConfig
from fastdiff.models import (
    PRESETS,
    ClassifierConfig,
    FlagError,
    SuperResConfig,
    UNetConfig,
    build_network,
    build_preset,
    configs_from_flags,
    flags_of,
    get_preset,
    parse_flags,
)
from fastdiff.models.flags import classifier_defaults, diffusion_defaults, model_defaults, sr_defaults


def preset_flags(name: str) -> dict:
    p = get_preset(name)
    return flags_of(p.net, p.process)


README_256 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)


def test_defaults_are_guided_diffusions():
    assert model_defaults() == dict(
        image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
        num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False,
        use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
        use_new_attention_order=False,
    )  # fmt: skip
    assert diffusion_defaults() == dict(
        learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
        use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
    )  # fmt: skip
    assert classifier_defaults() == dict(
        image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
        classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention",
    )  # fmt: skip
    sr = sr_defaults()
    assert sr["large_size"] == 256 and sr["small_size"] == 64
    assert not {"image_size", "channel_mult", "use_new_attention_order"} & set(sr)


def test_parse_flags_readme_string():
    flags = parse_flags(README_256)
    assert flags == dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=256,
        learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64,
        num_res_blocks=2, resblock_updown=True, use_fp16=True, use_scale_shift_norm=True,
    )  # fmt: skip
    assert type(flags["num_channels"]) is int and type(flags["use_fp16"]) is bool


def test_parse_flags_forms_and_types():
    flags = parse_flags("--dropout=0 --class_cond=false --noise_schedule cosine --channel_mult ''")
    assert flags == dict(dropout=0.0, class_cond=False, noise_schedule="cosine", channel_mult="")
    assert type(flags["dropout"]) is float
    assert parse_flags("") == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ("--image_size 64 --no_such_flag 3", "no_such_flag"),
        # a typo, or an option's spelling, names the flag it looks like (none: nothing to say)
        ("--num_chanels 32", r"^unknown flag --num_chanels; did you mean --num_channels\?$"),
        ("--image-size 32", r"^unknown flag --image-size; did you mean --image_size\?$"),
        ("--bogus 1", r"^unknown flag --bogus$"),
        ("--class_cond maybe", "class_cond"),
        ("--num_channels 1.5", "num_channels"),
        ("--image_size", "no value"),
        ("image_size 64", "expected a --flag"),
        ('--image_size 64 "unterminated', "No closing quotation"),  # shlex's ValueError, as a FlagError
    ],
)
def test_parse_flags_errors(text, message):
    with pytest.raises(FlagError, match=message):
        parse_flags(text)


def test_flag_and_builder_functions_refuse_the_wrong_kind_of_argument():
    """One TypeError naming the argument: parse_flags(None) read stdin (shlex, python 3.11) and a
    list was an AttributeError; build_network(a flag dict) a KeyError '<class 'dict'>';
    configs_from_flags(a flag string) and flags_of(a network) errors from deep inside."""
    config = UNetConfig(
        image_size=8, model_channels=32, num_res_blocks=1, channel_mult=(1,), attention_resolutions=()
    )
    for call, message in (
        (lambda: parse_flags(None), "parse_flags: text must be a str, got NoneType"),
        (lambda: parse_flags(["--image_size", "64"]), "parse_flags: text must be a str, got list"),
        (lambda: build_network({"image_size": 64}), "build_network: config must be one of UNetConfig, "),
        (
            lambda: configs_from_flags("diffusion", "--image_size 64"),
            "configs_from_flags: flags must be a dict",
        ),
        (
            lambda: flags_of(build_network(config)),
            "flags_of: net must be a network config \\(NetConfig\\), got UNetModel",
        ),
        (lambda: flags_of(config, {}), "flags_of: diffusion must be a DiffusionConfig or None, got dict"),
    ):
        with pytest.raises(TypeError, match=message):
            call()
    assert flags_of(config)["num_channels"] == 32


def test_channel_mult_by_image_size():
    levels = {
        size: UNetConfig(image_size=size, attention_resolutions=()).levels for size in (512, 256, 128, 64, 32)
    }
    assert levels == {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
    }
    assert UNetConfig(image_size=48, channel_mult=(1, 2), attention_resolutions=()).levels == (1, 2)
    assert UNetConfig(channel_mult=(0.5, 1)).widths == (64, 128)
    with pytest.raises(ConfigError, match=r"unsupported image size 48 .*: pass channel_mult 1,2,2,2$"):
        UNetConfig(image_size=48, attention_resolutions=())
    with pytest.raises(ConfigError, match="unsupported image size 48"):
        build_unet(image_size=48)
    # a copy at another size takes that size's multipliers unless they were given
    assert dataclasses.replace(UNetConfig(), image_size=32).levels == (1, 2, 2, 2)
    assert SuperResConfig(image_size=64).levels == (1, 2, 3, 4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: UNetConfig(model_channels=48), r"multiple of 32 \(GroupNorm\)"),
        (lambda: UNetConfig(num_head_channels=48), "not divisible by num_head_channels 48"),
        (lambda: UNetConfig(num_heads=3), "not divisible into 3 attention heads"),
        (lambda: UNetConfig(attention_resolutions=(0,)), "must be positive"),
        (lambda: UNetConfig(dropout=1.5), r"dropout must be in \[0, 1\], got 1.5"),
        (lambda: UNetConfig(dropout=-0.1), r"dropout must be in \[0, 1\], got -0.1"),
        (lambda: UNetConfig(num_res_blocks=-1), "num_res_blocks must be at least 0, got -1"),
        # a UNet's up path has every level's width, with or without res blocks
        (
            lambda: UNetConfig(num_res_blocks=0, model_channels=32, channel_mult=(1, 1.5)),
            r"multiple of 32 \(GroupNorm\)",
        ),
        (lambda: UNetConfig(model_channels="128"), "model_channels '128': expected int"),
        (lambda: UNetConfig(use_fp16=1), "use_fp16 1: expected bool"),
        (lambda: UNetConfig(num_classes=0), "num_classes must be at least 1"),
        (lambda: ClassifierConfig(pool="max"), "unknown pool 'max'"),
        (lambda: ClassifierConfig(pool="attention", num_head_channels=-1), "needs num_head_channels"),
        # heads counted by num_heads have no width to name (the message said "-1 channels")
        (
            lambda: ClassifierConfig(num_head_channels=-1, num_heads=3, pool="adaptive"),
            r"^width 256 is not divisible into 3 attention heads: raise model_channels or"
            r" channel_mult's value at 32x32, or leave 32 out of attention_resolutions$",
        ),
        (lambda: SuperResConfig(small_size=512), "small_size must be in"),
        (lambda: DiffusionConfig(noise_schedule="quadratic"), "unknown noise_schedule 'quadratic'"),
        (lambda: DiffusionConfig(steps=1), "at least 2"),
        (lambda: DiffusionConfig(steps=19), "linear noise_schedule needs at least 20 timesteps"),
    ],
)
def test_configs_check_themselves(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_a_union_is_named_the_same_however_it_was_written():
    """``Optional[str]`` (and Python 3.10's reading of a function's ``str | None = None``) was
    named "expected Optional[str]", ``str | Path | None`` "expected str | pathlib.Path | None"."""
    from pathlib import Path
    from typing import Optional, Union

    from fastdiff.config import check_types

    hints = {"a": Optional[int], "b": Union[str, Path, None], "c": tuple[int, ...] | None}  # noqa: UP007, UP045
    Options = dataclasses.make_dataclass("Options", [(name, hint, None) for name, hint in hints.items()])

    for field, message in (("a", "a 'x': expected int | None"), ("b", "b 1: expected str | Path | None")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_types(Options(**{field: "x" if field == "a" else 1}))
    with pytest.raises(ConfigError, match=re.escape("c 1: expected tuple[int, ...] | None")):
        check_types(Options(c=1))


def test_every_unknown_name_is_refused_in_one_form():
    """Pools, noise and beta schedules and schedule samplers say "unknown KIND 'x'; choose one of:
    ..." with a typo's nearest name, as samplers and engines do (each had its own wording)."""
    from fastdiff.diffusion.schedule import get_named_beta_schedule
    from fastdiff.training.resample import create_named_schedule_sampler

    for make, message in (
        (lambda: ClassifierConfig(pool="atention"), "pool 'atention'; choose one of: adaptive, attention,"),
        (
            lambda: DiffusionConfig(noise_schedule="cosin"),
            "noise_schedule 'cosin'; choose one of: linear, cosine",
        ),
        (
            lambda: get_named_beta_schedule("lienar", 10),
            "beta schedule 'lienar'; choose one of: linear, cosine",
        ),
        (
            lambda: create_named_schedule_sampler("unifrom", 10),
            "schedule sampler 'unifrom'; choose one of: uniform,",
        ),
    ):
        with pytest.raises(ValueError, match="^unknown " + message + ".*; did you mean '[a-z]+'\\?$"):
            make()


def test_config_types_are_normalised():
    c = UNetConfig(attention_resolutions=[16, 8], dropout=0, channel_mult=[1, 2, 3, 4])
    assert c.attention_resolutions == (16, 8) and type(c.dropout) is float
    assert c.channel_mult == (1.0, 2.0, 3.0, 4.0) and c == UNetConfig(channel_mult=(1, 2, 3, 4))
    assert hash(c) == hash(UNetConfig(channel_mult=(1, 2, 3, 4)))  # frozen: usable as a key


def test_flags_round_trip_through_configs():
    for name, preset in PRESETS.items():
        flags = flags_of(preset.net, preset.process)
        assert configs_from_flags(preset.kind, flags) == (preset.net, preset.process), name
    net, process = configs_from_flags("diffusion", parse_flags(README_256))
    assert net.num_classes == 1000 and net.learn_sigma and process.learn_sigma
    assert configs_from_flags("diffusion", {"class_cond": False, "num_classes": 10})[0].num_classes is None


def test_no_res_blocks_and_dropout_one_pass_every_flag_path():
    """guided-diffusion builds networks with no res blocks and with dropout 1.0; fastdiff's configs
    refused them. Flag strings, checkpoint metadata (flags_of) and compat's builders take them."""
    unet_flags = "--image_size 16 --num_channels 32 --num_res_blocks 0 --channel_mult 1,2 --dropout 1.0"
    net, _ = configs_from_flags("diffusion", parse_flags(unet_flags))
    assert (net.num_res_blocks, net.dropout) == (0, 1.0)
    clf, _ = configs_from_flags("classifier", parse_flags("--image_size 64 --classifier_depth 0"))
    sr, _ = configs_from_flags("superres", parse_flags("--large_size 64 --num_res_blocks 0"))
    for config in (net, clf, sr):
        assert configs_from_flags(config.kind, flags_of(config))[0] == config
    from fastdiff.compat import guided_diffusion as gd

    model = gd.create_model(16, 32, 0, channel_mult="1,2", dropout=1.0)
    assert (model.config.num_res_blocks, model.config.dropout) == (0, 1.0)
    assert (
        gd.create_classifier(**{**gd.classifier_defaults(), "classifier_depth": 0}).config.num_res_blocks == 0
    )
    flags = {**gd.sr_model_and_diffusion_defaults(), "large_size": 64, "num_res_blocks": 0}
    assert gd.sr_create_model_and_diffusion(**flags)[0].config.num_res_blocks == 0


@pytest.mark.parametrize(
    "kind, flags, message",
    [
        ("diffusion", {"classifier_width": 64}, "--classifier_width is not a diffusion model flag"),
        ("classifier", {"num_channels": 64}, "--num_channels is not a classifier model flag"),
        ("superres", {"image_size": 64}, "--image_size is not a superres model flag"),
        ("diffusion", {"use_ddim": True}, "sampling-script flag; fastdiff takes --sampler ddim"),
        ("diffusion", {"timestep_respacing": "250"}, "fastdiff takes --steps or --respacing"),
        ("diffusion", {"num_channels": "wide"}, "flag --num_channels 'wide': expected a int"),
        ("diffusion", {"attention_resolutions": "a,b"}, "expected numbers like 16,8"),
        ("diffusion", {"nope": 1}, "unknown flag --nope"),
        ("diffusion", {"class-cond": True}, "unknown flag --class-cond; did you mean --class_cond?"),
        ("diffusion", {"num_channels": -8}, "--num_channels must be at least 1"),
        ("superres", {"large_size": 48}, "unsupported image size 48"),
        ("diffusion", {"image_size": 33, "channel_mult": "1,2"}, "--image_size 33 must be divisible by 2"),
        (
            "classifier",
            {"image_size": 36, "channel_mult": "1,2,2,2"},
            "--image_size 36 must be divisible by 8",
        ),
        ("superres", {"large_size": 66, "channel_mult": "1,2,2"}, "--large_size 66 must be divisible by 4"),
        # each size error ends on a channel_mult that fits: the given one's levels the size can halve
        ("diffusion", {"image_size": 36, "channel_mult": "0.5,1,2,3"}, r"\): pass --channel_mult 0.5,1,2$"),
        ("superres", {"large_size": 66}, r"defaults are for 64, 256, 512\): pass --channel_mult 1,2$"),
        ("classifier", {"classifier_width": 40}, r"channel_mult x 40 .* multiple of 32"),
        # no flag sets the classifier's 64-channel heads: the message named none that helps
        (
            "classifier",
            {"image_size": 16, "classifier_width": 32, "channel_mult": "1"},
            r"width 32 .* raise --classifier_width or the last --channel_mult$",
        ),
        # ... nor did "the last --channel_mult" help where an earlier level attends (32x32 here)
        (
            "classifier",
            {"image_size": 32, "classifier_width": 32},
            r"width 32 .* raise --classifier_width or --channel_mult's value at 32x32, or leave 32 out"
            r" of --classifier_attention_resolutions$",
        ),
        ("diffusion", {"num_res_blocks": -1}, "--num_res_blocks must be at least 0, got -1"),
        ("classifier", {"classifier_depth": -1}, "--classifier_depth must be at least 0, got -1"),
        # with no res blocks a classifier's every block has the input conv's width: it must divide
        (
            "classifier",
            {"image_size": 32, "classifier_width": 48, "classifier_depth": 0},
            r"^the first level's width \(--channel_mult x 48 = 48; with --classifier_depth 0 every"
            r" block has it\) must be a multiple of 32 \(GroupNorm\)$",
        ),
        (
            "classifier",
            {"image_size": 32, "classifier_width": 32, "classifier_depth": 0},
            r"width 32 .* raise --classifier_width or the first --channel_mult$",
        ),
    ],
)
def test_flags_nothing_silently_dropped(kind, flags, message):
    with pytest.raises(FlagError, match=message):
        configs_from_flags(kind, flags)
    # a dict may hold the sampling scripts' flags at their defaults (guided-diffusion's defaults dicts)
    defaults = {**model_defaults(), **diffusion_defaults()}
    configs_from_flags("diffusion", {**defaults, "use_ddim": False, "batch_size": 16})


@pytest.mark.parametrize(
    "text", ["--use_ddim False", "--classifier_scale 1.0", "--batch_size 16", "--timestep_respacing ''"]
)
def test_sampling_flags_in_a_flag_string_are_refused_at_the_scripts_defaults_too(text):
    """fastdiff's defaults differ from the scripts' (ddim, the bundled model's scale): dropping a
    flag the user typed because it equals the scripts' default would run something else."""
    with pytest.raises(FlagError, match="sampling-script flag; fastdiff takes --"):
        parse_flags(f"--image_size 64 {text}")


def test_create_unet_from_flags():
    model = build_unet(**{**parse_flags(README_256), "num_channels": 32, "num_head_channels": 32})
    assert model.image_size == 256 and model.num_classes == 1000 and model.out_channels == 6
    assert model.channel_mult == (1, 1, 2, 2, 4, 4)
    assert model.attention_resolutions == (8, 16, 32)
    assert model.dtype == torch.float16  # use_fp16 True
    # a small MNIST-style model: 1 channel, 10 classes, 32x32
    mnist = build_unet(image_size=32, in_channels=1, num_classes=10, class_cond=True, num_channels=32)
    assert mnist.input_blocks[0][0].in_channels == 1 and mnist.label_emb.num_embeddings == 10
    out = mnist(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert out.shape == (2, 1, 32, 32)
    with pytest.raises(FlagError, match="num_chanels"):
        build_unet(num_chanels=64)


def test_create_classifier_and_superres_from_flags():
    clf = build_classifier(image_size=64, classifier_width=64, classifier_depth=1, num_classes=10)
    assert clf(torch.randn(1, 3, 64, 64), torch.tensor([5])).shape == (1, 10)
    sr = build_superres(large_size=64, small_size=16, num_channels=32, learn_sigma=True, diffusion_steps=100)
    out = sr(torch.randn(1, 3, 64, 64), torch.tensor([5]), low_res=torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 6, 64, 64)


NAMES = [
    "imagenet64", "imagenet128", "imagenet256", "imagenet256-uncond", "imagenet512",
    "classifier64", "classifier128", "classifier256", "classifier512",
    "upsampler64-256", "upsampler128-512", "lsun-bedroom", "lsun-cat", "lsun-horse",
]  # fmt: skip


def test_preset_names_and_lookup():
    assert set(NAMES) <= set(PRESETS)
    assert get_preset("imagenet256").kind == "diffusion"
    assert get_preset("classifier128").kind == "classifier"
    assert get_preset("upsampler64-256").kind == "superres"
    with pytest.raises(ValueError, match="unknown preset 'nope'; choose one of: imagenet64"):
        get_preset("nope")
    flags = preset_flags("imagenet256")
    expected = {**model_defaults(), **diffusion_defaults(), **parse_flags(README_256), "num_classes": 1000}
    del expected["timestep_respacing"]
    assert flags == {**expected, "in_channels": 3, "sigma_small": False}
    assert build_network(get_preset("imagenet256").net, "meta").image_size == 256


def test_preset_flags_match_readme():
    f = preset_flags("imagenet64")
    assert (f["num_channels"], f["num_res_blocks"], f["dropout"]) == (192, 3, 0.1)
    assert f["noise_schedule"] == "cosine"
    assert f["use_new_attention_order"] and f["num_head_channels"] == 64
    f = preset_flags("imagenet128")
    assert (f["num_heads"], f["num_head_channels"]) == (4, -1)
    assert not preset_flags("imagenet512")["use_fp16"]
    assert not preset_flags("imagenet256-uncond")["class_cond"]
    assert preset_flags("lsun-cat")["dropout"] == 0.1 and not preset_flags("lsun-cat")["class_cond"]
    assert preset_flags("classifier64")["classifier_depth"] == 4
    assert preset_flags("upsampler128-512")["attention_resolutions"] == "32,16"
    assert preset_flags("upsampler128-512")["large_size"] == 512


# Parameter counts stated in the ADM paper (Table 11 and the model card): diffusion models and
# upsamplers, in millions.
PAPER_PARAMS = {
    "imagenet64": 296,
    "imagenet128": 422,
    "imagenet256": 554,
    "imagenet512": 559,
    "lsun-bedroom": 552,
    "upsampler64-256": 312,
    "upsampler128-512": 309,
}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_preset_parameter_counts(name):
    model = build_preset(name, device="meta")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_builds(name):
    model = build_preset(name, device="meta")
    preset = get_preset(name)
    assert next(model.parameters()).device.type == "meta"
    if preset.kind == "classifier":
        assert model.out[2].c_proj.out_channels == 1000
    elif preset.kind == "superres":
        assert model.input_blocks[0][0].in_channels == 6 and model.image_size == preset.net.image_size
    else:
        assert model.image_size == preset.net.image_size and model.out_channels == 6
    assert model.config == preset.net
    if name == "imagenet512":
        assert model.input_blocks[0][0].out_channels == 128  # channel_mult 0.5 * 256


@pytest.mark.parametrize("name", list(PRESETS))
def test_printed_flags_read_back(name):
    """`fastdiff presets NAME` prints what `--flags` (and guided-diffusion's argparse) reads back."""
    from click.testing import CliRunner

    from fastdiff.cli.presets import presets_command

    result = CliRunner().invoke(presets_command, [name])
    assert result.exit_code == 0, result.output
    preset = get_preset(name)
    assert configs_from_flags(preset.kind, parse_flags(result.output)) == (preset.net, preset.process)


def test_an_older_spelling_of_the_flags_is_the_same_network():
    """Runs and checkpoints written before the typed configs recorded partial flag dicts; a
    resume compares them as configs."""
    from fastdiff.models import read_metadata
    from fastdiff.runs.loading import BUNDLED_MODEL, same_flags

    old = read_metadata(BUNDLED_MODEL)["flags"]  # has timestep_respacing, lacks sigma_small
    new = flags_of(*configs_from_flags("diffusion", old))
    assert old != new and same_flags(old, new)
    assert not same_flags({**old, "num_channels": 64}, new) and not same_flags(None, new)


def test_a_network_builds_on_meta_without_filling_its_weights(monkeypatch):
    """A meta tensor has no values: its random fills are skipped. On torch 2.10 each meta
    ``uniform_`` ran a Python decomposition that imported sympy, 2.5 s of every sampling start
    (the CLI builds its networks on meta); torch 2.13 hides it, so the fills are counted here."""
    from fastdiff.models.presets import PRESETS, build_network

    fills = []
    for name in ("uniform_", "normal_"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            fills.append(self.device.type)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    net = build_network(PRESETS["mnist"].net, "meta")
    assert fills == [] and all(p.is_meta for p in net.parameters())
    build_network(PRESETS["mnist"].net, "cpu")
    assert fills and set(fills) == {"cpu"}  # on a real device the weights are drawn as before
