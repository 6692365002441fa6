"""Every architecture and process option against guided-diffusion (tests/vectors/variants.pt).

The recipe of calls is ``tests/vectors/variants.py``; guided-diffusion ran it to make the file, and
here fastdiff's compat layer runs the same calls from the same flags and seeded weights. Each
variant runs on the product's CPU path (``auto``) and, in the slow stage, on the plain PyTorch
references.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch
from builders import rel_err
from conftest import VARIANTS_FILE, load_case
from test_compat_scripts import ORIGINAL, needs_original
from vectors.variants import VARIANTS, run_variant

from fastdiff.compat import guided_diffusion as gd

CASES = load_case(VARIANTS_FILE)["cases"]

# float32 rounding of one forward pass; a gradient or a 4-5 step loop compounds it. Measured worst
# cases (both modes): forward 7.5e-7, logits 2.7e-7, losses 1.2e-7, input gradient 1.3e-6,
# DDPM 1.2e-6, DDIM 6.6e-6: every margin is 13x or more.
TOLERANCE = {
    "out": 1e-5,
    "logits": 1e-5,
    "grad": 1e-4,
    "losses": 1e-5,
    "bpd": 1e-5,
    "ddim_reverse": 1e-5,
    "ddpm": 1e-4,
    "ddim": 1e-4,
}


def _pairs(got: dict, want: dict):
    """(name, got, want) per tensor, training-loss and bpd terms one by one."""
    assert set(got) == set(want)
    for key, w in want.items():
        if isinstance(w, dict):
            assert set(got[key]) == set(w), key
            yield from ((key, f"{key}/{term}", got[key][term], w[term]) for term in w)
        else:
            assert got[key].shape == w.shape, key
            yield key, key, got[key], w


def test_the_file_covers_every_variant():
    assert set(CASES) == set(VARIANTS)


# The product's path in the default suite; the references (a second run of every variant) in the
# slow stage, which CI also runs.
@pytest.mark.parametrize("mode", ["auto", pytest.param("reference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_variant_matches_the_original(name, mode, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", mode)
    case = CASES[name]
    got = run_variant(gd, torch, case["kind"], case["flags"])
    # An fp16 variant: within twice the original's own fp16 error (against its fp32 outputs) of
    # the original's values, and of the fp32 values (as accurate as the original, give or take 2x).
    own, fp32 = {}, {}
    if "fp32_outputs" in case:
        for _, what, w, w32 in _pairs(case["outputs"], case["fp32_outputs"]):
            own[what], fp32[what] = 2 * rel_err(w, w32), w32
    for key, what, g, w in _pairs(got, case["outputs"]):
        assert rel_err(g, w) <= max(TOLERANCE[key], own.get(what, 0.0)), what
        if what in fp32:
            assert rel_err(g, fp32[what]) <= own[what], f"{what} against fp32"


def random_flags(seed: int) -> tuple[str, dict]:
    """A seeded draw of (kind, flags) crossing the options the file's variants change one at a
    time: sizes, level counts and widths, attention levels and heads, blocks, pools, schedules,
    losses. Every draw is valid for both implementations (widths are multiples of 32, heads
    divide them, the process has the 8 steps the recipe indexes and a 4-step DDIM stride)."""
    r = random.Random(seed)
    kind = r.choice(["process", "process", "process", "superres", "classifier"])
    if kind == "classifier":
        return kind, {
            **gd.classifier_defaults(),
            "image_size": 64,
            "classifier_width": 64,  # each level's width a multiple of its 64-channel heads
            "classifier_depth": r.randint(1, 2),
            "classifier_attention_resolutions": r.choice(["16,8", "8", "32,16,8", "4"]),
            "classifier_use_scale_shift_norm": r.random() < 0.5,
            "classifier_resblock_updown": r.random() < 0.5,
            "classifier_pool": r.choice(["attention", "adaptive", "spatial", "spatial_v2"]),
        }
    schedule = r.choice(["linear", "cosine"])
    flags = {
        "diffusion_steps": r.choice([25, 30] if schedule == "linear" else [8, 12, 17]),
        "noise_schedule": schedule,
        "learn_sigma": r.random() < 0.5,
        "use_kl": r.random() < 0.3,
        "predict_xstart": r.random() < 0.3,
        "rescale_timesteps": r.random() < 0.4,
        "rescale_learned_sigmas": r.random() < 0.7,
        "class_cond": True,  # the recipe's guidance reads the labels
        "num_channels": 32,
        "num_res_blocks": r.randint(1, 2),
        "num_heads": r.choice([1, 2, 4]),
        "num_head_channels": r.choice([-1, -1, 32]),
        "num_heads_upsample": r.choice([-1, 1, 2]),
        "use_scale_shift_norm": r.random() < 0.5,
        "resblock_updown": r.random() < 0.5,
        "dropout": r.choice([0.0, 0.1]),  # eval mode: no effect, as in the original
        "use_checkpoint": r.random() < 0.3,
    }
    if kind == "superres":
        flags.update(large_size=64, small_size=r.choice([8, 16, 32]), attention_resolutions="8")
        return kind, {**gd.sr_model_and_diffusion_defaults(), **flags}
    size = r.choice([8, 16, 32])
    levels = r.randint(1 if size < 32 else 2, 3)
    pixels = [size >> i for i in range(levels) if size >> i <= 16]  # milliseconds of attention
    flags.update(
        image_size=size,
        channel_mult=",".join(str(r.choice([1, 2, 3])) for _ in range(levels)),
        num_channels=r.choice([32, 64]) if size < 32 else 32,  # seconds, not minutes, per draw
        attention_resolutions=",".join(str(p) for p in r.sample(pixels, r.randint(1, len(pixels)))),
        use_new_attention_order=r.random() < 0.5,
    )
    return kind, {**gd.model_and_diffusion_defaults(), **flags}


@needs_original
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_random_flags_match_the_original(seed, monkeypatch):
    """:func:`random_flags`' draw through run_variant's recipe, on the product's path."""
    _matches_the_original(*random_flags(seed), monkeypatch)


