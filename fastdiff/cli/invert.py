"""``fastdiff invert``: images to latents and back, sampled with deterministic DDIM (eta 0) so a
latent always gives the same image (``fastdiff interpolate`` samples the path between two).

The command parses its options and prints what was made; the work is the library's
(fastdiff.runs.invert), whose RunError the group prints as one line.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from fastdiff.cli.paths import UserPath
from fastdiff.cli.sample import ddim_options, echo, resume_option


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
@ddim_options
def invert_command(images, out, resume, classes, to_class, batch_size, progress, **model):
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
    from fastdiff.cli.main import import_torch

    import_torch()
    from fastdiff.runs.ddim import DDIMOptions
    from fastdiff.runs.invert import invert_images  # torch: not for --help

    done = invert_images(
        list(images),
        out,
        DDIMOptions(**model),
        classes=classes,
        to_class=to_class,
        batch_size=batch_size,
        resume=resume,
        progress=progress,
    )
    psnr = done.record["psnr"]
    kept = f" ({done.kept} already there)" if done.kept else ""
    echo(
        f"inverted {len(psnr)} images{kept} over {done.steps} DDIM steps: reconstruction "
        f"PSNR mean {np.mean(psnr):.2f} dB (min {min(psnr):.2f}) -> {out}"
    )
