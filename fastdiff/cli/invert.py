"""``fastdiff invert`` and ``fastdiff interpolate``: images to latents and back, and paths between
latents, all sampled with deterministic DDIM (eta 0) so a latent always gives the same image.

The commands parse their options and print what was made; the work is the library's
(fastdiff.runs.invert), whose RunError the group prints as one line.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from fastdiff.cli.paths import UserPath, UserText
from fastdiff.cli.sample import batch_size_option, device_options, echo, resume_option, with_options


def _model_options(command):
    """The options invert and interpolate share: the model, DDIM steps, CFG, then where it runs
    (sample's device_options)."""
    options = [
        click.option("--preset", help="Model preset (see `fastdiff presets`); with --checkpoint."),
        click.option("--flags", "flag_string", help="guided-diffusion model flags, instead of --preset."),
        click.option("--checkpoint", type=UserPath(path_type=Path), help="Diffusion model weights."),
        click.option("--steps", type=int, default=None, help="DDIM steps (default 25)."),
        click.option("--respacing", default=None, help="guided-diffusion respacing instead of --steps."),
        click.option("--cfg-scale", type=float, default=None, help="Classifier-free guidance weight w."),
        batch_size_option(16),
    ]
    return with_options(device_options(command), options)


@click.command("invert")
@click.argument("images", nargs=-1, required=True, type=UserPath(path_type=Path))
@click.option(
    "--out",
    type=UserPath(path_type=Path),
    required=True,
    help="Output folder (new or empty, or a killed run's to --resume).",
)
@resume_option
@click.option(
    "--classes",
    default=None,
    help="The images' class ids or class names, cycled (default: each image's class folder or "
    "CLASS_ prefix where the weights name it, or _classK in its name).",
)
@click.option(
    "--to-class", default=None, help="Also regenerate the latents under this class (an id or a class name)."
)
@_model_options
def invert_command(images, out, resume, classes, to_class, batch_size, **model):
    """DDIM-invert IMAGES to latents x_T (reconstruction PSNR); --to-class edits their class.

    IMAGES are files or folders, read as `fastdiff train` reads its --data: a folder's images
    recursively (not those in --out), any size resized and center-cropped to the model's (as
    training does, noted once), any mode converted to its channels.

    Writes latents.npz (arr_0 x_T float32 NCHW, arr_1 labels, respacing, cfg_scale where given;
    `fastdiff interpolate` reads it),
    reconstructed/ and edited/ PNGs, comparison.png (inputs, reconstructions, edits as rows, for
    the first 100 images) and invert.json with each image's PSNR and whether it was resized. A
    folder of any size is read and written a batch at a time; after a kill, --resume keeps the
    complete batches and makes the rest.
    """
    from fastdiff.runs.invert import DDIMOptions, invert_images  # torch: not for --help

    done = invert_images(
        list(images),
        out,
        DDIMOptions(**model),
        classes=classes,
        to_class=to_class,
        batch_size=batch_size,
        resume=resume,
    )
    psnr = done.record["psnr"]
    kept = f" ({done.kept} already there)" if done.kept else ""
    echo(
        f"inverted {len(psnr)} images{kept} over {done.steps} DDIM steps: reconstruction "
        f"PSNR mean {np.mean(psnr):.2f} dB (min {min(psnr):.2f}) -> {out}"
    )


@click.command("interpolate")
@click.option(
    "--from",
    "start",
    type=UserText(),
    required=True,
    help="A seed, or LATENTS.npz[:INDEX] from fastdiff invert.",
)
@click.option(
    "--to", "end", type=UserText(), required=True, help="A seed, or LATENTS.npz[:INDEX] from fastdiff invert."
)
@click.option(
    "--frames", type=click.IntRange(min=2), default=8, show_default=True, help="Images, ends included."
)
@click.option(
    "--class", "label", default=None, help="Class of every frame, an id or a class name (default: --from's)."
)
@click.option(
    "--out",
    type=UserPath(path_type=Path),
    default=Path("interpolation.png"),
    show_default=True,
    help="The strip PNG to write.",
)
@_model_options
def interpolate_command(start, end, frames, label, out, batch_size, **model):
    """Sample the spherical interpolation between two latents as one strip PNG.

    A seed's latent is the x_T image 0 of `fastdiff sample --seed S` starts from, so with the same
    model, steps and guidance (ddim, --classifier-scale 0: no classifier here) the strip's ends are
    those samples. Latents from `fastdiff
    invert` bring their steps and --cfg-scale (the defaults here), so the ends are their
    reconstructions where they were inverted with the frames' class (--class, default --from's
    stored one).
    """
    from fastdiff.runs.invert import DDIMOptions, interpolate

    steps = interpolate(
        start, end, out, DDIMOptions(**model), frames=frames, label=label, batch_size=batch_size
    )
    echo(f"{frames} frames from {start} to {end} ({steps} DDIM steps) -> {out}")
