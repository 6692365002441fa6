"""Write the guided denoiser to an ONNX file, and read one back with its checks.

The file carries its provenance in ONNX metadata (``fastdiff.*`` keys): a hash of the weights and
configuration it was exported from, the guidance kind, the model kind (``base`` or ``superres``)
with an upsampler's ``low_res`` shape (its small size), its input and output names, the preset,
the dtype and the fastdiff version. Loading refuses a file that is missing, not ONNX, not a
fastdiff export, or (given the networks) exported from other weights, with one line each.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fastdiff
from fastdiff.files import atomic_write, temp_folder
from fastdiff.models.unet import SuperResModel

from .graph import DenoiserSignature, GuidedDenoiser, example_inputs, input_shapes, trace

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# torch.onnx implements opset 18 and up; below it converts down and, where that fails (ADM's
# Split has no adapter to 17), keeps 18 without a word: a file whose metadata said 17.
MIN_OPSET = 18
ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")
# Above this the weights go to a side file (protobuf's 2 GiB limit on one message).
_EXTERNAL_DATA_BYTES = 1536 * 2**20


class ExportError(RuntimeError):
    """A user-facing export/loading problem, said in one line."""


def missing_packages(packages: Sequence[str] = ONNX_EXTRA) -> str | None:
    """One line naming which of ``packages`` (the onnx extra's) are not installed, or None: said
    before any work, not as an ImportError traceback after loading the networks."""
    missing = [m for m in packages if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed (pip install 'fastdiff[onnx]')" if missing else None


@dataclass(frozen=True)
class OnnxExportConfig:
    """How the graph is exported: dtype of the networks, ONNX opset, the batch range."""

    dtype: str = "fp32"
    opset: int = 18
    trace_batch: int = 2  # a size the symbolic trace starts from (not 0 or 1: those specialise)
    max_batch: int = 4096
    optimize: bool = True  # onnxscript's constant folding and clean-up (onnxruntime and TensorRT redo it)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.opset < MIN_OPSET:
            raise ExportError(f"opset must be at least {MIN_OPSET}, got {self.opset}")
        import onnx.defs  # the exporter writes opset 18 for one newer than onnx knows, and says nothing

        if self.opset > onnx.defs.onnx_opset_version():
            raise ExportError(
                f"opset must be at most {onnx.defs.onnx_opset_version()} (onnx {onnx.__version__}), "
                f"got {self.opset}"
            )
        if self.trace_batch < 2:
            raise ExportError(f"trace_batch must be at least 2, got {self.trace_batch}")
        if self.max_batch < self.trace_batch:
            raise ExportError(f"max_batch must be at least {self.trace_batch}, got {self.max_batch}")


@dataclass
class ExportResult:
    """What an export wrote and what it holds."""

    path: Path
    hash: str
    seconds: float
    node_counts: dict[str, int] = field(default_factory=dict)
    bytes: int = 0


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def denoiser_hash(
    model: nn.Module,
    classifier: nn.Module | None,
    null_label: int | None,
    dtype: str,
    opset: int,
    low_res_shape: Sequence[int] | None = None,
) -> str:
    """sha256 of what decides the graph: each network's structure (its module tree, which holds
    head counts and attention order) and weights, the model's image size (the graph's x_t size,
    which neither the module tree nor the weights of a UNet show), the guidance, dtype, opset and
    an upsampler's low_res shape (absent for base models).

    The weights are hashed in the graph's dtype, as the graph holds them: a network loaded with
    an fp16 torso (guided-diffusion's use_fp16, as the ImageNet and upsampler presets) and the
    same network cast by the Sampler to its compute dtype export the same graph, so ``fastdiff
    export onnx`` and ``--engine onnx`` agree on the file (casting fp32 weights for an fp32 graph
    changes nothing, so those hashes stay as they were)."""
    h = hashlib.sha256()
    size = getattr(model, "image_size", None)
    config = {"null_label": null_label, "dtype": dtype, "opset": opset, "format": 2, "image_size": size}
    if low_res_shape is not None:
        config["low_res_shape"] = [int(d) for d in low_res_shape]
    h.update(json.dumps(config, sort_keys=True).encode())
    for net in (model, classifier):
        if net is None:
            h.update(b"<none>")
            continue
        h.update(repr(net).encode())
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t = t.to(DTYPES[dtype])
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def graph_shapes(
    model: nn.Module,
    low_res_shape: Sequence[int] | None = None,
    classifier: nn.Module | None = None,
    null_label: int | None = None,
) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """(x_t's shape, low_res's shape or None) per sample, or ExportError for what the graph cannot
    hold: an upsampler without its low-res shape or with guidance (ADM-U has neither classifier
    nor classifier-free guidance), a low-res shape for a base model."""
    size = int(model.image_size)
    if not isinstance(model, SuperResModel):
        if low_res_shape is not None:
            raise ExportError("low_res is an upsampler's input; this model is not a super-resolution model")
        return (int(model.in_channels), size, size), None
    if classifier is not None or null_label is not None:
        raise ExportError(
            "super-resolution models export without guidance (ADM-U has no classifier or "
            "classifier-free guidance)"
        )
    channels = int(model.in_channels) // 2  # the first conv also takes the upsampled low_res
    if low_res_shape is None:
        raise ExportError("a super-resolution model exports with its low_res shape (channels, small size)")
    low = tuple(int(d) for d in low_res_shape)
    if len(low) != 3 or low[0] != channels or min(low) < 1:
        raise ExportError(f"low_res shape {list(low)}: the upsampler takes [C, H, W] with C = {channels}")
    return (channels, size, size), (low[0], low[1], low[2])


@contextlib.contextmanager
def _quiet_tracing():
    """No per-node Python stack traces while tracing (a third of the export's time; torch 2.13
    records them unless told not to, torch 2.11 has no such switch and records none) and none of
    the exporter's progress lines."""
    import logging

    import torch.fx.config as fx_config

    switch = hasattr(fx_config, "do_not_emit_stack_traces")
    saved = switch and fx_config.do_not_emit_stack_traces
    if switch:
        fx_config.do_not_emit_stack_traces = True
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if switch:
            fx_config.do_not_emit_stack_traces = saved
        logging.getLogger("torch.onnx").setLevel(level)


def node_counts(onnx_model) -> dict[str, int]:
    """Nodes of the main graph by op type, most frequent first."""
    counts = collections.Counter(n.op_type for n in onnx_model.graph.node)
    return dict(counts.most_common())


def _fold_weight_sized_constants(model, denoiser: nn.Module) -> None:
    """Fold what is computed from weights alone, up to the size of weights: the upsamplers'
    transposed-conv kernels (fastdiff.ops.upsample_conv folds each 3x3 kernel into a 4x4 one)
    become initializers, as TensorRT's deconvolution wants its kernel. torch.onnx's own pass
    stops at 8192-element inputs, below any conv weight of ADM; this is only its constant
    folding again with larger limits, not its whole optimizer."""
    from onnxscript import optimizer

    largest = max((int(p.numel()) for p in denoiser.parameters()), default=0)
    optimizer.fold_constants(model, input_size_limit=largest, output_size_limit=2 * largest)
    optimizer.remove_unused_nodes(model)


def save_onnx(model, path: Path, external: bool = False) -> None:
    """Write the onnx_ir ``model`` to ``path`` atomically; with ``external`` its weights go to
    ``<name>.data`` beside it. onnx_ir writes that side file under its final name, so it is
    written in a temporary folder and renamed into place before the graph: a killed re-export
    never leaves a graph beside a truncated side file (onnxruntime could not load the pair, and
    the cache, reading only the graph, kept offering it)."""
    import shutil

    import onnx_ir

    if not external:
        atomic_write(path, lambda tmp: onnx_ir.save(model, tmp))
        Path(f"{path}.data").unlink(missing_ok=True)  # an earlier export's: this graph names none
        return
    data = f"{path.name}.data"
    folder = temp_folder(path)  # a kill leaves it: remove_temp_files takes it away
    try:
        onnx_ir.save(model, folder / path.name, external_data=data)
        os.replace(folder / data, path.parent / data)
        atomic_write(path, lambda tmp: os.replace(folder / path.name, tmp))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    classifier: nn.Module | None = None,
    null_label: int | None = None,
    low_res_shape: Sequence[int] | None = None,
    config: OnnxExportConfig | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ExportResult:
    """Export the guided denoiser of ``model`` (+ ``classifier``'s input gradient, + classifier-free
    guidance with ``null_label``) to ``path``, written under a temporary name and renamed.

    An upsampler needs ``low_res_shape`` ([C, H, W] of its small images): the graph takes them at
    that size. ``metadata`` adds provenance (preset, flags) to the file's ``fastdiff.*`` keys.
    """
    import onnx

    start = time.perf_counter()
    config = config or OnnxExportConfig()  # not a default argument: it imports onnx
    path = Path(path)
    dtype = DTYPES[config.dtype]
    image_shape, low_res_shape = graph_shapes(model, low_res_shape, classifier, null_label)
    denoiser = GuidedDenoiser(model, classifier, null_label, dtype)
    sig = denoiser.signature
    digest = denoiser_hash(model, classifier, null_label, config.dtype, config.opset, low_res_shape)
    inputs = example_inputs(sig, image_shape, config.trace_batch, low_res_shape=low_res_shape)
    with _quiet_tracing():
        graph = trace(denoiser, inputs)
    batch = torch.export.Dim("batch", min=1, max=config.max_batch)
    dynamic = tuple({0: batch} if t.dim() else {} for t in inputs)
    with _quiet_tracing():
        program = torch.onnx.export(
            graph,
            tuple(inputs),
            dynamo=True,
            input_names=sig.inputs,
            output_names=sig.outputs,
            dynamic_shapes=dynamic,
            opset_version=config.opset,
            optimize=config.optimize,
            verbose=False,
        )
    props = {
        "fastdiff.version": fastdiff.__version__,
        "fastdiff.hash": digest,
        "fastdiff.guidance": sig.guidance,
        "fastdiff.kind": sig.kind,
        "fastdiff.low_res_shape": json.dumps(None if low_res_shape is None else list(low_res_shape)),
        "fastdiff.class_cond": json.dumps(sig.class_cond),
        "fastdiff.inputs": json.dumps(sig.inputs),
        "fastdiff.outputs": json.dumps(sig.outputs),
        "fastdiff.image_shape": json.dumps(list(image_shape)),
        "fastdiff.null_label": json.dumps(null_label),
        "fastdiff.dtype": config.dtype,
        "fastdiff.max_batch": str(config.max_batch),
        "fastdiff.opset": str(config.opset),
        **{f"fastdiff.{k}": str(v) for k, v in (metadata or {}).items()},
    }
    written = program.model.opset_imports.get("", config.opset)
    if written != config.opset:  # the exporter's fallback when it cannot convert: said, not written
        raise ExportError(
            f"opset {config.opset}: torch.onnx could not convert this graph and wrote opset {written}"
        )
    if config.optimize:
        _fold_weight_sized_constants(program.model, denoiser)
    program.model.metadata_props.update(props)
    size = sum(int(p.numel()) * p.element_size() for p in denoiser.parameters())
    size += sum(int(b.numel()) * b.element_size() for b in denoiser.buffers())

    save_onnx(program.model, path, external=size > _EXTERNAL_DATA_BYTES)
    loaded = onnx.load(str(path), load_external_data=False)
    return ExportResult(path, digest, time.perf_counter() - start, node_counts(loaded), path.stat().st_size)


@dataclass(frozen=True)
class ExportedGraph:
    """An exported denoiser file, as read back: its path and what its metadata says."""

    path: Path
    hash: str
    signature: DenoiserSignature
    image_shape: tuple[int, ...]
    low_res_shape: tuple[int, ...] | None
    null_label: int | None
    dtype: str
    max_batch: int
    opset: int
    metadata: dict

    @property
    def guidance(self) -> str:
        return self.signature.guidance

    @property
    def kind(self) -> str:
        return self.signature.kind

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The batch-dynamic inputs' shapes after the batch dimension."""
        return input_shapes(self.signature, self.image_shape, self.low_res_shape)


def stored_tensors(model) -> Iterator:
    """Every tensor an ONNX ``model`` stores, any of which may keep its bytes in a side file: the
    initializers and node attributes of its graph, its subgraphs and its functions (onnx walks
    them only in a private helper, which an onnx release may rename)."""
    pending = [model.graph, *model.functions]
    while pending:
        graph = pending.pop()
        yield from getattr(graph, "initializer", ())  # a FunctionProto has none
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    pending.append(attribute.g)
                pending.extend(attribute.graphs)


def side_files(model) -> dict[str, int]:
    """The side files an ONNX ``model`` (loaded without its external data) reads its weights from,
    each with the bytes its tensors need (the end of the last one): what a complete file holds."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    needed: dict[str, int] = {}
    for tensor in stored_tensors(model):
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            end = (info.offset or 0) + (info.length or 0)
            needed[info.location] = max(needed.get(info.location, 0), end)
    return needed


def read_export(path: str | os.PathLike, *, check_data: bool = True) -> ExportedGraph:
    """The file's fastdiff metadata, or ExportError (missing, not ONNX, not a fastdiff export, and
    with ``check_data`` a weights' side file missing or shorter than the graph says: onnxruntime
    failed on such a pair with a traceback, and the cache kept offering it)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for truncated or foreign bytes
        raise ExportError(f"{path} is not a readable ONNX file ({type(e).__name__}); re-export it") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if "fastdiff.hash" not in meta:
        raise ExportError(f"{path} is not a fastdiff export (no fastdiff.hash metadata)")
    try:
        inputs = json.loads(meta["fastdiff.inputs"])
        class_cond = bool(json.loads(meta["fastdiff.class_cond"]))
        kind = meta.get("fastdiff.kind", "base")  # files from before upsamplers exported have none
        if kind not in ("base", "superres"):
            raise ValueError(kind)
        superres = kind == "superres"
        guidance = ("classifier_scale" in inputs, "cfg_scale" in inputs)
        signature = DenoiserSignature(class_cond, *guidance, superres)
        low_res_shape = json.loads(meta.get("fastdiff.low_res_shape", "null"))
        if superres != (low_res_shape is not None):
            raise ValueError("low_res_shape")
        graph = ExportedGraph(
            path=path,
            hash=meta["fastdiff.hash"],
            signature=signature,
            image_shape=tuple(json.loads(meta["fastdiff.image_shape"])),
            low_res_shape=None if low_res_shape is None else tuple(int(d) for d in low_res_shape),
            null_label=json.loads(meta["fastdiff.null_label"]),
            dtype=meta["fastdiff.dtype"],
            max_batch=int(meta["fastdiff.max_batch"]),
            opset=int(meta["fastdiff.opset"]),
            metadata=meta,
        )
    except (KeyError, ValueError, TypeError):
        raise ExportError(f"{path}: its fastdiff metadata is incomplete or damaged; re-export it") from None
    if signature.inputs != inputs or [o.name for o in model.graph.output] != signature.outputs:
        raise ExportError(f"{path}: its graph's inputs/outputs do not match its fastdiff metadata")
    try:
        needed = side_files(model) if check_data else {}
    except ValueError:
        raise ExportError(f"{path}: its external-data entries are damaged; re-export it") from None
    for location, end in needed.items():
        side = path.parent / location
        if not side.is_file() or side.stat().st_size < end:
            state = "truncated" if side.is_file() else "missing"
            raise ExportError(
                f"{path}: its weights' side file {side} is {state}; re-export it "
                "(or move the graph and its side file together)"
            )
    return graph


