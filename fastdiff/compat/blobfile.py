"""A local-files stand-in for ``blobfile``, which guided-diffusion's scripts import for file I/O.

``fastdiff gd-run`` serves it as ``blobfile`` only when the real package is not installed; it
knows plain paths only (no gs:// or az:// URLs).
"""

from __future__ import annotations

import glob as _glob
import os
import shutil

join = os.path.join
dirname = os.path.dirname
basename = os.path.basename
exists = os.path.exists
isdir = os.path.isdir
listdir = os.listdir
remove = os.remove
rmtree = shutil.rmtree
glob = _glob.glob


def BlobFile(path, mode: str = "r", **_options):  # noqa: N802 (blobfile's name)
    """``open(path, mode)``; blobfile's streaming and caching options have no local meaning."""
    return open(path, mode)  # noqa: SIM115 (the caller closes it, as with blobfile)


def makedirs(path) -> None:
    os.makedirs(path, exist_ok=True)


def copy(src, dst, overwrite: bool = False) -> None:
    if not overwrite and os.path.exists(dst):
        raise FileExistsError(dst)
    shutil.copyfile(src, dst)
