"""Writing images and run files so that a killed process loses nothing and never leaves a half file.

Every file is written to a temporary name in the same folder and renamed into place; a
batch counts as done only when its ``.npz`` exists, and that file is written last.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW tensor -> uint8 NHWC array, rounded as guided-diffusion's sampler script."""
    x = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename it over ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def save_png(img: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: _pil(img).save(tmp, format="PNG"))


def save_grid(images: np.ndarray, path: Path, ncol: int | None = None, pad: int = 2) -> None:
    """Tile uint8 NHWC images into one PNG (about square unless ``ncol`` is given)."""
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = img
    save_png(grid, path)


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    """The evaluator's format: ``arr_0`` uint8 NHWC, ``arr_1`` labels when class-conditional."""
    arrays = [images] if labels is None else [images, labels]

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, *arrays)

    atomic_write(path, write)
