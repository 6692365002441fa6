"""``fastdiff interpolate``: the spherical interpolation between two latents (seeds, or latents
``fastdiff invert`` wrote), sampled with deterministic DDIM (eta 0) as one strip PNG.

The command parses its options and prints what was made; the work is the library's
(fastdiff.runs.interpolation), whose RunError the group prints as one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from fastdiff.cli.paths import UserPath, UserText
from fastdiff.cli.sample import ddim_options, echo


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
@ddim_options
def interpolate_command(start, end, frames, label, out, batch_size, progress, **model):
    """Sample the spherical interpolation between two latents as one strip PNG.

    A seed's latent is the x_T image 0 of `fastdiff sample --seed S` starts from, so with the same
    model, steps and guidance (ddim, --classifier-scale 0: no classifier here) the strip's ends are
    those samples. Latents from `fastdiff
    invert` bring their steps and --cfg-scale (the defaults here), so the ends are their
    reconstructions where they were inverted with the frames' class (--class, default --from's
    stored one).
    """
    from fastdiff.cli.main import import_torch

    import_torch()
    from fastdiff.runs.ddim import DDIMOptions
    from fastdiff.runs.interpolation import interpolate

    steps = interpolate(
        start,
        end,
        out,
        DDIMOptions(**model),
        frames=frames,
        label=label,
        batch_size=batch_size,
        progress=progress,
    )
    echo(f"{frames} frames from {start} to {end} ({steps} DDIM steps) -> {out}")
