"""The one way a command holds its --out folder: an exclusive lock for the whole run, so two
processes never write one run (sample and train alike)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

LOCK = ".lock"


@contextmanager
def exclusive_folder(out: Path, holder: str) -> Iterator[None]:
    """Create ``out`` if needed and hold ``out/.lock`` (flock, non-blocking) until the block ends;
    a second process gets one line naming ``holder``. The lock file stays: deleting it would race."""
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"--out {out} is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise click.ClickException(f"cannot write to --out {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise click.ClickException(
                f"{out} is in use by another {holder}; wait for it or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)
