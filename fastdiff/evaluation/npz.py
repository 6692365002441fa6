"""Reading reference batches and sample files: ``arr_0`` uint8 NHWC images (streamed batch by batch
from the npz, so 50,000 ImageNet-256 images never sit in memory at once), ``arr_1`` labels, and
a reference batch's precomputed Inception statistics ``mu``, ``sigma``, ``mu_s``, ``sigma_s``.
Every problem with a file is an :class:`EvaluationError` of one line."""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .metrics import EvaluationError, FeatureStats

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class ImageBatch:
    """Images of one npz (or an in-memory array); ``stats`` = (pool, spatial) when precomputed;
    ``_offset`` is where image 0's bytes start in the file when arr_0 is stored as np.savez stores
    it (uncompressed, C order), so that any images can be read alone."""

    source: str
    shape: tuple[int, int, int, int]  # N, H, W, C
    labels: np.ndarray | None = None
    stats: tuple[FeatureStats, FeatureStats] | None = None
    _path: Path | None = None
    _array: np.ndarray | None = None
    _offset: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape[1:]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self._array is not None:
            for i in range(0, len(self._array), batch_size):
                yield self._array[i : i + batch_size]
            return
        try:
            yield from self._read(batch_size)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            # a bad CRC or deflate stream shows only when the data is read
            raise EvaluationError(f"cannot read {self.source}: {e}") from None

    def load(self) -> np.ndarray:
        """Every image in one array, read into it batch by batch: concatenating the batches would
        hold the images twice (1.2 GB for 50,000 64x64 low-res images, 20 GB at 256x256)."""
        if self._array is not None:
            return self._array
        images = np.empty(self.shape, np.uint8)
        i = 0
        for batch in self.batches(1024):
            images[i : i + len(batch)] = batch
            i += len(batch)
        return images

    def take(self, lo: int, hi: int) -> np.ndarray:
        """Images lo..hi-1 (a writable array), read alone from a stored npz, so that a caller going
        batch by batch holds one batch; a compressed npz cannot be read by offset and is loaded
        whole on the first call instead."""
        if self._offset is None:
            if self._array is None:
                self._array = self.load()
            return self._array[lo:hi]
        n, row = hi - lo, math.prod(self.shape[1:])
        data = bytearray(n * row)
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset + lo * row)
                got = f.readinto(data)
        except OSError as e:
            raise EvaluationError(f"cannot read {self.source}: {e}") from None
        if got != len(data):
            raise EvaluationError(f"{self.source} is truncated (arr_0 ends before image {hi})")
        return np.frombuffer(data, np.uint8).reshape(n, *self.shape[1:])

    def _read(self, batch_size: int) -> Iterator[np.ndarray]:
        with _member(self._path, "arr_0") as f:
            shape, fortran, _ = _header(f, self._path)
            if fortran:  # rare: not streamable, load it whole
                with np.load(self._path) as z:
                    images = _images(z["arr_0"], self.source)
                yield from ImageBatch(self.source, self.shape, _array=images).batches(batch_size)
                return
            row = int(np.prod(shape[1:]))
            for i in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - i)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise EvaluationError(f"{self.source} is truncated (arr_0 ends after {i} images)")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *shape[1:]).reshape(n, *self.shape[1:])


def from_array(images: np.ndarray, source: str, labels: np.ndarray | None = None) -> ImageBatch:
    images = _images(images, source)
    return ImageBatch(source, images.shape, labels=labels, _array=images)


def _check_layout(shape: tuple[int, ...], dtype: np.dtype, source: str) -> tuple[int, int, int, int]:
    if dtype != np.uint8:
        raise EvaluationError(
            f"{source}: arr_0 is {dtype}; expected uint8 images in [0, 255] (N x H x W x C, as fastdiff "
            "sample and the reference batches store them)"
        )
    if len(shape) == 3:
        shape = (*shape, 1)
    if len(shape) != 4:
        raise EvaluationError(f"{source}: arr_0 has shape {shape}; expected images N x H x W x C")
    if shape[3] not in (1, 3) and shape[1] in (1, 3):
        raise EvaluationError(
            f"{source}: arr_0 has shape {shape}, which looks like N x C x H x W; store N x H x W x C"
        )
    if shape[3] not in (1, 3):
        raise EvaluationError(f"{source}: arr_0 has {shape[3]} channels; expected 1 or 3 (N x H x W x C)")
    if shape[1] != shape[2]:
        raise EvaluationError(f"{source}: images are {shape[1]}x{shape[2]}; expected square images")
    if shape[0] == 0:
        raise EvaluationError(f"{source}: arr_0 holds no images")
    if shape[1] == 0:
        raise EvaluationError(f"{source}: arr_0 holds images of 0x0 pixels")
    return tuple(int(s) for s in shape)


