"""The one way a run holds its --out folder: an exclusive lock for the whole run, so two
processes never write one run (sample and train alike), and a sampling run's folder is refused
unless it is empty or holds a run to resume."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastdiff import distributed
from fastdiff.files import LOCK, is_temp_file, locked_folder, remove_temp_files
from fastdiff.runs import ranks
from fastdiff.runs.errors import RunError

# A sampling run's record in its --out folder (fastdiff.runs.record): the file that makes a
# folder a run that --resume continues.
RUN_FILE = "run.json"
IMAGES, BATCHES = "images", "batches"  # a run folder's PNGs and its batch npz files
RECONSTRUCTED, EDITED = "reconstructed", "edited"  # an inversion's PNGs (fastdiff invert)


def check_writable(folder: Path, what: str) -> None:
    """Whether a file can be written in ``folder`` (or, where it does not exist yet, in the folder
    that would hold it), creating nothing: a place a command cannot write is one line before its
    work, not a traceback after it. ``what`` names it."""
    place = folder
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        if not place.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryFile(dir=place).close()  # an unnamed file: nothing left behind
    except OSError as e:
        raise RunError(f"cannot write to {what}: {e.strerror or e}") from None


def _in_use(out: Path, holder: str = "") -> RunError:
    """The one line for an --out another process holds, either lock (naming the command where its
    lock file does)."""
    return RunError(
        f"{out} is in use by another {holder or 'fastdiff process'}; wait for it or choose another --out"
    )


@contextmanager
def exclusive_folder(out: Path, holder: str) -> Iterator[None]:
    """Create ``out`` if needed and hold ``out/.lock`` (flock, non-blocking) until the block ends;
    the lock file names ``holder``, so a second process gets one line naming the command that
    holds the folder. The lock file stays: deleting it would race. Writing that name is the run's
    first write, so a full disk is one line here, and a folder this call made is removed again."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunError(f"cannot write to --out {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(out, os.read(fd, 200).decode(errors="replace").strip()) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, holder.encode())
        except OSError as e:
            if created:  # still under the lock
                (out / LOCK).unlink()
                out.rmdir()
            raise RunError(f"cannot write to --out {out}: {e.strerror or e}") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def shared_folder(out: Path, names: list[str]) -> Iterator[None]:
    """Hold ``out`` while writing the files ``names`` into it, for a command whose --out may be a
    folder the user shares with other files (fastdiff export onnx, fastdiff nearest): a lock on
    the folder itself, so nothing is left in it and a non-empty folder is fine (unlike
    exclusive_folder's run folders); a second such process gets one line. Under the lock the
    temporary files a killed write of ``names`` left are removed (others' are not ours to take)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is not a folder")
    created = not out.exists()
    with ExitStack() as held:
        try:
            held.enter_context(locked_folder(out))
        except BlockingIOError:
            raise _in_use(out) from None
        except OSError as e:
            raise RunError(f"cannot write to --out {out}: {e.strerror or e}") from None
        try:
            remove_temp_files(out, names)
            yield
        except BaseException:
            if created and not any(out.iterdir()):
                out.rmdir()  # made for a run that wrote nothing
            raise


@contextmanager
def locked_run_folder(
    out: Path, resume: bool = False, *, holder: str = "fastdiff sample", command: str = "sample"
) -> Iterator[None]:
    """Hold ``out`` under an exclusive lock for the whole run; refuse a folder that is not ours.

    Only a folder holding a RUN_FILE that ``command``'s runs write ("sample": sample's and
    upsample's; "invert") is continued, and only with ``resume``; any other non-empty folder is
    refused, so two runs' files never mix. A folder this call created
    is removed again if the run fails before writing anything. Under torchrun rank 0 holds the
    lock and the other ranks share its verdict.
    """
    with ExitStack() as held:
        with ranks.agreed("checking --out"):
            if distributed.is_main():
                held.enter_context(_own_run_folder(out, resume, holder, command))
        yield


def _recorded_command(run_file: Path) -> str:
    """The command whose run ``run_file`` records: an inversion's names itself, a sampling or
    upsampling run's names none; an unreadable one is left to the resume's own check."""
    try:
        record = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return "sample"
    return str(record.get("command", "sample")) if isinstance(record, dict) else "sample"


_RUNS = {"sample": "a sampling run", "invert": "an inversion (fastdiff invert)"}


def _check_ours(out: Path, resume: bool, command: str) -> None:
    """RunError unless ``out`` is empty (but for the lock and temp files) or holds a run of
    ``command``'s and ``resume`` says to continue it: neither sample nor invert continues the
    other's folder, and neither tells the user to --resume the other's."""
    if (out / RUN_FILE).is_file():
        made = _recorded_command(out / RUN_FILE)
        if made != command:
            kind = _RUNS.get(made, f"a run of fastdiff {made}")
            raise RunError(f"{out} holds {kind}, not a run this command continues; choose another --out")
        if not resume:
            raise RunError(f"{out} already holds {_RUNS[command]}; pass --resume or choose another --out")
    elif any(p.name != LOCK and not is_temp_file(p) for p in out.iterdir()):
        what = f"holds no {RUN_FILE} of {_RUNS[command]}"  # the command's own: invert's is no sampling run
        raise RunError(f"--out {out} is not empty and {what}; choose a new or empty folder")


def check_resume(out: Path) -> None:
    """``--resume`` with an --out that does not exist: no run was ever there (a typo'd path), so
    one line rather than a new run started silently elsewhere. A folder a killed run left before
    its first batch or checkpoint (its lock, a log) still resumes, from the start. Every command's
    --resume (sample, upsample, invert, train, train-classifier) asks this."""
    if not out.exists():
        raise RunError(
            f"--resume: --out {out} does not exist, so there is no run to continue; check the path,"
            " create the folder (a job script that always resumes), or drop --resume to start a new run",
            usage=True,
        )


@contextmanager
def _own_run_folder(out: Path, resume: bool, holder: str, command: str) -> Iterator[None]:
    if resume:
        check_resume(out)
    created = not out.exists()
    if out.is_dir() and not (out / LOCK).exists():
        # a folder no fastdiff command ever held (a project folder, the cwd): refused before the
        # lock, which would stay behind in it; under the lock the check is made again
        _check_ours(out, resume, command)
    with exclusive_folder(out, holder):
        try:
            _check_ours(out, resume, command)
            for folder in (out, *(out / name for name in (IMAGES, BATCHES, RECONSTRUCTED, EDITED))):
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
