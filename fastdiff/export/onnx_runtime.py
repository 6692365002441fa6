"""``--engine onnx``: the sampling loop around an onnxruntime session of the exported denoiser.

The session computes the model output and the classifier gradient in one call; the update rule,
x0 clipping and the guidance shifts stay in the one ``SamplingStep`` every engine runs, so the
samples match eager's. Inputs (an upsampler's ``low_res`` among them) and outputs are bound to
the torch tensors' memory (I/O binding: no copies on the CPU, device buffers with the CUDA
provider), after the checks ``ExportedDenoiser`` shares with the TensorRT runner. A graph is
exported on first use into a cache folder named by the hash of weights and configuration, so
later runs reuse it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastdiff.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance
from fastdiff.diffusion.samplers import SamplingStep
from fastdiff.files import cache_root, locked_folder, place_file, remove_temp_files
from fastdiff.models.unet import SuperResModel

from .onnx_export import (
    ExportedGraph,
    ExportError,
    OnnxExportConfig,
    check_export,
    denoiser_hash,
    export_onnx,
    read_export,
)

_ELEMENT = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16}


def cache_dir() -> Path:
    """Where on-the-fly exports live: ``onnx`` in fastdiff's cache folder (files.cache_root)."""
    return cache_root() / "onnx"


