"""What a sampling run writes into its folder, each file atomically (fastdiff.files): a batch's
PNGs, then its npz (last, so the npz marks the batch done), and at the end the evaluator-format
npz of every sample and a grid of the first hundred."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastdiff.files import save_grid, save_npz, save_npz_streamed, save_png
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


def merge_batches(out: Path, batches: list[tuple[int, int]], image: tuple, labelled: bool) -> None:
    """The batches' npz files (samples lo..hi each) in order as one npz, and the grid of its first
    hundred images. The npz is streamed batch by batch: one batch in memory, not the whole run
    (twice it, for np.savez: 20 GB for 50,000 ImageNet-256 samples, after hours of sampling)."""
    n = batches[-1][1]
    first: list[np.ndarray] = []  # the grid's images

    def images():
        for b in range(len(batches)):
            with np.load(batch_npz(out, b)) as z:
                part = z["arr_0"]
            have = sum(map(len, first))
            if have < 100:
                first.append(part[: 100 - have].copy())
            yield part

    def labels():
        for b in range(len(batches)):
            with np.load(batch_npz(out, b)) as z:
                yield z["arr_1"].astype(np.int64, copy=False)

    members = [("arr_0", (n, *image), np.uint8, images())]
    if labelled:
        members.append(("arr_1", (n,), np.int64, labels()))
    with writing(out):
        save_npz_streamed(out / final_npz_name(n, image), members)
        save_grid(np.concatenate(first), out / "grid.png", ncol=10 if n >= 10 else None)
