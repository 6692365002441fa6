"""The one way a run holds its --out folder: an exclusive lock for the whole run, so two
processes never write one run (sample and train alike), and a sampling run's folder is refused
unless it is empty or holds a run to resume."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastdiff import distributed
from fastdiff.files import is_temp_file, remove_temp_files
from fastdiff.runs import ranks
from fastdiff.runs.errors import RunError

LOCK = ".lock"


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and write (and delete) a file in it, so a place a command
    cannot write is one line before its work, not a traceback after it; ``what`` names it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except FileExistsError:  # mkdir's word for a file where the folder would be
        raise RunError(f"cannot write to {what}: {folder} is not a folder") from None
    except OSError as e:
        raise RunError(f"cannot write to {what}: {e.strerror or e}") from None


@contextmanager
def exclusive_folder(out: Path, holder: str) -> Iterator[None]:
    """Create ``out`` if needed and hold ``out/.lock`` (flock, non-blocking) until the block ends;
    a second process gets one line naming ``holder``. The lock file stays: deleting it would race."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunError(f"cannot write to --out {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"{out} is in use by another {holder}; wait for it or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)


@contextmanager
def locked_run_folder(out: Path, resume: bool) -> Iterator[None]:
    """Hold ``out`` under an exclusive lock for the whole run; refuse a folder that is not ours.

    A folder this call created is removed again if the run fails before writing anything. Under
    torchrun rank 0 holds the lock and the other ranks share its verdict.
    """
    with ExitStack() as held:
        with ranks.agreed("checking --out"):
            if distributed.is_main():
                held.enter_context(_own_run_folder(out, resume))
        yield


@contextmanager
def _own_run_folder(out: Path, resume: bool) -> Iterator[None]:
    created = not out.exists()
    with exclusive_folder(out, "fastdiff sample"):
        try:
            if not (out / "run.json").is_file():
                if any(p.name != LOCK and not is_temp_file(p) for p in out.iterdir()):
                    raise RunError(
                        f"--out {out} is not empty and holds no sampling run (no run.json); "
                        "choose a new or empty folder"
                    )
            elif not resume:
                raise RunError(f"{out} already holds a sampling run; pass --resume or choose another --out")
            for folder in (out, out / "images", out / "batches"):
                remove_temp_files(folder)  # the lock guarantees no writer of ours is running
            yield
        except BaseException:
            if created and [p.name for p in out.iterdir()] == [LOCK]:
                (out / LOCK).unlink()
                out.rmdir()
            raise


@contextmanager
def writing(out: Path) -> Iterator[None]:
    """A failed write (full disk, read-only mount) is the machine's state, not a bug: one line."""
    try:
        yield
    except OSError as e:
        raise RunError(f"cannot write to {out}: {e.strerror or e}") from None