def _matches_the_original(kind: str, flags: dict, monkeypatch) -> None:
    """run_variant's recipe on guided-diffusion's script_util (imported live) and on compat."""
    monkeypatch.syspath_prepend(ORIGINAL)
    original = importlib.import_module("guided_diffusion.script_util")
    want = run_variant(original, torch, kind, flags)
    got = run_variant(gd, torch, kind, flags)
    for key, what, g, w in _pairs(got, want):
        assert rel_err(g, w) <= TOLERANCE[key], f"{what} of {kind} {flags}"


# Networks with no res blocks, which the original builds (a down path of the input conv's width,
# attention on the up path only) and fastdiff refused; dropout 1.0, which it also refused, rides
# along (eval mode: no effect, as in the original).
DEPTH_ZERO = {
    "process": (
        "process",
        {
            **gd.model_and_diffusion_defaults(),
            "image_size": 16,
            "num_channels": 32,
            "num_res_blocks": 0,
            "channel_mult": "1,2",
            "attention_resolutions": "16,8",
            "num_heads": 2,
            "num_heads_upsample": 1,
            "class_cond": True,
            "learn_sigma": True,
            "use_scale_shift_norm": True,
            "resblock_updown": True,
            "dropout": 1.0,
            "diffusion_steps": 25,
        },
    ),
    "superres": (
        "superres",
        {
            **gd.sr_model_and_diffusion_defaults(),
            "large_size": 64,
            "small_size": 16,
            "num_channels": 32,
            "num_res_blocks": 0,
            "attention_resolutions": "8",
            "num_head_channels": 32,
            "class_cond": True,
            "learn_sigma": True,
            "dropout": 1.0,
            "diffusion_steps": 25,
        },
    ),
    "classifier": (
        "classifier",
        {
            **gd.classifier_defaults(),
            "image_size": 64,
            "classifier_width": 64,
            "classifier_depth": 0,
            "classifier_attention_resolutions": "32,16,8",
            "classifier_use_scale_shift_norm": True,
            "classifier_resblock_updown": True,
        },
    ),
}


@pytest.mark.parametrize("name", sorted(DEPTH_ZERO))
def test_depth_zero_runs(name):
    kind, flags = DEPTH_ZERO[name]
    for what, value in run_variant(gd, torch, kind, flags).items():
        values = value.values() if isinstance(value, dict) else [value]
        assert all(torch.isfinite(v).all() for v in values), what


@needs_original
@pytest.mark.parametrize("name", sorted(DEPTH_ZERO))
def test_depth_zero_matches_the_original(name, monkeypatch):
    _matches_the_original(*DEPTH_ZERO[name], monkeypatch)
