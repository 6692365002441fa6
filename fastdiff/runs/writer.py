"""What a sampling run writes into its folder, each file atomically (fastdiff.files): a batch's
PNGs, then its npz (last, so the npz marks the batch done), and at the end the evaluator-format
npz of every sample and a grid of the first hundred."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastdiff.files import save_grid, save_npz, save_png
from fastdiff.runs.folder import BATCHES, IMAGES, writing


def final_npz_name(num_samples: int, image: tuple) -> str:
    h, w, c = image
    return f"samples_{num_samples}x{h}x{w}x{c}.npz"


def batch_npz(out: Path, index: int) -> Path:
    return out / BATCHES / f"batch_{index:05d}.npz"


def write_batch(out: Path, index: int, lo: int, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Batch ``index`` (samples lo, lo+1, ...): one PNG per image (``_classK`` in the name when
    labelled), then the batch's npz."""
    with writing(out):
        for i, img in enumerate(images):
            suffix = "" if labels is None else f"_class{labels[i]}"
            save_png(img, out / IMAGES / f"{lo + i:06d}{suffix}.png")
        save_npz(batch_npz(out, index), images, labels)


def merge_batches(out: Path, num_batches: int, image: tuple, labelled: bool) -> None:
    """The batches' npz files in order as one npz, and the grid of its first hundred images."""
    parts = [_read_batch(out, b, labelled) for b in range(num_batches)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]) if labelled else None
    n = len(images)
    with writing(out):
        save_npz(out / final_npz_name(n, image), images, labels)
        save_grid(images[:100], out / "grid.png", ncol=10 if n >= 10 else None)


def _read_batch(out: Path, index: int, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A batch npz's images and labels, its file closed again: a run of more batches than the
    open-file limit (1024 on many systems) would otherwise fail at the merge."""
    with np.load(batch_npz(out, index)) as z:
        return z["arr_0"], z["arr_1"] if labelled else None
