"""Engines: ways to run the denoiser inside the sampling loop.

An engine takes an ``nn.Module`` and returns a callable with the same signature, so the
samplers never know which one runs. Only ``eager`` and ``compile`` exist today; the
CUDA-graph and TensorRT engines are named here so that ``--engine`` already rejects them
with a clear reason instead of an unknown-option error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn


class EngineError(RuntimeError):
    """An engine is unknown or cannot run here; the message says why in one line."""


def _eager(model: nn.Module, device: torch.device) -> Callable:
    return model


def _compile(model: nn.Module, device: torch.device) -> Callable:
    return torch.compile(model, dynamic=False)


def _not_yet(name: str) -> Callable:
    def build(model: nn.Module, device: torch.device) -> Callable:
        raise EngineError(f"engine '{name}' is not available in this version of fastdiff; use --engine eager")

    return build


def _trt(model: nn.Module, device: torch.device) -> Callable:
    if importlib.util.find_spec("tensorrt") is None:
        raise EngineError(
            "engine 'trt': TensorRT not installed (pip install 'fastdiff[trt]' on a CUDA machine)"
        )
    return _not_yet("trt")(model, device)


ENGINES: dict[str, Callable[[nn.Module, torch.device], Callable]] = {
    "eager": _eager,
    "compile": _compile,
    "cuda-graph": _not_yet("cuda-graph"),
    "trt": _trt,
}


def build_engine(name: str, model: nn.Module, device: torch.device) -> Callable:
    """Wrap ``model`` for engine ``name`` or raise :class:`EngineError`."""
    try:
        build = ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)}") from None
    return build(model, device)
