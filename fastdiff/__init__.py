"""fastdiff: ADM (guided-diffusion) sampling, made fast.

Importing the package is cheap and needs neither CUDA, triton nor TensorRT; the
heavy pieces live in the subpackages (models, diffusion, ops, engines, training).
"""

__version__ = "0.1.0"

__all__ = ["Sampler", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import fastdiff` (and `fastdiff --help`) does not import torch.
    if name == "Sampler":
        from fastdiff.engines.sampler import Sampler

        return Sampler
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
