"""Only the optional CUDA extension lives here; all other metadata is in pyproject.toml.

``pip install -e .`` is pure Python (torch is not imported). ``FASTDIFF_BUILD_CUDA=1 pip install
--no-build-isolation -e .`` also compiles fastdiff/csrc/ into ``fastdiff._C`` against the installed
torch (no build isolation, so the build sees that torch and its CUDA); asked for with a CPU-only
torch it stops with one line instead of torch's traceback. Without the prebuilt module the
kernels are JIT-built on first use from the shipped sources (fastdiff/ops/_cuda_build.py).
"""

import os
import shlex

from setuptools import setup


def cuda_extension_kwargs() -> dict:
    """ext_modules/cmdclass for fastdiff._C; torch is imported only when asked to build it."""
    if os.environ.get("FASTDIFF_BUILD_CUDA", "0") in ("", "0"):
        return {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise SystemExit(
            f"FASTDIFF_BUILD_CUDA=1 needs a CUDA build of torch (torch {torch.__version__} is CPU-only)"
        )
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "fastdiff", "csrc")
    with open(os.path.join(csrc, "nvcc_flags.txt")) as f:
        nvcc_flags = shlex.split(f.read(), comments=True)
    ext = CUDAExtension(
        "fastdiff._C",
        sources=["fastdiff/csrc/binding.cpp", "fastdiff/csrc/ada_group_norm.cu"],
        include_dirs=[csrc],
        extra_compile_args={
            "cxx": ["-O3"],  # torch supplies -std (c++20 for torch 2.13)
            "nvcc": nvcc_flags,  # fastdiff/csrc/nvcc_flags.txt says why these
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension_kwargs())
