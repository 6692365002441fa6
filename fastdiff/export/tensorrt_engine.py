"""TensorRT engines from the exported ONNX denoiser (TensorRT 10 Python API); every tensorrt
import of fastdiff is in this module.

An engine is built once per (graph hash, TensorRT version, GPU) with fp16 or bf16 layers, one
optimisation profile for a batch range and a timing cache beside it, and cached under that key;
``TrtDenoiser`` runs it on a CUDA stream of its own, ordered after and before torch's current
one, with the tensors' device memory as its bindings (one ``execute_async_v3`` per step; no CUDA
graph around it yet).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff.files import atomic_write, place_file

from .onnx_export import ExportedGraph, ExportError
from .onnx_runtime import ExportedDenoiser

PRECISIONS = ("fp16", "bf16", "fp32")


def tensorrt():
    """The tensorrt module, or one ExportError line naming the missing package, a package that
    does not load (its wheel imports its libraries, libnvinfer among them, and raises ImportError
    or OSError without them) or a major version other than 10 (TensorRT 11 has no
    BuilderFlag.FP16/BF16: its networks are strongly typed, so the fp16/bf16 builds here would
    stop with an AttributeError after the file was parsed)."""
    if importlib.util.find_spec("tensorrt") is None:
        raise ExportError("TensorRT not installed: pip install 'fastdiff[trt]' (tensorrt 10, CUDA)")
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:
        reason = " ".join(str(e).split())
        raise ExportError(
            f"TensorRT is installed but does not load ({reason}); reinstall tensorrt 10"
        ) from None
    version = str(getattr(trt, "__version__", "?"))
    if version.split(".")[0] != "10":
        raise ExportError(
            f"TensorRT {version} is installed; fastdiff builds and runs engines with TensorRT 10's "
            "API: pip install 'tensorrt>=10,<11'"
        )
    return trt


@dataclass(frozen=True)
class TrtBuildConfig:
    """How an engine is built: layer precision, the batch profile (min <= opt <= max), workspace."""

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_gib: float = 4.0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(
                f"the batch profile needs 1 <= --min-batch ({self.min_batch}) <= --opt-batch "
                f"({self.opt_batch}) <= --max-batch ({self.max_batch})"
            )


def gpu_key(device: torch.device | None = None) -> str:
    """The GPU an engine is tied to: its name and compute capability."""
    props = torch.cuda.get_device_properties(device or 0)
    return f"{props.name} sm_{props.major}{props.minor}"


def engine_key(graph: ExportedGraph, config: TrtBuildConfig, trt_version: str, gpu: str) -> str:
    text = f"{graph.hash}|{config}|{trt_version}|{gpu}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def timing_cache_name(trt_version: str, gpu: str) -> str:
    """The timing cache file of a (TensorRT version, GPU): TensorRT's timings hold for the device
    and version that measured them, and it warns that a cache from another device "may lead to
    functional/performance bugs", so each has its own file beside the engines."""
    return f"timing-{hashlib.sha256(f'{trt_version}|{gpu}'.encode()).hexdigest()[:16]}.cache"


