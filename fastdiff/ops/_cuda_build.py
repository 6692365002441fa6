"""Loads the optional CUDA extension (csrc/): prebuilt ``fastdiff._C`` or a JIT build.

``pip install`` stays pure Python by default; ``FASTDIFF_BUILD_CUDA=1 pip install
--no-build-isolation -e .`` prebuilds ``fastdiff._C``. Without it the sources are JIT-compiled
on first use with ``torch.utils.cpp_extension.load`` (cached under ``TORCH_EXTENSIONS_DIR``),
which needs nvcc; the sources ship inside the package (package data), so a wheel install
JIT-builds as a source checkout does. Any failure returns None
with one warning: the Triton/reference paths keep working. ``FASTDIFF_CUDA_JIT=0`` skips the JIT
build (a prebuilt ``fastdiff._C`` still loads): ``bench/run_gpu.py`` sets it for its later stages
when its build stage did not load the extension, so no stage builds it again.
"""

from __future__ import annotations

import functools
import importlib
import os
import shlex
import warnings
from pathlib import Path

from ._backend import env_flag

_PACKAGE = Path(__file__).resolve().parents[1]
# the sources: inside an installed wheel (setup.py copies them there), else a checkout's csrc/
CSRC_DIRS = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")
SOURCES = ("binding.cpp", "ada_group_norm.cu")
FILES = (*SOURCES, "nvcc_flags.txt")


def nvcc_flags(src: Path) -> list[str]:
    """The kernels' nvcc flags, one list for every build (csrc/nvcc_flags.txt says why)."""
    return shlex.split((src / "nvcc_flags.txt").read_text(), comments=True)


def csrc_dir() -> Path | None:
    """The kernel sources, or None where neither a wheel nor a checkout has them."""
    return next((d for d in CSRC_DIRS if all((d / s).is_file() for s in FILES)), None)


@functools.cache
def load_extension():
    """The extension module with ``ada_group_norm_forward/backward``, or None (cached)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module("fastdiff._C")
    except ImportError:
        pass
    if os.environ.get("FASTDIFF_CUDA_JIT", "1") in ("", "0"):
        return None  # no JIT build asked for (bench/run_gpu.py, after its build stage failed)
    src = csrc_dir()
    if src is None:
        warnings.warn(
            "fastdiff: CUDA kernels unavailable (no prebuilt fastdiff._C and no csrc/ to JIT-build)",
            stacklevel=2,
        )
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="fastdiff_cuda",
            sources=[str(src / s) for s in SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=nvcc_flags(src),
            verbose=env_flag("FASTDIFF_CUDA_VERBOSE"),
        )
    except Exception as exc:  # any build failure means "no CUDA kernels", never a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"fastdiff: building the CUDA extension failed ({first})", stacklevel=2)
        return None
