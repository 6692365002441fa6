"""Sampling runs as a library: options -> Plan -> Sampler -> run folder and writer.

The layer between the engines and the CLI (ops -> models -> diffusion -> engines -> runs -> cli):
it loads networks (``loading``), checks and records a run in its folder so a resume never mixes
two runs (``folder``, ``record``), samples batch by batch (``sampling``), writes the PNGs and npz
files (``writer``) and deals batches over torchrun's ranks (``ranks``). It imports neither click
nor fastdiff.cli; a user error is a :class:`RunError`, which the CLI prints as one line.

Importing the package is cheap (the names below load on first use), so the CLI can name
RunError without importing torch.
"""

from __future__ import annotations

import importlib

from .errors import RunError

_LAZY = {
    "LoadedModel": "loading",
    "load_classifier": "loading",
    "load_diffusion_model": "loading",
    "Plan": "plan",
    "run_sampling": "sampling",
    "make_sampler": "sampling",
    "sample_run": "sample",
    "upsample_file_run": "upsample",
    "invert_images": "invert",
    "interpolate": "interpolation",
    "DDIMOptions": "ddim",
}

__all__ = ["RunError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fastdiff.runs' has no attribute {name!r}")
