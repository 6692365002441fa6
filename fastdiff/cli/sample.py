"""``fastdiff sample``: guided sampling to PNGs, a grid and an evaluator-format npz.

The command parses its options and prints the summary; the run itself (checks, run folder,
resume, ranks, writing) is the library's fastdiff.runs.sample_run, whose RunError the group
prints as one line (fastdiff.cli.main).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from fastdiff.choices import DTYPE_NAMES, ENGINE_NAMES, SAMPLER_NAMES
from fastdiff.cli.paths import UserPath


def echo(line: str) -> None:
    """Print on rank 0 only: a group's summary once, not once per rank."""
    from fastdiff import distributed

    if distributed.is_main():
        click.echo(line)


def summary_line(s: dict) -> str:
    """What a sampling command prints when it is done: counts, timings, where it ran."""
    group = f" x {s['ranks']} ranks" if s.get("ranks", 1) > 1 else ""
    threads = f"{s['threads']} thread{'' if s['threads'] == 1 else 's'}"
    return (
        f"{s['images']} images ({s['skipped']} already there) in {s['seconds']:.1f} s sampling "
        f"(+{s['warmup_s']:.1f} s warm-up/capture, {s['writing_s']:.1f} s writing): "
        f"{s['images_per_s']:.2f} images/s, {s['s_per_step']:.4f} s/step ({s['steps']} steps), "
        f"device {s['device']}, dtype {s['dtype']}, engine {s['engine']}, {threads}"
        f"{group} -> {s['out']}"
    )


def with_options(command, options):
    """``command`` with ``options``, listed in --help in their order."""
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


# every command that runs networks takes these two (evaluate and nearest too)
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads (default: OMP_NUM_THREADS, else the cores not already busy).",
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."
)


# every command that draws a bar of its DDIM steps (sample, upsample, invert, interpolate; train too)
progress_option = click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show a progress bar."
)


def batch_size_option(default: int):
    """--batch-size of a command that runs its networks over images a batch at a time."""
    return click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=default,
        show_default=True,
        help="Images per batch.",
    )


def device_options(command):
    """How and where the steps run: --engine, --threads, --dtype, --device (the same options for
    sample, upsample, invert and interpolate)."""
    return with_options(
        command,
        [
            click.option(
                "--engine",
                type=click.Choice(ENGINE_NAMES),
                default=None,
                help="How the guided step runs (default: graph on CUDA; on the CPU parallel with more "
                "than one thread, else eager).",
            ),
            threads_option,
            click.option(
                "--dtype",
                type=click.Choice(DTYPE_NAMES),
                default="fp32",
                show_default=True,
                help="Compute dtype: the networks cast once (GroupNorm statistics stay fp32). A model's "
                "use_fp16 flag does not set it: fp16 for the speed of the original's fp16 runs on a GPU.",
            ),
            device_option,
        ],
    )


def ddim_options(command):
    """The options invert and interpolate share: the model, DDIM steps, CFG, then where it runs
    (device_options) and --progress."""
    options = [
        click.option("--preset", help="Model preset (see `fastdiff presets`); with --checkpoint."),
        click.option("--flags", "flag_string", help="guided-diffusion model flags, over --preset's."),
        click.option("--checkpoint", type=UserPath(path_type=Path), help="Diffusion model weights."),
        click.option("--steps", type=int, default=None, help="DDIM steps (default 25)."),
        click.option("--respacing", default=None, help="guided-diffusion respacing instead of --steps."),
        click.option("--cfg-scale", type=float, default=None, help="Classifier-free guidance weight w."),
        batch_size_option(16),
    ]
    return with_options(device_options(progress_option(command)), options)


def runtime_options(command):
    """device_options, then --clip-denoised and --progress (sample and upsample)."""
    return device_options(
        with_options(
            command,
            [
                click.option(
                    "--clip-denoised/--no-clip-denoised",
                    default=True,
                    show_default=True,
                    help="Clip x0 predictions to [-1, 1].",
                ),
                progress_option,
            ],
        )
    )


resume_option = click.option(
    "--resume", is_flag=True, help="Continue a killed run in --out from its last complete batch."
)