def check_export(
    graph: ExportedGraph,
    *,
    model: nn.Module | None = None,
    classifier: nn.Module | None = None,
    null_label: int | None = None,
    want_classifier: bool | None = None,
    want_cfg: bool | None = None,
    low_res_shape: Sequence[int] | None = None,
    want_superres: bool | None = None,
) -> None:
    """ExportError when the file cannot serve the run asked for: a base model's graph for an
    upsampler or the reverse, guidance it lacks (or has and the run does not use), or weights
    other than ``model``'s / ``classifier``'s (``low_res_shape``: the upsampler's, for the hash)."""
    sig = graph.signature
    if want_superres is not None and want_superres != sig.superres:
        if sig.superres:
            raise ExportError(f"{graph.path} is an upsampler's graph (it takes low_res), not a base model's")
        raise ExportError(
            f"{graph.path} is a base model's graph (no low_res input); an upsampler needs its own export"
        )
    if want_classifier and not sig.classifier:
        raise ExportError(
            f"{graph.path} was exported without a classifier: classifier guidance needs a graph "
            "exported with --classifier"
        )
    if want_classifier is False and sig.classifier:
        raise ExportError(f"{graph.path} holds a classifier gradient; pass a classifier scale to use it")
    if want_cfg is not None and want_cfg != sig.cfg:
        have = "with" if sig.cfg else "without"
        raise ExportError(f"{graph.path} was exported {have} classifier-free guidance (--cfg)")
    if model is not None:
        digest = denoiser_hash(model, classifier, null_label, graph.dtype, graph.opset, low_res_shape)
        if digest != graph.hash:
            raise ExportError(
                f"{graph.path} was exported from another model or configuration (hash "
                f"{graph.hash[:12]}, these weights {digest[:12]}); re-export it with fastdiff export onnx"
            )


__all__ = [
    "DTYPES",
    "ExportError",
    "ExportResult",
    "ExportedGraph",
    "OnnxExportConfig",
    "check_export",
    "denoiser_hash",
    "export_onnx",
    "graph_shapes",
    "missing_packages",
    "node_counts",
    "read_export",
    "save_onnx",
    "side_files",
    "stored_tensors",
]