def profile_shapes(graph: ExportedGraph, config: TrtBuildConfig) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per batch-dynamic input (an upsampler's low_res among them; the
    scalar scales have none)."""
    batches = (config.min_batch, config.opt_batch, config.max_batch)
    return {name: tuple((b, *shape) for b in batches) for name, shape in graph.input_shapes().items()}


def build_engine(
    graph: ExportedGraph, out: Path, config: TrtBuildConfig, timing_cache: Path | None = None
) -> Path:
    """Parse the ONNX file, build a serialized engine and write it (atomically) to ``out``; the
    timing cache is read from and written back to ``timing_cache`` (timing_cache_name), started
    afresh where TensorRT finds it is another device's or version's."""
    trt = tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is TensorRT 10's only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {graph.path}: {errors}")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * 2**30))
    if config.precision == "fp16":
        cfg.set_flag(trt.BuilderFlag.FP16)
    elif config.precision == "bf16":
        cfg.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(graph, config).items():
        profile.set_shape(name, lo, opt, hi)
    cfg.add_optimization_profile(profile)
    cached = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = cfg.create_timing_cache(cached)
    if cache is None or not cfg.set_timing_cache(cache, ignore_mismatch=False):
        cfg.set_timing_cache(cfg.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {graph.path} (see its log above)")
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    if timing_cache is not None:
        data = bytes(cfg.get_timing_cache().serialize())
        atomic_write(timing_cache, lambda tmp: Path(tmp).write_bytes(data))
    return out


def cached_engine_path(key: str) -> Path:
    """Where engine 'trt' keeps the engine of ``key`` (engine_key), beside the ONNX cache."""
    from .onnx_runtime import cache_dir

    return cache_dir().parent / "trt" / f"{key}.engine"


def remember_engine(path: Path, graph: ExportedGraph, config: TrtBuildConfig, key: str) -> Path | None:
    """Put an engine ``fastdiff export trt`` built where engine 'trt' looks for it (a hard link,
    else a copy), so sampling after the export does not build it again: where it is the engine
    'trt' builds (from the fp32 graph, with the default batch profile; ``--precision`` is
    ``--dtype``). None where it is not, or where the cache cannot take it."""
    if graph.dtype != "fp32" or config != TrtBuildConfig(precision=config.precision):
        return None
    target = cached_engine_path(key)
    try:
        place_file(path, target)
    except OSError:  # a read-only or full cache: engine 'trt' builds then
        return None
    return target


class TrtDenoiser(ExportedDenoiser):
    """A deserialized engine behind the OrtDenoiser call (the same checked inputs, low_res among
    them), with the tensors' device memory as its bindings, run on a stream of its own: torch's
    current stream is the default (null) stream unless a caller chose another, and TensorRT's
    execute_async_v3 documents that one as costing extra device synchronisations."""

    def __init__(self, graph: ExportedGraph, engine_path: Path, device: torch.device):
        trt = tensorrt()
        self.graph, self.device = graph, device
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(device):  # an engine and its contexts belong to the current device
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise ExportError(
                    f"{engine_path} was built for another GPU or TensorRT version; rebuild it with "
                    f"fastdiff export trt --onnx {graph.path}"
                )
            self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device)
        lo, _, hi = self.engine.get_tensor_profile_shape("x_t", 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        shapes = [tuple(self.engine.get_tensor_shape(name)) for name in graph.signature.outputs]
        self.output_shapes = [s[1:] for s in shapes]

    def _check_batch(self, n: int) -> None:
        lo, hi = self.batch_range
        if not lo <= n <= hi:
            raise ExportError(f"batch {n} is outside the engine profile {lo}..{hi}: rebuild it")

    def _run(self, inputs: dict, outputs: dict) -> None:
        for name, t in inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        # the inputs were written on torch's stream, and the outputs are read there
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.device(self.device):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        current.wait_stream(self.stream)


def trt_engine(step, device: torch.device):
    """The engine function behind ``ENGINES['trt']`` (``step`` None: only check it can run). The
    engine is built, loaded and run on ``device`` whichever GPU is current (a Sampler on cuda:1
    built and deserialized it on cuda:0, then ran it on cuda:1's tensors). Its layer precision
    is the step's dtype (the Sampler's ``dtype``, ``--dtype``): fp32 networks build an fp32
    engine, fp16 or bf16 ones an fp16 or bf16 engine, from the same fp32 graph (``fastdiff
    export trt --precision`` offers the same three)."""
    trt = tensorrt()
    if torch.device(device).type != "cuda":
        raise ExportError("engine 'trt' runs TensorRT engines on a CUDA device")
    if step is None:
        return None
    from .onnx_runtime import OnnxStep, step_dtype, step_graph

    graph, classifier_scale, cfg_scale = step_graph(step, "trt")
    config = TrtBuildConfig(precision=step_dtype(step, "trt"))
    gpu = gpu_key(device)
    key = engine_key(graph, config, trt.__version__, gpu)
    path = cached_engine_path(key)
    if not path.is_file():
        with torch.cuda.device(device):  # TensorRT builds for the current device, not gpu_key's
            build_engine(graph, path, config, path.parent / timing_cache_name(trt.__version__, gpu))
    return OnnxStep(step, TrtDenoiser(graph, path, torch.device(device)), classifier_scale, cfg_scale)


__all__ = [
    "PRECISIONS",
    "TrtBuildConfig",
    "TrtDenoiser",
    "build_engine",
    "cached_engine_path",
    "engine_key",
    "gpu_key",
    "profile_shapes",
    "remember_engine",
    "tensorrt",
    "timing_cache_name",
    "trt_engine",
]
