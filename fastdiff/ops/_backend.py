"""Which implementation an op runs on a given tensor.

Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``
is set (that is how CI proves the kernels). Everything else falls back to the
plain PyTorch reference. The decision is per call so one process can mix devices.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch


@functools.cache
def triton_available() -> bool:
    """True when triton can be imported (not necessarily usable on every device)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def force_reference() -> bool:
    """``FASTDIFF_OPS=reference`` turns every fast path off (debugging, A/B checks)."""
    return os.environ.get("FASTDIFF_OPS", "").lower() == "reference"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel should handle tensor ``t``."""
    if force_reference() or not triton_available():
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and triton_interpret()


@functools.cache
def notice_fallback(op: str, reason: str, instead: str = "the PyTorch reference") -> None:
    """One line, once per (op, reason): a PyTorch path is running instead of a kernel."""
    warnings.warn(f"fastdiff.ops.{op}: {reason}; using {instead}", stacklevel=3)
