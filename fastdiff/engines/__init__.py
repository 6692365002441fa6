"""Engines: how the guided sampling *step* runs inside the loop.

An engine takes a step (``fastdiff.diffusion.samplers.SamplingStep``: UNet forward, classifier
forward and input gradient, guidance, update rule) and returns a callable with the same
signature ``(x, t, noise, state) -> (x_next, pred_xstart, state)``, so the loop never knows
which one runs:

- ``eager``: the step as written (the reference semantics);
- ``compile``: ``torch.compile`` of the whole step (not only the network);
- ``graph``: the whole step captured once into a CUDA graph and replayed (CUDA only);
- ``graph-loop``: all the loop's steps captured as one CUDA graph, replayed once per batch
  (CUDA only; callbacks and the progress bar see only the last step);
- ``parallel``: the step's batch split over the CPU threads, one core per slice (CPU only);
- ``onnx``: the guided denoiser exported to ONNX (fastdiff.export) run by onnxruntime;
- ``trt``: a TensorRT engine built from that ONNX graph, behind one clear error where TensorRT is
  not installed.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from fastdiff.config import unknown_choice
from fastdiff.diffusion.guidance import ClassifierGuidance
from fastdiff.diffusion.samplers import StepFn
from fastdiff.ops._backend import force_reference

from .graph import GraphStep, LoopGraph
from .padded import PaddedStep
from .parallel import BatchParallelStep


class EngineError(RuntimeError):
    """An engine is unknown or cannot run here; the message says why in one line."""


def _eager(step, device: torch.device) -> StepFn:
    return step


def _own_code(method):
    """``method`` bound to a copy of its code object. Dynamo keeps compiled graphs, and counts
    recompiles against its limit (8), per code object: every step built in a process (each batch
    size, Sampler, compat loop) shares SamplingStep.__call__'s, so the ninth failed under
    fullgraph (FailOnRecompileLimitHit) and ran eager without it. A code of its own per step
    compiles once and is freed with the step."""
    fn = method.__func__
    own = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    return types.MethodType(own, method.__self__)


def _check_cpp_compiler() -> None:
    """Inductor builds the CPU step with a C++ compiler: without one (CXX, g++), the first batch
    failed after the networks loaded and run.json was written, in a 100-line traceback."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise EngineError(
            "engine 'compile' on the CPU needs a C++ compiler (torch.compile builds the step with it) "
            "and none was found: install g++ or set CXX, or use eager"
        ) from None


def _compile(step, device: torch.device) -> StepFn:
    if device.type == "cpu":
        _check_cpp_compiler()
    if step is None:  # check_engine's probe
        return None
    # Static shapes: a sampler runs one shape per batch size, and the Sampler caches per shape
    # (a smaller batch runs padded through a larger size's step: PADDED).
    # One graph for the whole step where fastdiff's own guidance runs (its classifier gradient is
    # traced through torch.func.grad); a user's cond_fn (compat loops) may split it.
    own = step.cond_fn is None or isinstance(step.cond_fn, ClassifierGuidance)
    return torch.compile(_own_code(step.__call__), dynamic=False, fullgraph=own)


def _graph(step, device: torch.device) -> StepFn:
    if device.type != "cuda":
        raise EngineError("engine 'graph' captures CUDA graphs and needs a CUDA device; use eager or compile")
    return GraphStep(step)


def _graph_loop(step, device: torch.device) -> StepFn:
    if device.type != "cuda":
        raise EngineError(
            "engine 'graph-loop' captures CUDA graphs and needs a CUDA device; use eager or compile"
        )
    return LoopGraph(step)


def _parallel(step, device: torch.device) -> StepFn:
    if device.type != "cpu":
        raise EngineError("engine 'parallel' splits the batch over CPU threads; on CUDA use graph or eager")
    return BatchParallelStep(step, torch.get_num_threads())


def _exported(make_step) -> StepFn:
    """An exported graph's step, its ExportErrors said as one EngineError line: the graph's limits
    (a batch above its maximum) are found only when a batch runs, inside the sampling loop."""
    from fastdiff.export import ExportError

    try:
        inner = make_step()
    except ExportError as e:
        raise EngineError(str(e)) from None
    if inner is None:  # check_engine's probe: no step to run
        return None

    def run(x, t, noise, state):
        try:
            return inner(x, t, noise, state)
        except ExportError as e:
            raise EngineError(str(e)) from None

    return run


