"""``fastdiff nearest SAMPLES.npz --data DATA``: the memorisation check (see fastdiff.evaluation.nearest).

Writes to --out: ``nearest.json`` (thresholds, distance percentiles, flagged samples),
``nearest.npz`` (every sample's neighbours and distances in both spaces), ``nearest.png``
(the most suspicious samples, each followed by its nearest training images in feature space,
then in pixels) and ``distances.png`` (sample-to-train against held-out-to-train distances).
Under torchrun each rank computes the features of its block of batches (fastdiff.runs.features)
and rank 0, having gathered them, measures the distances, writes and prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from fastdiff.cli.paths import UserPath, UserText
from fastdiff.cli.train import skip_bad_images_option

from .evaluate import choose_network, feature_options, load_images, network_options, progress_bars

# What the command writes into --out (which may hold other files: it is locked, not emptied).
WRITES = ["nearest.json", "nearest.npz", "nearest.png", "distances.png"]


def distance_plot(report, path: Path) -> bool:
    """Histograms of nearest-training-image distances, samples against held-out; False without matplotlib."""
    from fastdiff.files import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return False

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, space) in zip(axes, [("features", report.features), ("pixels (RMS)", report.pixels)]):
        both = np.concatenate([space.sample_distance[:, 0], space.heldout_distance])
        lo, hi = both.min(), both.max()
        if hi <= lo:  # every distance equal: zero-width bins drew NaN bars (and numpy warned)
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 40)
        ax.hist(space.heldout_distance, bins, density=True, alpha=0.6, label="held-out -> train")
        ax.hist(space.sample_distance[:, 0], bins, density=True, alpha=0.6, label="sample -> train")
        ax.axvline(space.threshold, color="k", ls="--", label=f"flag below ({report.quantile:g} quantile)")
        ax.set_xlabel(f"distance to the nearest training image, {name}")
        ax.legend(fontsize=8)
    axes[0].set_title(f"{report.feature_network}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


@click.command("nearest")
@click.argument("samples", type=UserPath(path_type=Path))
@click.option(
    "--data", type=UserText(), required=True, help="Training data: 'mnist', an npz or an image folder."
)
@click.option(
    "--held-out",
    "held_out",
    type=UserText(),
    default=None,
    help="Images never trained on (default for --data mnist: its 500 held-out digits).",
)
@skip_bad_images_option
@network_options
@click.option(
    "--k", type=click.IntRange(min=1), default=3, show_default=True, help="Neighbours shown per sample."
)
@click.option(
    "--quantile",
    type=float,
    default=0.01,
    show_default=True,
    help="Flag samples nearer a training image than this fraction of held-out images are.",
)
@click.option(
    "--show", type=click.IntRange(min=1), default=16, show_default=True, help="Samples in nearest.png."
)
@click.option(
    "--out",
    type=UserPath(path_type=Path),
    default=Path("nearest"),
    show_default=True,
    help="Output folder.",
)
@feature_options
def nearest_command(
    samples,
    data,
    held_out,
    skip_bad_images,
    features,
    inception,
    k,
    quantile,
    show,
    out,
    batch_size,
    device,
    threads,
    progress,
):
    """Memorisation check: each sample's nearest training images, flagged near-copies.

    A sample nearer to a training image (in feature space or in pixels) than all but --quantile
    of the held-out images are is flagged."""
    from fastdiff import distributed
    from fastdiff.evaluation.metrics import EvaluationError
    from fastdiff.evaluation.nearest import (
        MemorisationReport,
        NearestConfig,
        check_space,
        neighbour_rows,
        pixels,
        training_copies,
    )
    from fastdiff.evaluation.npz import read_npz
    from fastdiff.files import atomic_write, save_grid, save_npz
    from fastdiff.runs import ranks
    from fastdiff.runs.device import choose_threads, resolve_device
    from fastdiff.runs.features import features_over_ranks
    from fastdiff.runs.folder import check_writable, shared_folder
    from fastdiff.training.data import DataError

    if out.exists() and not out.is_dir():
        raise click.ClickException(f"--out {out} is not a folder")
    check_writable(out, f"--out {out}")  # before the distances and features, not after them
    if held_out is None and data != "mnist":
        raise click.ClickException(
            "--held-out is needed with this --data: images of the same kind never trained on"
        )
    dev = ranks.join(resolve_device(device))
    with ranks.agreed("checking --out"):  # rank 0 writes; a second run into --out is one line now
        if distributed.is_main():
            click.get_current_context().with_resource(shared_folder(out, WRITES))
    choose_threads(threads)
    try:
        config = NearestConfig(k=k, quantile=quantile, device=str(dev))
        smp = read_npz(samples, role="samples")
        net = choose_network(features, smp.image_shape, inception, dev)
        net.check_images(smp.shape)
        train = load_images(data, smp.image_shape, skip_bad_images=skip_bad_images)
        held = load_images(held_out or data, smp.image_shape, split="val", skip_bad_images=skip_bad_images)
        # Under torchrun: rank 0 finds the copies, each rank computes its block of every set's
        # features, and rank 0 alone measures the distances and writes; the others stop here.
        copies = ranks.decided_by_main(
            "finding training copies", lambda: training_copies(held, train, config)
        )
        held = held[~copies]
        if len(held) < 2:
            raise EvaluationError(
                f"the held-out set holds {len(held)} image(s) that are not training images; the "
                "distribution needs more"
            )
        if copies.any() and distributed.is_main():
            click.echo(
                f"warning: {int(copies.sum())} of {len(copies)} held-out images are training images; "
                "they are left out of the threshold",
                err=True,
            )
        images = smp.load()
        with progress_bars(progress and distributed.is_main()) as bars:
            feats = features_over_ranks(net, batch_size, dev, bars)
            spaces = [feats(images, "samples"), feats(train, "train"), feats(held, "held-out")]
        if not distributed.is_main():
            return
        report = MemorisationReport(
            features=check_space(*(s.pool for s in spaces), config),
            pixels=check_space(images, train, held, config, rows=pixels),
            feature_network=net.name,
            quantile=quantile,
        )
    except (EvaluationError, DataError) as e:
        raise click.ClickException(str(e)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        record = {
            **report.to_dict(),
            "samples": str(samples),
            "data": data,
            "held_out": held_out or f"{data} (val)",
        }
        atomic_write(
            out / "nearest.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n")
        )

        save_npz(
            out / "nearest.npz",
            feature_index=report.features.sample_index,
            feature_distance=report.features.sample_distance,
            pixel_index=report.pixels.sample_index,
            pixel_distance=report.pixels.sample_distance,
            heldout_feature_distance=report.features.heldout_distance,
            heldout_pixel_distance=report.pixels.heldout_distance,
        )
        order = report.suspicion_order()[:show]
        neighbours = report.features.sample_index.shape[1]  # --k, or every training image when fewer
        save_grid(neighbour_rows(report, images, train, order), out / "nearest.png", ncol=1 + 2 * neighbours)
        plotted = distance_plot(report, out / "distances.png")
    except OSError as e:
        raise click.ClickException(f"cannot write to {out}: {e.strerror or e}") from None
    flagged = report.flagged
    click.echo(f"Features: {report.feature_network}; {len(train)} training, {len(held)} held-out images")
    for name, space in (("features", report.features), ("pixels", report.pixels)):
        smp_med, held_med = np.median(space.sample_distance[:, 0]), np.median(space.heldout_distance)
        click.echo(
            f"{name}: median distance to a nearest training image {smp_med:.4g} (held-out {held_med:.4g}); "
            f"{int(space.flagged.sum())} below {space.threshold:.4g}"
        )
    click.echo(
        f"Flagged: {int(flagged.sum())} of {len(flagged)} samples ({flagged.mean():.2%}; "
        f"{quantile:.2%} expected by chance) -> {out / 'nearest.json'}"
    )
    if not plotted:
        click.echo("(distances.png skipped: matplotlib is not installed)", err=True)
