"""Writing images and run files so that a killed process loses nothing and never leaves a half file.

Every file is written to a temporary name in the same folder and renamed into place; a
batch counts as done only when its ``.npz`` exists, and that file is written last.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# The file a command holds locked (flock) in its --out folder for the whole run
# (fastdiff.runs.folder.exclusive_folder); it stays behind, empty, and marks no content.
LOCK = ".lock"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW tensor -> uint8 NHWC array, rounded as guided-diffusion's sampler script."""
    x = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def image_digest(image: np.ndarray) -> str:
    """An input image by its pixels, 8 hex digits: how a resume knows the images it continues
    from are the ones the run started with (a file's bytes change with each save, not its pixels)."""
    return bytes_digest(np.ascontiguousarray(image).tobytes())


def bytes_digest(data: bytes) -> str:
    """``data`` (an image file's bytes) in 8 hex digits, as image_digest names pixels: the same
    bytes decode to the same pixels, and comparing them costs no decoding."""
    return hashlib.sha256(data).hexdigest()[:8]


# mkstemp's names: "." + the file's name + "." + 8 random characters + the file's suffix;
# temp_folder's (mkdtemp's) the same without the suffix.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]*)?")
_TEMP_FOLDER = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_root() -> Path:
    """fastdiff's cache folder (ONNX exports, measured kernel choices): $FASTDIFF_CACHE, else
    $XDG_CACHE_HOME/fastdiff, else ~/.cache/fastdiff, the XDG rule other tools follow."""
    root = os.environ.get("FASTDIFF_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastdiff"


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside ``path`` for the block to write, renamed over ``path`` when the
    block ends (same folder, so the rename is atomic) and removed if it fails.

    The file gets the mode a plain open() would give (mkstemp's 0600 would hide results from others).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename it over ``path`` (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        write(tmp)


def place_file(source: Path, target: Path, content: bytes | None = None) -> None:
    """``target`` becomes ``source`` (a hard link, else a copy) or ``content``, atomically: a reader
    sees the old file or the new one, never half of it (the export caches take files this way)."""

    def write(tmp):
        if content is not None:
            Path(tmp).write_bytes(content)
            return
        os.remove(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    atomic_write(target, write)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a server), or None when
    matplotlib (an optional extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int) -> None:
    """Write a matplotlib figure as PNG atomically, then free it (pyplot keeps every open figure)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    import matplotlib.pyplot as plt

    plt.close(fig)


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` (left behind by a kill)."""
    m = _TEMP_NAME.fullmatch(path.name)
    return m is not None and Path(m["name"]).suffix == (m["suffix"] or "")


def temp_folder(path: Path) -> Path:
    """A new hidden folder beside ``path`` for writing it in several files (an ONNX graph and its
    weights' side file) before renaming them into place; :func:`remove_temp_files` knows its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))


def _temp_of(path: Path) -> str | None:
    """The final name a killed write's temporary file or :func:`temp_folder` in ``path`` was
    for, or None: a folder counts only if it holds nothing but files of that name (``NAME``,
    ``NAME.data``), so a user's folder that happens to be named alike is never taken for one."""
    if path.is_symlink():
        return None
    if path.is_file():
        return _TEMP_NAME.fullmatch(path.name)["name"] if is_temp_file(path) else None
    m = _TEMP_FOLDER.fullmatch(path.name)
    if m is None or not path.is_dir():
        return None
    name = m["name"]
    ours = all(
        p.is_file() and not p.is_symlink() and (p.name == name or p.name.startswith(f"{name}."))
        for p in path.iterdir()
    )
    return name if ours else None


def remove_temp_files(folder: Path, names: Sequence[str] | None = None) -> int:
    """Delete killed writes' temporary files and folders in ``folder``; only safe while no writer
    runs there. ``names``: only those for these final names (a folder other writers share)."""
    removed = 0
    for p in folder.iterdir() if folder.is_dir() else ():
        name = _temp_of(p)
        if name is None or (names is not None and name not in names):
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed += 1
    return removed


@contextmanager
def locked_folder(folder: Path, wait: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``folder`` itself (created if needed) until the block ends: the
    lock for a command writing a few named files into a folder the user may share with anything
    (``--out .``), which leaves nothing behind in it (a run's own folder holds LOCK instead).
    BlockingIOError when another process holds it, unless ``wait``: then that line goes to stderr
    and the call blocks until the lock is free (a silent wait looked like a hang)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait is None:
                    raise
                print(wait, file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            # NFS emulates flock with a write lock, which a folder's read-only descriptor cannot
            # take: there the command runs unlocked, as it did before, rather than not at all
            if e.errno not in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        yield
    finally:
        os.close(fd)


def in_channels(img: Image.Image, channels: int) -> Image.Image:
    """``img`` upright, as 8-bit L (``channels`` 1) or RGB. Upright: turned as its EXIF orientation
    says, as every viewer shows it (a phone's portrait photo is stored sideways). 16-bit greyscale
    is scaled down first: PIL's convert clips it to 255, so a 16-bit PNG would read as a white image."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")


def transparent(img: Image.Image) -> bool:
    """Whether ``img`` has transparency that :func:`in_channels` drops, as guided-diffusion's
    convert("RGB") does: an alpha channel, or a palette's or RGB's transparent colour."""
    return "A" in img.getbands() or "transparency" in img.info


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


def save_npz(path: Path, *arrays: np.ndarray | None, **named: np.ndarray) -> None:
    """``arrays`` as ``arr_0``, ``arr_1``, ... (a trailing None left out: the evaluator's
    ``arr_0`` images with ``arr_1`` labels only when class-conditional), ``named`` by name."""
    kept = list(arrays)
    while kept and kept[-1] is None:
        kept.pop()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, *kept, **named)

    atomic_write(path, write)


class NpzStream:
    """An npz being written member after member (:func:`npz_stream`) in np.savez's layout: stored,
    zip64 members, the same .npy headers, so np.load and zip-streaming readers take it."""

    def __init__(self, z: zipfile.ZipFile):
        self._zip = z

    def add(self, name: str, array: np.ndarray) -> None:
        """A member written whole, as np.savez writes it: a run's settings, its labels."""
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    @contextmanager
    def member(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype
    ) -> Iterator[Callable[[np.ndarray], None]]:
        """A member of ``shape`` and ``dtype`` written from chunks along its first axis, each one
        passed to the function the block gets (and no longer held here); all its rows by the end."""
        dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        rows = 0
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)

            def write(chunk: np.ndarray) -> None:
                nonlocal rows
                if chunk.dtype != dtype or chunk.shape[1:] != shape[1:]:
                    raise ValueError(
                        f"{name}: a {chunk.dtype} chunk of shape {chunk.shape} in {dtype} {shape}"
                    )
                rows += len(chunk)
                f.write(np.ascontiguousarray(chunk))  # zipfile counts its nbytes

            yield write
            if rows != shape[0]:
                raise ValueError(f"{name}: chunks of {rows} rows for shape {shape}")


@contextmanager
def npz_stream(path: Path) -> Iterator[NpzStream]:
    """An npz the block writes member by member (:class:`NpzStream`), renamed into place when it
    ends: a run's npz (9.8 GB for 50,000 ImageNet-256 samples) is never whole in memory, where
    np.savez needs it whole, and twice over to collect it."""
    with atomic_file(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        yield NpzStream(z)


def save_npz_streamed(
    path: Path, members: Iterable[tuple[str, tuple[int, ...], np.dtype, Iterable[np.ndarray]]]
) -> None:
    """An npz written member by member from chunks, one chunk in memory at a time
    (:func:`npz_stream`); each member is (name, full shape, dtype, chunks along the first axis)."""
    with npz_stream(path) as npz:
        for name, shape, dtype, chunks in members:
            with npz.member(name, shape, dtype) as write:
                for chunk in chunks:
                    write(chunk)
