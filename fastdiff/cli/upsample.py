"""``fastdiff upsample``: ADM-U super-resolution of a base run's samples (64->256, 128->512).

The command parses its options and prints the summary; the run (the low-res npz checked against
the upsampler, the run folder, resume, ranks) is the library's, in fastdiff.runs.upsample.
"""

from __future__ import annotations

from pathlib import Path

import click

from fastdiff.choices import SAMPLER_NAMES
from fastdiff.cli.paths import UserPath
from fastdiff.cli.sample import echo, run_options, summary_line


@click.command("upsample")
@click.option("--preset", help="Upsampler preset (upsampler64-256, upsampler128-512); with --checkpoint.")
@click.option("--flags", "flag_string", help="guided-diffusion super-resolution flags, over --preset's.")
@click.option("--checkpoint", type=UserPath(path_type=Path), help="Upsampler weights (.pt or .safetensors).")
@click.option(
    "--low-res",
    "low_res_path",
    type=UserPath(path_type=Path),
    required=True,
    help="npz of low-resolution samples (arr_0 uint8 NHWC, arr_1 labels), e.g. from fastdiff sample.",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Images to make (default: one per low-res image; more cycle through them).",
)
@click.option(
    "--sampler",
    type=click.Choice(SAMPLER_NAMES),
    default="ddpm",
    show_default=True,
    help="Sampling method (super_res_sample.py: ddpm).",
)
@click.option("--steps", type=int, default=None, help="Sampling steps (ddpm: 250, ddim: 25, dpm++2m: 20).")
@click.option(
    "--respacing", default=None, help='guided-diffusion respacing string instead of --steps ("250").'
)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta (0: deterministic).")
@run_options(Path("upsampled"))
def upsample_command(low_res_path, out, **options):
    """Super-resolve low-resolution samples with an ADM-U upsampler (64->256, 128->512).

    The second stage of the cascade (ADM-G + ADM-U), as guided-diffusion's super_res_sample.py.
    """
    from fastdiff.cli.main import import_torch

    import_torch()
    from fastdiff.runs.upsample import upsample_file_run  # torch: not for --help

    echo(summary_line(upsample_file_run(low_res_path, out, **options)))  # its keywords are the options