def run_options(out: Path):
    """The options of a sampling run (sample and upsample): --batch-size, --seed, its folder --out
    (default ``out``) and --resume, then runtime_options."""
    options = [
        batch_size_option(16),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed; the same seed and --batch-size give the same images (each batch draws its noise "
            "from the seed and its index, so another --batch-size keeps only the first batch's).",
        ),
        click.option(
            "--out", type=UserPath(path_type=Path), default=out, show_default=True, help="Output folder."
        ),
        resume_option,
    ]
    return lambda command: with_options(runtime_options(command), options)


@click.command("sample")
@click.option(
    "--preset", help="Named model preset (see `fastdiff presets`); with --checkpoint for its weights."
)
@click.option(
    "--flags",
    "flag_string",
    help="guided-diffusion model flags, over --preset's (a checkpoint's own must agree), e.g. "
    '"--image_size 64 --class_cond True ...".',
)
@click.option(
    "--checkpoint", type=UserPath(path_type=Path), help="Diffusion model weights (.pt or .safetensors)."
)
@click.option(
    "--classifier", type=UserPath(path_type=Path), help="Noisy-image classifier weights for guidance."
)
@click.option(
    "--classifier-preset", help="Classifier preset (default: the one matching the model's image size)."
)
@click.option("--classifier-flags", help="guided-diffusion classifier flags, over --classifier-preset's.")
@click.option(
    "--classifier-scale",
    type=float,
    default=None,
    help="Classifier guidance scale s (0: none; default: the one the bundled model's metadata gives "
    "with its classifier, none for other models).",
)
@click.option(
    "--cfg-scale",
    type=float,
    default=None,
    help="Classifier-free guidance weight w (model needs a null label).",
)
@click.option(
    "--sampler", type=click.Choice(SAMPLER_NAMES), default="ddim", show_default=True, help="Sampling method."
)
@click.option("--steps", type=int, default=None, help="Sampling steps (ddim: 25, ddpm: 250, dpm++2m: 20).")
@click.option(
    "--respacing",
    default=None,
    help='guided-diffusion respacing string instead of --steps ("ddim25", "250"); --steps N is '
    '"ddimN" for ddim (last time T - T/N) and "N" for ddpm and dpm++2m (N times over 0 .. T-1).',
)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta (0: deterministic).")
@click.option(
    "--classes",
    default=None,
    help=(
        "Class ids like 1,207,360 (cycled; or the class names a model trained on your folder keeps), "
        "'uniform' (equal counts, 0, 1, 2, ... in turn; the default) or 'random'."
    ),
)
@click.option(
    "--num-samples", type=click.IntRange(min=1), default=16, show_default=True, help="Images to make."
)
@run_options(Path("samples"))
@click.option(
    "--upsample-with",
    metavar="[PRESET:]CHECKPOINT",
    default=None,
    help="Then super-resolve the samples with this upsampler (e.g. upsampler64-256:64_256_upsampler.pt; "
    "a safetensors with its own flags needs no preset) into OUT/upsampled, as fastdiff upsample does.",
)
@click.option("--upsample-steps", type=int, default=None, help="The upsampler's DDPM steps (default: 250).")
def sample_command(out, **options):
    """Sample images with classifier or classifier-free guidance.

    With no model options, the bundled MNIST model and its classifier are used. OUT gets
    images/, grid.png and samples_NxHxWxC.npz (what fastdiff evaluate scores).

    \b
    Examples:
      fastdiff sample --num-samples 64 --out s/
      fastdiff sample --preset imagenet64 --checkpoint 64x64_diffusion.pt \\
          --classifier 64x64_classifier.pt --classifier-scale 1.0 --steps 25 \\
          --num-samples 100 --batch-size 16 --out run/
      fastdiff sample --checkpoint runs/d/ema_0.9999_0002000.safetensors \\
          --cfg-scale 2 --classes cat,dog --out s/
    """

    def report(stage: str, summary: dict) -> None:
        echo(summary_line(summary) if stage == "sample" else f"upsampled: {summary_line(summary)}")

    from fastdiff.cli.main import import_torch

    import_torch()
    from fastdiff.runs.sample import sample_run  # torch: not for --help

    sample_run(out, report=report, **options)  # the options are sample_run's keywords
