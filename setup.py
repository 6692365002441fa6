"""Only the optional CUDA extension and the shipping of its sources live here; all other metadata
is in pyproject.toml.

``pip install -e .`` is pure Python (torch is not imported). ``FASTDIFF_BUILD_CUDA=1 pip install
--no-build-isolation -e .`` also compiles csrc/ into ``fastdiff._C`` against the installed torch
(no build isolation, so the build sees that torch and its CUDA); asked for with a CPU-only torch
it stops with one line instead of torch's traceback. Without the prebuilt module the kernels are
JIT-built on first use (fastdiff/ops/_cuda_build.py): from a checkout's csrc/, or from the copy
every wheel carries as fastdiff/csrc/ (``build_py`` below), so a plain ``pip install .`` can too.
"""

import os
import shlex

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


class BuildPyWithKernelSources(build_py):
    """The package plus csrc/ as fastdiff/csrc/: a wheel is built from build_lib alone, and the
    CUDA sources sit beside the package in the repository, not inside it."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fastdiff", "csrc")
        self.mkpath(target)
        for name in sorted(os.listdir(CSRC)):
            self.copy_file(os.path.join(CSRC, name), os.path.join(target, name))


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
    with open(os.path.join(CSRC, "nvcc_flags.txt")) as f:
        nvcc_flags = shlex.split(f.read(), comments=True)
    ext = CUDAExtension(
        "fastdiff._C",
        sources=["csrc/binding.cpp", "csrc/ada_group_norm.cu"],
        include_dirs=[CSRC],
        extra_compile_args={
            "cxx": ["-O3"],  # torch supplies -std (c++20 for torch 2.13)
            "nvcc": nvcc_flags,  # csrc/nvcc_flags.txt says why these
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


kwargs = cuda_extension_kwargs()
kwargs["cmdclass"] = {**kwargs.get("cmdclass", {}), "build_py": BuildPyWithKernelSources}
setup(**kwargs)
