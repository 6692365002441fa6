"""Sampling runs under torchrun: one process per rank, the work dealt out by batch.

Rank 0 owns the run folder (its lock, run.json, the final npz and grid); the batches still
missing are split over the ranks in contiguous blocks, and every batch's noise depends only on
(seed, batch index), so any number of ranks, and any resume, writes the same files as one
process. ``fastdiff evaluate`` and ``fastdiff nearest`` split their feature batches the same way
and gather them on rank 0.
A user error (RunError) that any rank meets before the work starts (a check only rank 0 makes, a file one
node lacks) ends every rank with the same line instead of leaving the others waiting at the
next collective. Without torchrun every helper here is a no-op.
"""

from __future__ import annotations

import atexit
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from fastdiff import distributed
from fastdiff.config import error_line
from fastdiff.runs.errors import RunError

T = TypeVar("T")
U = TypeVar("U")


def join(device: torch.device) -> torch.device:
    """This rank's device once the process group is up (gloo on the CPU, nccl on CUDA with
    ``cuda:LOCAL_RANK`` unless the device names its index), or ``device`` without torchrun."""
    if not distributed.launched():
        return device
    if device.type == "cuda":
        local, gpus = distributed.local_rank(), torch.cuda.device_count()
        if device.index is not None and distributed.local_world_size() > 1:
            raise RunError(
                f"--device {device}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                "pass --device cuda (or auto)"
            )
        if device.index is None and local >= gpus:
            raise RunError(
                f"torchrun started local rank {local} on a machine with {gpus} GPU(s); "
                f"use --nproc_per_node {gpus} or fewer"
            )
    dev = distributed.setup(str(device))
    atexit.register(distributed.cleanup)
    return dev


def _note(failure: Exception | None) -> tuple[str, bool] | None:
    """What the other ranks raise for ``failure``: its line, and whether it is a usage error (the
    CLI's exit 2), so every rank exits with the failing rank's status."""
    if failure is None:
        return None
    if isinstance(failure, RunError):
        return str(failure), failure.usage
    bug = f"{type(failure).__name__}: {failure}"
    return f"rank {distributed.rank()} stopped on a bug ({bug}); see its traceback", False


def _lost_rank(what: str, error: Exception) -> RunError:
    detail = error_line(error)
    return RunError(f"another rank stopped while {what} ({detail}); its own error is above")


@contextmanager
def agreed(what: str) -> Iterator[None]:
    """Run the block on every rank, then compare notes: a rank that failed raises its own error
    (a bug keeps its traceback), and every other rank raises the first failing rank's message as
    its one line (a usage error as one, for the same exit status). ``what`` names the phase for
    the message when a rank is gone altogether."""
    if not distributed.is_initialized():
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as e:  # re-raised below, once the other ranks have heard of it
        failure = e
    try:
        notes = distributed.all_gather_objects(_note(failure))
    except RuntimeError as e:  # a rank died (a kill, a crash): the collective cannot complete
        if failure is not None:
            raise failure from None
        raise _lost_rank(what, e) from None
    if failure is not None:
        raise failure
    first = next((note for note in notes if note is not None), None)
    if first is not None:
        line, usage = first
        raise RunError(line, usage=usage)


def decided_by_main(what: str, make: Callable[[], T]) -> T:
    """``make()`` run by rank 0 alone, its result on every rank, its user error on every rank."""
    value = None
    with agreed(what):
        if distributed.is_main():
            value = make()
    return distributed.broadcast_object(value)


def share(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous block of ``items`` (the blocks differ in length by at most one, in
    rank order), all of them without torchrun: concatenating the ranks' results in rank order
    gives the one-process order."""
    rank, world = distributed.rank(), distributed.world_size()
    return items[rank * len(items) // world : (rank + 1) * len(items) // world]


def mapped(what: str, fn: Callable[[T], U], items: Sequence[T]) -> list[U]:
    """``[fn(x) for x in items]`` on every rank, each rank computing its block (``share``): the
    ranks read an image folder's headers once, not once each. ``items`` must be every rank's
    same list (a folder's listing; one node listing another is every rank's line); ``what``
    names the phase, as ``agreed``'s."""
    if not distributed.is_initialized():
        return [fn(x) for x in items]
    with agreed(what):  # a rank that stopped before (a folder one node lacks) or a bug in fn
        done = [fn(x) for x in share(items)]
        listing = hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()
    parts = distributed.all_gather_objects((listing, len(items), done))
    other = next((r for r, part in enumerate(parts) if part[0] != parts[0][0]), None)
    if other is not None:  # the same line on every rank
        raise RunError(
            f"rank {other} lists other files than rank 0 while {what} ({parts[other][1]} against "
            f"{parts[0][1]}); every rank must see the same files"
        )
    return [y for _, _, part in parts for y in part]


def wait_for_all(what: str) -> None:
    """Barrier; a rank that died meanwhile (torchrun reports it) is one line here, not a traceback."""
    if not distributed.is_initialized():
        return
    try:
        distributed.barrier()
    except RuntimeError as e:
        raise _lost_rank(what, e) from None


def combined(summary: dict) -> dict:
    """One sampling summary for the whole group: the images every rank made in the sampling time
    of the slowest rank, and the ranks' mean seconds per step."""
    parts = distributed.all_gather_objects(summary)
    if len(parts) == 1:
        return summary
    made = sum(p["images"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    per_step = [p["s_per_step"] for p in parts if p["images"]]
    return {
        **summary,
        "images": made,
        "warmup_s": max(p["warmup_s"] for p in parts),
        "seconds": seconds,
        "writing_s": max(p["writing_s"] for p in parts),
        "images_per_s": made / seconds if made and seconds > 0 else 0.0,
        "s_per_step": sum(per_step) / len(per_step) if per_step else 0.0,
        "ranks": len(parts),
    }
