"""ada_group_norm kernel layer backed by the CUDA C++ extension in csrc/ (same API as triton_kernel).

Neither backend wins everywhere, so on a GPU the backend for a shape is chosen by measurement,
but only ahead of time, inside :func:`autotuning` (the Sampler's warm-up step, before any CUDA
graph capture): an op's forward never times anything, so an eager run and a captured graph make
the same choice. Choices are cached in memory and in a JSON file; outside ``autotuning`` an
unmeasured shape runs Triton. ``FASTDIFF_GN_BACKEND=cuda|triton`` forces one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .._backend import poison_outputs
from .._cuda_build import load_extension

_ACTIVATIONS = {None: False, "silu": True}
_choices: dict[str, bool] = {}  # key -> True when CUDA is faster
_loaded_file = False
_tuning = False


@contextlib.contextmanager
def autotuning() -> Iterator[None]:
    """Within this block, a shape without a recorded choice is measured (both backends) once."""
    global _tuning
    previous, _tuning = _tuning, True
    try:
        yield
    finally:
        _tuning = previous


@functools.cache
def available() -> bool:
    """CUDA present and the extension loads (built or JIT-compiled once per process)."""
    return torch.cuda.is_available() and load_extension() is not None


def _silu(activation: str | None) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"ada_group_norm: activation must be 'silu' or None, got {activation!r}")
    return _ACTIVATIONS[activation]


def forward(x, num_groups, weight, bias, scale, shift, eps, activation):
    """-> (y, mean, rstd); mean/rstd fp32 [N, G]; y same dtype/memory format as x."""
    ext = load_extension()
    y, mean, rstd = ext.ada_group_norm_forward(
        x, num_groups, weight, bias, scale, shift, float(eps), _silu(activation), poison=poison_outputs()
    )
    return y, mean, rstd


def backward(dy, x, num_groups, weight, bias, scale, shift, mean, rstd, activation):
    """-> (dx, dweight, dbias, dscale, dshift), None where the input was None."""
    ext = load_extension()
    return tuple(
        ext.ada_group_norm_backward(
            dy,
            x,
            num_groups,
            weight,
            bias,
            scale,
            shift,
            mean,
            rstd,
            _silu(activation),
            poison=poison_outputs(),
        )
    )


def _cache_path() -> Path | None:
    """``FASTDIFF_BACKEND_CACHE`` overrides the file; empty or "0" keeps choices in memory only."""
    value = os.environ.get("FASTDIFF_BACKEND_CACHE")
    if value is None:
        return Path.home() / ".cache" / "fastdiff" / "backend_choice.json"
    return Path(value) if value not in ("", "0") else None


def _read_file() -> None:
    global _loaded_file
    if _loaded_file:
        return
    _loaded_file = True
    path = _cache_path()
    try:
        if path is not None and path.is_file():
            data = json.loads(path.read_text())
            _choices.update({k: v == "cuda" for k, v in data.get("ada_group_norm", {}).items()})
    except (OSError, ValueError, AttributeError):
        pass  # a corrupt or unreadable cache only costs a re-measurement


def _write_file() -> None:
    path = _cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {k: "cuda" if v else "triton" for k, v in sorted(_choices.items())}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ada_group_norm": entries}, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def _key(x: torch.Tensor, num_groups: int, has_scale: bool, activation: str | None) -> str:
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = "cl" if cl else "c"
    device = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
    shape = "x".join(map(str, x.shape))
    dtype = str(x.dtype).removeprefix("torch.")
    return f"{device}|{shape}|g{num_groups}|{dtype}|{fmt}|scale={int(has_scale)}|{activation}"


def _time_ms(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _measure(x: torch.Tensor, num_groups: int, has_scale: bool, activation: str | None) -> bool:
    """Time both forwards on x's shape; True when CUDA is at least as fast."""
    try:
        triton_kernel = importlib.import_module(f"{__package__}.triton_kernel")
    except ImportError:
        return True
    c = x.shape[1]
    x = x.detach()
    weight = torch.ones(c, device=x.device, dtype=torch.float32)
    bias = torch.zeros_like(weight)
    scale = shift = None
    if has_scale:
        scale = torch.zeros(x.shape[0], c, device=x.device, dtype=x.dtype)
        shift = torch.zeros_like(scale)
    args = (x, num_groups, weight, bias, scale, shift, 1e-5, activation)
    try:
        t_cuda = _time_ms(lambda: forward(*args))
    except RuntimeError:
        return False
    try:
        t_triton = _time_ms(lambda: triton_kernel.forward(*args))
    except Exception:  # a Triton compile/launch problem means CUDA wins by default
        return True
    return t_cuda <= t_triton


def preferred(
    x: torch.Tensor, num_groups: int, has_scale: bool = False, activation: str | None = "silu"
) -> bool:
    """Whether the CUDA kernel should run x's shape: forced by env, else the recorded choice
    (measured once per key inside :func:`autotuning`; Triton where none is recorded)."""
    forced = os.environ.get("FASTDIFF_GN_BACKEND", "").lower()
    if forced in ("cuda", "triton"):
        return forced == "cuda"
    if not available():
        return False
    _read_file()
    key = _key(x, num_groups, has_scale, activation)
    choice = _choices.get(key)
    if choice is None:
        if not _tuning or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
        choice = _choices[key] = _measure(x, num_groups, has_scale, activation)
        _write_file()
    return choice