def _onnx(step, device: torch.device) -> StepFn:
    from fastdiff.export.onnx_export import missing_packages

    missing = missing_packages()
    if missing:
        raise EngineError(f"engine 'onnx': {missing}")
    if step is None:
        return None
    from fastdiff.export.onnx_runtime import onnx_engine

    return _exported(lambda: onnx_engine(step, device))


def _trt(step, device: torch.device) -> StepFn:
    from fastdiff.export.tensorrt_engine import trt_engine

    return _exported(lambda: trt_engine(step, device))


# The engines whose build is a file in a cache later processes load (the ONNX export, the
# TensorRT engine): under torchrun one rank builds it and the others load it, not N builds at once.
CACHED_BUILDS = ("onnx", "trt")

# The engines whose step is built for one batch size and costly to build again (a cold compile:
# minutes on a CPU): a smaller batch runs padded through a larger size's step (engines.padded)
# instead, so a run's last partial batch does not compile again.
PADDED = ("compile",)

ENGINES: dict[str, Callable[..., StepFn]] = {
    "eager": _eager,
    "compile": _compile,
    "graph": _graph,
    "graph-loop": _graph_loop,
    "parallel": _parallel,
    "onnx": _onnx,
    "trt": _trt,
}


def default_engine(device: torch.device) -> str:
    """``graph`` on CUDA (no launch overhead, no host sync). On the CPU, measured end to end
    (bench/results): ``parallel`` when torch has more than one thread (as fast as intra-op threads
    on an idle machine, without their barrier stalls on a loaded one), else ``eager``
    (torch.compile's cold compile, and the onnx engine's first export, cost more than they save
    on a short run). ``FASTDIFF_OPS=reference`` takes ``eager`` on the CPU: the original's
    arithmetic is that of the whole batch, and a convolution over a slice rounds otherwise."""
    if torch.device(device).type == "cuda":
        return "graph"
    return "parallel" if torch.get_num_threads() > 1 and not force_reference() else "eager"


def check_engine(
    name: str, device: torch.device, dtype: torch.dtype = torch.float32, batch: int | None = None
) -> None:
    """Raise :class:`EngineError` now (before any work) when ``name`` cannot run on ``device`` in
    ``dtype``, or take a batch of ``batch`` images: onnx and trt export their graph (and build
    the TensorRT engine) for a batch range, minutes of work a larger batch would only fail after."""
    if not (isinstance(name, str) and name in ENGINES):
        raise EngineError(unknown_choice("engine", name, ENGINES))
    if name in ("graph", "graph-loop") and torch.device(device).type != "cuda":
        ENGINES[name](None, torch.device(device))
    if name == "compile":
        _compile(None, torch.device(device))
    if name == "parallel" and torch.device(device).type != "cpu":
        _parallel(None, torch.device(device))
    if name in CACHED_BUILDS:
        ENGINES[name](None, torch.device(device))
        if dtype == torch.bfloat16 and name == "onnx":  # its graphs are fp32 or fp16; trt builds bf16 layers
            raise EngineError(f"engine '{name}' runs fp32 or fp16 graphs; use --dtype fp32")
        if batch is not None:
            from fastdiff.export import OnnxExportConfig
            from fastdiff.export.tensorrt_engine import TrtBuildConfig

            limit = (OnnxExportConfig if name == "onnx" else TrtBuildConfig).max_batch
            if batch > limit:
                raise EngineError(
                    f"engine '{name}' takes batches of at most {limit} (its graph's range), got {batch}"
                )


def build_engine(name: str, step, device: torch.device) -> StepFn:
    """The step ``step`` as engine ``name`` runs it, or :class:`EngineError`."""
    check_engine(name, device)
    return ENGINES[name](step, torch.device(device))


__all__ = [
    "CACHED_BUILDS",
    "ENGINES",
    "BatchParallelStep",
    "EngineError",
    "GraphStep",
    "LoopGraph",
    "PADDED",
    "PaddedStep",
    "build_engine",
    "check_engine",
    "default_engine",
]
