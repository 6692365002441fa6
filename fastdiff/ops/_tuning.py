"""Kernel choices made by measurement, ahead of time: the one place for them.

Where no single choice wins on every shape and GPU (the GroupNorm CUDA-or-Triton backend, the
attention kernels' tiles), the choice for a key (device, shapes, dtype) is measured once, only
inside :func:`autotuning` (the Sampler's warm-up step, before any CUDA graph capture), and kept in
memory and in a JSON file, one section per op. An op's forward never times anything on its own,
so an eager run and a captured graph make the same choice; outside ``autotuning`` a key nobody
measured takes the op's default.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

_tuning = False


@contextlib.contextmanager
def autotuning() -> Iterator[None]:
    """Within this block, a key without a recorded choice is measured once."""
    global _tuning
    previous, _tuning = _tuning, True
    try:
        yield
    finally:
        _tuning = previous


def measuring(x: torch.Tensor) -> bool:
    """Whether a choice for x may be measured now: inside :func:`autotuning`, and not while a CUDA
    graph is being captured (timing there would record the measurement into the graph)."""
    return _tuning and not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def cache_path() -> Path | None:
    """``FASTDIFF_BACKEND_CACHE`` names the file (default: ``backend_choice.json`` in fastdiff's
    cache folder, files.cache_root); empty or "0" keeps choices in memory only."""
    value = os.environ.get("FASTDIFF_BACKEND_CACHE")
    if value is None:
        from fastdiff.files import cache_root  # here: importing fastdiff.ops stays light

        return cache_root() / "backend_choice.json"
    return Path(value) if value not in ("", "0") else None


def _read(path: Path | None) -> dict:
    try:
        if path is not None and path.is_file():
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        pass  # a corrupt or unreadable file only costs a re-measurement
    return {}


class Choices:
    """One op's section of the choice file: key -> a JSON value, read once per process."""

    def __init__(self, section: str):
        self.section = section
        self.values: dict[str, object] = {}
        self.loaded = False

    def get(self, key: str):
        if not self.loaded:
            self.loaded = True
            section = _read(cache_path()).get(self.section)
            if isinstance(section, dict):
                self.values = {**section, **self.values}
        return self.values.get(key)

    def put(self, key: str, value) -> None:
        """Record a choice, and add it to the file (other sections and processes' keys kept;
        written to a temporary file first, so a reader never sees half a file)."""
        from fastdiff.files import atomic_write

        self.values[key] = value
        path = cache_path()
        if path is None:
            return
        try:
            data = _read(path)
            section = data.get(self.section) if isinstance(data.get(self.section), dict) else {}
            data[self.section] = dict(sorted({**section, **self.values}.items()))
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
        except OSError:
            pass  # unwritable: the choice still holds for this process

    def clear(self) -> None:
        """Forget every choice of this process (the file is read again on the next lookup)."""
        self.values, self.loaded = {}, False


@functools.cache
def gpu_name(device: torch.device) -> str:
    """The GPU's name, the first part of every CUDA choice key (asked of the driver once)."""
    return torch.cuda.get_device_name(device)


def time_ms(fn: Callable[[], object], iters: int = 10) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream, after three untimed calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def fastest(candidates: Sequence[T], run: Callable[[T], object], timer=time_ms) -> T | None:
    """The candidate whose ``run(candidate)`` takes least time; one that fails to compile or
    launch is passed over (None when none runs)."""
    best, best_ms = None, float("inf")
    for candidate in candidates:
        try:
            ms = timer(lambda candidate=candidate: run(candidate))
        except Exception:  # triton's compile and launch errors have no common base class
            continue
        if ms < best_ms:
            best, best_ms = candidate, ms
    return best