class ExportedDenoiser:
    """The call both runners of an exported graph (onnxruntime, TensorRT) share: ``(x, t_model,
    labels, scales, low_res) -> (model_output, gradient or None)``. It checks the step's tensors
    against the graph's metadata (one line for a wrong shape, a missing or unexpected low_res),
    puts them on the runner's device in the graph's input dtypes, allocates the outputs; a runner
    only binds and runs them (``_run``)."""

    graph: ExportedGraph
    device: torch.device
    output_shapes: list[tuple[int, ...]]

    def _check_batch(self, n: int) -> None:
        if n > self.graph.max_batch:
            raise ExportError(f"batch {n} is above the exported graph's maximum {self.graph.max_batch}")

    def _run(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def inputs(
        self,
        x: Tensor,
        t_model: Tensor,
        labels: Tensor | None = None,
        classifier_scale: float | None = None,
        cfg_scale: float | None = None,
        low_res: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The graph's inputs by name, checked and on the device."""
        graph, n, dev = self.graph, x.shape[0], self.device
        check_export(
            graph, want_superres=low_res is not None
        )  # a base graph for an upsampler, or the reverse
        given = {"x_t": x, "timestep": t_model, "labels": labels, "low_res": low_res}
        values = {}
        for name, shape in graph.input_shapes().items():
            t = given[name]
            if t is None:
                raise ExportError(f"{graph.path} takes {name}; none was given")
            if tuple(t.shape) != (n, *shape):
                raise ExportError(
                    f"{name} of shape {list(t.shape)}: {graph.path} takes {[n, *shape]} for a batch of {n}"
                )
            values[name] = t.to(dev, torch.int64 if name == "labels" else torch.float32).contiguous()
        scales = {"classifier_scale": classifier_scale, "cfg_scale": cfg_scale}
        for name in graph.signature.inputs:
            if name in scales:
                values[name] = torch.tensor(float(scales[name] or 0.0), device=dev)
        return values

    def __call__(
        self,
        x: Tensor,
        t_model: Tensor,
        labels: Tensor | None = None,
        classifier_scale: float | None = None,
        cfg_scale: float | None = None,
        *,
        low_res: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        n = x.shape[0]
        self._check_batch(n)
        inputs = self.inputs(x, t_model, labels, classifier_scale, cfg_scale, low_res)
        names = self.graph.signature.outputs
        outputs = {
            name: torch.empty((n, *shape), device=self.device)
            for name, shape in zip(names, self.output_shapes)
        }
        self._run(inputs, outputs)
        outs = [t.to(x.device) for t in outputs.values()]
        return outs[0], (outs[1] if len(outs) > 1 else None)


class OrtDenoiser(ExportedDenoiser):
    """One onnxruntime session of an exported denoiser, on the CUDA provider when the tensors are
    on CUDA and onnxruntime has it, else on the CPU with ``torch.get_num_threads()`` threads."""

    def __init__(self, graph: ExportedGraph, device: torch.device | str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        device = torch.device(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            self.device = device
        else:
            self.device = torch.device("cpu")
        self.graph = graph
        self.session = ort.InferenceSession(str(graph.path), opts, providers=providers)
        outputs = self.session.get_outputs()
        self.output_shapes = [tuple(o.shape[1:]) for o in outputs]
        if not all(isinstance(d, int) for shape in self.output_shapes for d in shape):
            raise ExportError(f"{graph.path}: only the batch dimension may be dynamic")

    def _run(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        io = self.session.io_binding()
        for bind, tensors in ((io.bind_input, inputs), (io.bind_output, outputs)):
            for name, t in tensors.items():
                kind = "cuda" if t.is_cuda else "cpu"
                bind(name, kind, t.device.index or 0, _ELEMENT[t.dtype], list(t.shape), t.data_ptr())
        # torch wrote the inputs on its stream; the CUDA provider computes on a non-blocking stream
        # of its own, which would not wait for them (a no-op on the CPU)
        io.synchronize_inputs()
        self.session.run_with_iobinding(io)


class OnnxStep:
    """A sampling step whose networks run in an exported graph: the same ``SamplingStep``
    arithmetic around it, with the session's outputs standing in for model and cond_fn."""

    def __init__(self, step: SamplingStep, denoiser, classifier_scale: float | None, cfg_scale: float | None):
        self.denoiser, self.classifier_scale, self.cfg_scale = denoiser, classifier_scale, cfg_scale
        self.labels_from = step.cond_kwargs if "y" in step.cond_kwargs else step.model_kwargs
        self._gradient: Tensor | None = None
        self.inner = SamplingStep(
            step.diffusion,
            self._model,
            step.rule,
            model_kwargs=step.model_kwargs,
            cond_fn=self._cond_fn if classifier_scale is not None else None,
            cond_kwargs=step.cond_kwargs,
            clip_denoised=step.clip_denoised,
            denoised_fn=step.denoised_fn,
        )

    def _model(self, x: Tensor, t_model: Tensor, **kwargs) -> Tensor:
        labels = self.labels_from.get("y")
        low_res = kwargs.get("low_res")
        out, self._gradient = self.denoiser(
            x, t_model, labels, self.classifier_scale, self.cfg_scale, low_res=low_res
        )
        return out

    def _cond_fn(self, x: Tensor, t_model: Tensor, **_kwargs) -> Tensor:
        return self._gradient

    def __call__(self, x: Tensor, t: Tensor, noise: Tensor | None, state):
        return self.inner(x, t, noise, state)


def _networks(step: SamplingStep):
    """(model, classifier, null_label, classifier_scale, cfg_scale) of a Sampler's step."""
    model, null_label, cfg_scale = step.model, None, None
    if isinstance(model, ClassifierFreeGuidance):
        model, null_label, cfg_scale = model.model, model.null_label, model.scale
    classifier = classifier_scale = None
    if isinstance(step.cond_fn, ClassifierGuidance):
        classifier, classifier_scale = step.cond_fn.classifier, step.cond_fn.scale
    elif step.cond_fn is not None:
        raise ExportError("engine 'onnx' exports fastdiff's classifier guidance, not a custom cond_fn")
    return model, classifier, null_label, classifier_scale, cfg_scale


def _plain(net, engine: str = "onnx"):
    """The network inside the Sampler's low-precision wrapper, and its dtype name: bf16 for
    'trt' alone, which builds its layers in it from an fp32 graph (an ONNX graph is fp32 or fp16)."""
    inner = getattr(net, "net", None)
    if isinstance(inner, torch.nn.Module) and isinstance(getattr(net, "dtype", None), torch.dtype):
        if net.dtype == torch.bfloat16 and engine == "trt":
            return inner, "bf16"
        if net.dtype != torch.float16:
            raise ExportError(f"engine '{engine}' runs fp32 or fp16 graphs; use --dtype fp32")
        return inner, "fp16"
    return net, "fp32"


def step_dtype(step: SamplingStep, engine: str) -> str:
    """The dtype name ("fp32", "fp16" or "bf16") a Sampler's step runs its model in: the layer
    precision engine 'trt' builds."""
    return _plain(_networks(step)[0], engine)[1]


_SESSIONS: dict[tuple, OrtDenoiser] = {}
# the cache is one folder, locked whole while a process exports into it or caches a graph
_WAITING = "fastdiff: waiting for another process's ONNX export in {} to finish"


def _serves(path: Path, digest: str, max_batch: int) -> bool:
    """Whether ``path`` reads back as the export of the networks hashed ``digest`` taking batches up
    to ``max_batch`` (not in the hash: ``fastdiff export onnx --max-batch`` changes only that)."""
    try:
        graph = read_export(path)
    except ExportError:
        return False  # missing or damaged
    return graph.hash == digest and graph.max_batch >= max_batch


def remember(path: Path, digest: str, max_batch: int) -> Path | None:
    """Put an exported file where ``--engine onnx`` looks for these networks (a hard link, else a
    copy), so sampling after ``fastdiff export onnx`` does not export again; None if it cannot, or
    if it takes fewer batches than ``--engine onnx`` exports for (that would export again).

    A graph whose weights are in a side file goes there with it: the side file as
    ``<hash>.onnx.data``, first, then the graph rewritten to name it (it named the export's file)."""
    wanted = OnnxExportConfig().max_batch  # what --engine onnx exports for
    if max_batch < wanted:
        return None
    target = cache_dir() / f"{digest}.onnx"
    try:
        with locked_folder(cache_dir(), wait=_WAITING.format(cache_dir())):
            if not _serves(target, digest, wanted):
                _cache(path, target)
    except (OSError, ValueError):  # a read-only or full cache: --engine onnx exports then
        return None
    return target


def _cache(path: Path, target: Path) -> None:
    """``path`` (and its side file) as ``target`` in the cache (held: see remember)."""
    import onnx

    from .onnx_export import side_files, stored_tensors

    model = onnx.load(str(path), load_external_data=False)
    located = side_files(model)
    if not located:
        place_file(path, target)
        return
    if len(located) > 1:
        raise ValueError("several side files")  # not how fastdiff writes its graphs
    data = f"{target.name}.data"
    place_file(path.parent / next(iter(located)), target.parent / data)
    for tensor in stored_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data
    place_file(path, target, model.SerializeToString())


def cached_export(
    model, classifier=None, null_label=None, config: OnnxExportConfig | None = None, low_res_shape=None
) -> Path:
    """The exported graph of these networks in the cache folder, exported now if absent (or if
    the cached file does not read back as this export for ``config``'s batches); ``low_res_shape``:
    an upsampler's."""
    config = config or OnnxExportConfig()
    digest = denoiser_hash(model, classifier, null_label, config.dtype, config.opset, low_res_shape)
    path = cache_dir() / f"{digest}.onnx"
    # one process exports, another sampling the same networks waits and then finds the graph
    with locked_folder(cache_dir(), wait=_WAITING.format(cache_dir())):
        if _serves(path, digest, config.max_batch):
            return path
        remove_temp_files(cache_dir(), [path.name])  # a killed export's (none is running: held)
        print(f"fastdiff: exporting the denoiser to ONNX (once) into {path}", file=sys.stderr)
        export_onnx(
            model,
            path,
            classifier=classifier,
            null_label=null_label,
            low_res_shape=low_res_shape,
            config=config,
        )
    return path


def step_graph(step: SamplingStep, engine: str) -> tuple[ExportedGraph, float | None, float | None]:
    """(graph, classifier scale, cfg scale) of a Sampler's step for engine ``engine``: the graph of
    its networks from the cache (exported now if absent), checked against what the step runs.
    An upsampler's graph takes low_res at the size of the step's low_res buffer. The onnx engine
    runs the networks' own dtype (fp32 or fp16); TensorRT builds its layers in that dtype from an
    fp32 graph."""
    model, classifier, null_label, classifier_scale, cfg_scale = _networks(step)
    model, dtype = _plain(model, engine)
    if classifier is not None:
        classifier, _ = _plain(classifier, engine)
    low_res_shape = None
    if isinstance(model, SuperResModel):
        low_res = step.model_kwargs.get("low_res")
        if low_res is None:
            raise ExportError(
                "an upsampler samples from low-resolution images: pass model_kwargs={'low_res': ...}"
            )
        low_res_shape = tuple(low_res.shape[1:])
    config = OnnxExportConfig(dtype="fp32" if engine == "trt" else dtype)
    graph = read_export(cached_export(model, classifier, null_label, config, low_res_shape))
    check_export(
        graph,
        want_classifier=classifier is not None,
        want_cfg=null_label is not None,
        want_superres=low_res_shape is not None,
    )
    return graph, classifier_scale, cfg_scale


def onnx_engine(step: SamplingStep, device: torch.device):
    """The engine function behind ``ENGINES['onnx']``."""
    graph, classifier_scale, cfg_scale = step_graph(step, "onnx")
    key = (str(graph.path), str(device), torch.get_num_threads())
    if key not in _SESSIONS:
        _SESSIONS[key] = OrtDenoiser(graph, device)
    return OnnxStep(step, _SESSIONS[key], classifier_scale, cfg_scale)


__all__ = [
    "ExportedDenoiser",
    "OnnxStep",
    "OrtDenoiser",
    "cache_dir",
    "cached_export",
    "onnx_engine",
    "remember",
    "step_dtype",
    "step_graph",
]
