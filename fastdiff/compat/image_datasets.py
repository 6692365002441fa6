"""guided-diffusion's ``image_datasets``: ``load_data`` over an image folder, without MPI.

As the original: the files are listed recursively in sorted order; a class is the file name's
prefix before the first underscore (sorted class names -> 0..K-1, in subfolders too); rank r of
a torch.distributed group of N reads files r, r+N, ...; batches are (NCHW float32 in [-1, 1],
{"y": int64 labels}) from a shuffled (or, ``deterministic``, in-order) DataLoader with one
worker and ``drop_last``, forever. Images are resized with fastdiff's ``center_crop_arr`` (ADM's
BOX-then-BICUBIC resize); flips and random crops draw from Python's ``random`` in the worker, as
the original's do, so a seeded script sees the original's batches.

Unlike the original: a missing or empty folder, fewer images than a batch, or a truncated image
is a one-line ``DataError`` before any batch (the original fails later, or never yields).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..training import dist
from ..training.data import DataError, center_crop_arr, image_fault, resize_short_side

ORIGINAL_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")  # the original's listing (fastdiff's adds webp)

__all__ = ["ImageDataset", "center_crop_arr", "load_data", "random_crop_arr"]


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
):
    """An endless generator of (images, {"y": labels} or {}) batches of ``batch_size``."""
    if not data_dir:
        raise DataError("unspecified data directory (pass --data_dir)")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    files = _list_image_files_recursively(data_dir)
    if not files:
        raise DataError(f"no images ({', '.join(ORIGINAL_EXTENSIONS)}) found under {data_dir}")
    faults = [fault for fault in map(image_fault, map(Path, files)) if fault is not None]
    if faults:
        more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
        raise DataError(f"{faults[0]}{more}")
    classes = None
    if class_cond:
        names = [os.path.basename(path).split("_")[0] for path in files]
        index = {name: i for i, name in enumerate(sorted(set(names)))}
        classes = [index[name] for name in names]
    dataset = ImageDataset(
        image_size,
        files,
        classes=classes,
        shard=dist.rank(),
        num_shards=dist.world_size(),
        random_crop=random_crop,
        random_flip=random_flip,
    )
    if len(dataset) < batch_size:
        raise DataError(
            f"{len(dataset)} images under {data_dir} for this rank: fewer than one batch of {batch_size}"
        )
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=not deterministic, num_workers=1, drop_last=True
    )
    while True:
        yield from loader


def _list_image_files_recursively(data_dir) -> list[str]:
    """Image paths under ``data_dir``, each folder's entries in sorted order, depth first."""
    results = []
    for entry in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, entry)
        if "." in entry and "." + entry.split(".")[-1].lower() in ORIGINAL_EXTENSIONS:
            results.append(path)
        elif os.path.isdir(path):
            results.extend(_list_image_files_recursively(path))
    return results


class ImageDataset(Dataset):
    """This shard's images as (CHW float32 array in [-1, 1], {"y": label} or {})."""

    def __init__(
        self,
        resolution,
        image_paths,
        classes=None,
        shard=0,
        num_shards=1,
        random_crop=False,
        random_flip=True,
    ):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.local_images)

    def __getitem__(self, idx):
        path = self.local_images[idx]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        crop = random_crop_arr if self.random_crop else center_crop_arr
        arr = crop(img, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out = {}
        if self.local_classes is not None:
            out["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0) -> np.ndarray:
    """A random ``image_size`` square of the image resized so its short side is a random size in
    [image_size / max_crop_frac, image_size / min_crop_frac] (the original's augmentation)."""
    smaller = random.randrange(
        math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1
    )
    arr = np.asarray(resize_short_side(pil_image, smaller))
    top = random.randrange(arr.shape[0] - image_size + 1)
    left = random.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]
