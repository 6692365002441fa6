"""The FASTDIFF_BENCH_* numbers (bench/README.md), read here alone and all checked by ``check()``
before anything runs (bench/conftest.py, bench/run_gpu.py): a typo is one line at the start, not
a traceback in every benchmark or after the GPU stages."""

from __future__ import annotations

import os

from bench import shapes


def _number(name: str, default, kind: type, minimum: float):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum:  # also refuses nan
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name} must be {what} >= {minimum}, not {raw!r}")
    return value


def threads() -> int:
    """CPU intra-op threads of a benchmark process (default 1: comparable across loaded machines)."""
    return _number("FASTDIFF_BENCH_THREADS", 1, int, 1)


def target_s(device_type: str) -> float:
    """Wall time of a benchmark's timed rounds."""
    return _number("FASTDIFF_BENCH_TARGET_S", 0.05 if device_type == "cuda" else 0.02, float, 0)


def deadline() -> float | None:
    """Unix time after which no benchmark starts (run_gpu.py's budget)."""
    return _number("FASTDIFF_BENCH_DEADLINE", None, float, 0)


def check() -> None:
    """Parse every setting once; ValueError naming the variable."""
    shapes.bench_size()
    threads()
    target_s("cpu")
    deadline()