def _images(images: np.ndarray, source: str) -> np.ndarray:
    shape = _check_layout(images.shape, images.dtype, source)
    return images.reshape(shape)


class _member:
    """Context manager: the open ``name.npy`` member of an npz (zip) file; ``size`` is its
    length (header and data) as the zip directory records it, ``start`` the file offset of its
    first byte when it is stored as it is (uncompressed, unencrypted), else None."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def __enter__(self):
        try:
            self.zip = zipfile.ZipFile(self.path)
            info = self.zip.getinfo(f"{self.name}.npy")
            self.size, self.start = info.file_size, None
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
                self.start = _local_data_start(self.path, info.header_offset)
            self.file = self.zip.open(f"{self.name}.npy")
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise EvaluationError(f"cannot read {self.path}: {e}") from None
        return self.file

    def __exit__(self, *exc):
        self.file.close()
        self.zip.close()


def _local_data_start(path: Path, header_offset: int) -> int:
    """Where a zip member's data starts: after its 30-byte local header, whose last two 16-bit
    fields are the lengths of the name and extra field that follow it."""
    with open(path, "rb") as f:
        f.seek(header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local file header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return header_offset + 30 + name_len + extra_len


def _header(f, path, name: str = "arr_0") -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of member ``name``; a format version without a public
    reader counts as Fortran order (loaded whole instead of streamed)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
        with np.load(path, mmap_mode=None) as z:
            a = z[name]
        return a.shape, True, a.dtype
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"cannot read {name} of {path}: {e}") from None


def _stats(z, names: set[str], source: str) -> tuple[FeatureStats, FeatureStats]:
    """The precomputed (pool, spatial) statistics, checked here: a bad mean or covariance would
    otherwise fail in a linear algebra routine after every feature is computed."""
    missing = [k for k in STAT_KEYS if k not in names]
    if missing:
        raise EvaluationError(f"{source} has mu but not {', '.join(missing)}")
    stats = []
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        mu, sigma = z[mu_key], z[sigma_key]
        numbers = mu.dtype.kind in "fiu" and sigma.dtype.kind in "fiu"
        if not numbers or mu.ndim != 1 or sigma.shape != mu.shape * 2:
            raise EvaluationError(
                f"{source}: {mu_key} ({mu.dtype}, {mu.shape}) and {sigma_key} ({sigma.dtype}, {sigma.shape}) "
                "are not a mean and a covariance (numbers, D and D x D)"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise EvaluationError(f"{source}: {mu_key} or {sigma_key} holds NaN or infinite values")
        stats.append(FeatureStats(mu, sigma))
    return stats[0], stats[1]


def read_npz(path: str | os.PathLike, role: str = "samples") -> ImageBatch:
    """An npz's images (checked for layout, not read yet), labels and precomputed statistics."""
    path = Path(path)
    source = f"{role} {path}"
    if path.is_dir():
        # a run folder of fastdiff sample or upsample: the npz it wrote is what the user meant
        written = sorted(path.glob("samples_*.npz"))
        hint = f": pass {written[0]}" if len(written) == 1 else ""
        raise EvaluationError(f"{source} is a folder, not an npz file{hint}")
    if not path.is_file():
        raise EvaluationError(f"{source} not found")
    try:
        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
    except (OSError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"cannot read {source}: not an npz file ({e})") from None
    if "arr_0" not in names:
        raise EvaluationError(
            f"{source} has no arr_0 images (found: {', '.join(sorted(names)) or 'nothing'})"
        )
    member = _member(path, "arr_0")
    with member as f:
        shape, fortran, dtype = _header(f, path)
        stored = member.size - f.tell()
        offset = None if fortran or member.start is None else member.start + f.tell()
    shape = _check_layout(shape, dtype, source)
    image_bytes = math.prod(shape[1:])
    if stored < shape[0] * image_bytes:  # else found only after the other file's features
        raise EvaluationError(
            f"{source} is truncated: arr_0 claims {shape[0]} images of {'x'.join(map(str, shape[1:]))} "
            f"but holds {stored // image_bytes}"
        )
    if "arr_1" in names:
        with _member(path, "arr_1") as f:
            if _header(f, path, "arr_1")[2].hasobject:  # pickled: never loaded, and no labels
                names.discard("arr_1")
    try:
        with np.load(path) as z:
            labels = z["arr_1"] if "arr_1" in names else None
            stats = _stats(z, names, source) if "mu" in names else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, EvaluationError):
            raise
        raise EvaluationError(f"cannot read {source}: {e}") from None
    if labels is not None and (labels.ndim != 1 or len(labels) != shape[0] or labels.dtype.kind not in "iu"):
        labels = None  # not fastdiff's labels; the metrics do not need them
    return ImageBatch(source, shape, labels=labels, stats=stats, _path=path, _offset=offset)
