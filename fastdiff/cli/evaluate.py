"""``fastdiff evaluate REF SAMPLES``: FID, sFID, Inception Score, precision and recall as ADM's
evaluator computes them, in PyTorch (no TensorFlow, no download).

REF is a reference batch npz (guided-diffusion's ``VIRTUAL_*.npz`` unchanged, or any ``arr_0``
npz), an image folder (read as training reads it, at the samples' size) or ``mnist`` for the 500
held-out digits; SAMPLES is an npz as ``fastdiff sample`` writes.
Features come from the FID Inception-v3 (``--inception PATH``) or, for 1-channel 28/32-px images,
the bundled MNIST CNN, which needs no download. Under torchrun each rank computes the features
of its block of batches and rank 0, having gathered them, scores and prints.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from fastdiff.cli.paths import UserPath, UserText
from fastdiff.cli.sample import batch_size_option, device_option, threads_option, with_options
from fastdiff.cli.train import skip_bad_images_option

FEATURES = ("auto", "inception", "mnist")


def feature_options(command):
    """How a feature network runs over images (evaluate and nearest): --batch-size, --device,
    --threads, --progress."""
    return with_options(
        command,
        [
            batch_size_option(64),
            device_option,
            threads_option,
            click.option(
                "--progress/--no-progress", default=True, show_default=True, help="Show progress bars."
            ),
        ],
    )


def network_options(command):
    """Which feature network (evaluate and nearest): --features, --inception."""
    return with_options(
        command,
        [
            click.option(
                "--features",
                type=click.Choice(FEATURES),
                default="auto",
                show_default=True,
                help="Feature network (auto: the MNIST CNN for 1-channel 28/32-px images unless "
                "--inception or FASTDIFF_INCEPTION is given, else Inception).",
            ),
            click.option(
                "--inception",
                type=UserPath(path_type=Path),
                envvar="FASTDIFF_INCEPTION",
                help="FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or "
                "torch-fidelity's); env FASTDIFF_INCEPTION.",
            ),
        ],
    )


def load_images(spec: str, image_shape: tuple[int, int, int], split: str = "train", skip_bad_images=False):
    """``mnist`` (its training or held-out split), an npz or an image folder -> uint8 NHWC array;
    a folder's bad images skipped as training skips them with ``skip_bad_images``."""
    import functools

    import numpy as np

    from fastdiff.cli.train_run import report_skipped
    from fastdiff.runs import ranks
    from fastdiff.training.data import ArrayDataset, load_dataset

    h, w, c = image_shape
    scan = functools.partial(ranks.mapped, f"scanning {spec}")  # the ranks share a folder's scan
    ds = load_dataset(
        spec, image_size=h, channels=c, split=split, skip_bad_images=skip_bad_images, mapper=scan
    )
    report_skipped(ds)
    if isinstance(ds, ArrayDataset):
        images = ds.images
    else:  # uint8 filled image by image: a float copy of a whole folder is 4-8 bytes a pixel
        images = np.empty((len(ds), ds.image_size, ds.image_size, ds.channels), dtype=np.uint8)
        for i in range(len(ds)):
            images[i] = ((ds[i][0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
    if images.shape[1:] != (h, w, c):
        raise click.ClickException(
            f"{spec} holds {'x'.join(map(str, images.shape[1:]))} images but the samples are {h}x{w}x{c}"
        )
    return images


def resolve_reference(spec: str, image_shape: tuple[int, int, int], skip_bad_images: bool = False):
    """``mnist`` -> the held-out digits; an image folder -> its images at the samples' shape (as
    training reads it), so a user's own data is a reference without an npz; else an npz path."""
    from fastdiff.evaluation.npz import from_array, read_npz

    if spec == "mnist":
        from fastdiff.training.data import get_mnist

        val = get_mnist("val")
        return from_array(val.images, "reference mnist (held-out digits)", labels=val.labels)
    if Path(spec).is_dir():
        images = load_images(spec, image_shape, skip_bad_images=skip_bad_images)
        return from_array(images, f"reference {spec}")
    return read_npz(spec, role="reference")


def choose_network(features: str, image_shape: tuple[int, int, int], inception: Path | None, device):
    """``auto``: the MNIST CNN for 1-channel 28/32-px images, else the FID Inception."""
    from fastdiff.evaluation.networks import load_inception, load_mnist_features

    h, _, c = image_shape
    if features == "auto":
        features = "mnist" if c == 1 and h in (28, 32) and inception is None else "inception"
    return load_mnist_features(device=device) if features == "mnist" else load_inception(inception, device)


def check_json_path(path: Path | None, inputs: dict[str, Path]) -> None:
    """--json is checked before the features are computed: a long run is not lost at its end,
    and ``inputs`` (role -> file) are not overwritten by the scores."""
    from fastdiff.runs.folder import check_writable

    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise click.ClickException(f"--json {path} is a folder; give a file name")
    for role, source in inputs.items():
        if path.exists() and source.exists() and path.samefile(source):
            raise click.ClickException(f"--json {path} is the {role} file; give another file name")
    check_writable(path.parent, f"--json {path}")


def write_json(path: Path, record: dict) -> None:
    from fastdiff.files import atomic_write

    text = json.dumps(record, indent=1) + "\n"
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as e:
        raise click.ClickException(f"cannot write --json {path}: {e.strerror or e}") from None


@contextmanager
def progress_bars(enabled: bool):
    """``make(what, images)``, a new bar's update for each feature pass, the last pass's bar closed
    when the block ends however it ends: an interrupt's line starts at the line's start, not after
    a bar left half drawn."""
    from fastdiff.progress import progress_bar

    bars = []

    def make(what: str, total: int):
        for bar in bars:  # the previous pass is done
            bar.close()
        bars[:] = [
            progress_bar(total=total, desc=f"{what} features", unit="img", disable=not enabled, leave=False)
        ]
        return bars[0].update

    try:
        yield make
    finally:
        for bar in bars:
            bar.close()


@click.command("evaluate")
@click.argument("ref", type=UserText())
@click.argument("samples", type=UserPath(path_type=Path))
@network_options
@click.option(
    "--json",
    "json_path",
    type=UserPath(path_type=Path, allow_dash=True),
    help="Also write the numbers here as JSON; '-': the JSON alone on stdout (the report on stderr).",
)
@skip_bad_images_option
@feature_options
def evaluate_command(
    ref, samples, features, inception, json_path, skip_bad_images, batch_size, device, threads, progress
):
    """Score samples against a reference batch: FID, sFID, Inception Score, precision, recall.

    REF is a reference batch npz (guided-diffusion's unchanged), a folder of images (resized
    and center-cropped to the samples' size, as training reads it) or 'mnist' for the held-out
    digits; SAMPLES is an npz as fastdiff sample writes it.

    \b
    Examples:
      fastdiff evaluate mnist s/samples_64x32x32x1.npz
      fastdiff evaluate VIRTUAL_imagenet64_labeled.npz run/samples_100x64x64x3.npz \\
          --inception pt_inception-2015-12-05-6726825d.pth --json - | jq .fid
    """
    from fastdiff import distributed
    from fastdiff.evaluation.metrics import EvaluationError
    from fastdiff.evaluation.npz import read_npz
    from fastdiff.evaluation.scores import EvaluationConfig, check_sets, evaluate
    from fastdiff.runs import ranks
    from fastdiff.runs.device import choose_threads, resolve_device
    from fastdiff.runs.features import features_over_ranks
    from fastdiff.training.data import DataError

    check_json_path(json_path, {"samples": samples, **({} if ref == "mnist" else {"reference": Path(ref)})})
    dev = ranks.join(resolve_device(device))
    choose_threads(threads)
    try:
        smp = read_npz(samples, role="samples")
        reference = resolve_reference(ref, smp.image_shape, skip_bad_images)
        config = EvaluationConfig(batch_size=batch_size, device=str(dev))
        check_sets(reference, smp, config)
        net = choose_network(features, smp.image_shape, inception, dev)
        with progress_bars(progress and distributed.is_main()) as bars:
            scores = evaluate(
                reference, smp, net, config, activations=features_over_ranks(net, batch_size, dev, bars)
            )
    except (EvaluationError, DataError) as e:
        raise click.ClickException(str(e)) from None
    if scores is None:  # a rank that handed its features to rank 0
        return
    for w in scores.warnings:
        click.echo(f"warning: {w}", err=True)
    json_out = json_path is not None and str(json_path) == "-"  # stdout is then the JSON's alone
    lines = [
        f"Features: {scores.feature_network} "
        f"({scores.num_reference} reference, {scores.num_samples} samples)",
        f"Inception Score: {scores.inception_score}",
        f"FID: {scores.fid}",
        f"sFID: {scores.sfid}",
        f"Precision: {scores.precision}",
        f"Recall: {scores.recall}",
    ]
    if scores.class_match is not None:
        lines.append(f"Class match: {scores.class_match}")
    click.echo("\n".join(lines), err=json_out)
    if json_path is not None:
        record = {**scores.to_dict(), "reference": ref, "samples": str(samples)}
        if json_out:
            click.echo(json.dumps(record, indent=1))
        else:
            write_json(json_path, record)
    sys.stdout.flush()
