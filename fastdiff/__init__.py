"""fastdiff: ADM (guided-diffusion) sampling, made fast.

Importing the package is cheap and needs neither CUDA, triton nor TensorRT; the
heavy pieces live in the subpackages (models, diffusion, ops, engines, runs, training).
``fastdiff.sample_run`` is a whole resumable sampling run (fastdiff.runs), ``fastdiff.Sampler``
the sampler it runs.
"""

__version__ = "0.1.0"

__all__ = ["RunError", "Sampler", "__version__", "sample_run"]


def __getattr__(name: str):
    # Lazy, so `import fastdiff` (and `fastdiff --help`) does not import torch.
    if name == "Sampler":
        from fastdiff.engines.sampler import Sampler

        return Sampler
    if name in ("sample_run", "RunError"):
        import fastdiff.runs

        return getattr(fastdiff.runs, name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too, so a notebook's completion and dir(fastdiff) show Sampler and sample_run
    return sorted({*globals(), *__all__})
