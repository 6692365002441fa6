"""``--engine onnx``: the sampling loop around an onnxruntime session of the exported denoiser.

The session computes the model output and the classifier gradient in one call; the update rule,
x0 clipping and the guidance shifts stay in the one ``SamplingStep`` every engine runs, so the
samples match eager's. Inputs and outputs are bound to the torch tensors' memory (I/O binding: no
copies on the CPU, device buffers with the CUDA provider). A graph is exported on first use into
a cache folder named by the hash of weights and configuration, so later runs reuse it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastdiff.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance
from fastdiff.diffusion.samplers import SamplingStep

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
    """Where on-the-fly exports live: $FASTDIFF_CACHE, else $XDG_CACHE_HOME/fastdiff, else ~/.cache."""
    root = os.environ.get("FASTDIFF_CACHE")
    if root:
        return Path(root) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fastdiff" / "onnx"


class OrtDenoiser:
    """One onnxruntime session of an exported denoiser: ``(x, t_model, labels, scales) ->
    (model_output, gradient or None)``, on the CUDA provider when the tensors are on CUDA and
    onnxruntime has it, else on the CPU with ``torch.get_num_threads()`` threads."""

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

    def _bind(self, io, name: str, t: Tensor, output: bool = False) -> None:
        kind = "cuda" if t.is_cuda else "cpu"
        args = (name, kind, t.device.index or 0, _ELEMENT[t.dtype], list(t.shape), t.data_ptr())
        (io.bind_output if output else io.bind_input)(*args)

    def __call__(
        self,
        x: Tensor,
        t_model: Tensor,
        labels: Tensor | None = None,
        classifier_scale: float | None = None,
        cfg_scale: float | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        sig, n = self.graph.signature, x.shape[0]
        if n > self.graph.max_batch:
            raise ExportError(f"batch {n} is above the exported graph's maximum {self.graph.max_batch}")
        dev = self.device
        values = {
            "x_t": x.to(dev, torch.float32).contiguous(),
            "timestep": t_model.to(dev, torch.float32).contiguous(),
            "labels": None if labels is None else labels.to(dev, torch.int64).contiguous(),
            "classifier_scale": torch.tensor(float(classifier_scale or 0.0), device=dev),
            "cfg_scale": torch.tensor(float(cfg_scale or 0.0), device=dev),
        }
        io = self.session.io_binding()
        for name in sig.inputs:
            if values[name] is None:
                raise ValueError(f"the exported denoiser needs {name}")
            self._bind(io, name, values[name])
        outs = [torch.empty((n, *shape), device=dev) for shape in self.output_shapes]
        for name, t in zip(sig.outputs, outs):
            self._bind(io, name, t, output=True)
        self.session.run_with_iobinding(io)
        outs = [t.to(x.device) for t in outs]
        return outs[0], (outs[1] if len(outs) > 1 else None)


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

    def _model(self, x: Tensor, t_model: Tensor, **_kwargs) -> Tensor:
        out, self._gradient = self.denoiser(
            x, t_model, self.labels_from.get("y"), self.classifier_scale, self.cfg_scale
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


def _plain(net):
    """The network inside the Sampler's low-precision wrapper, and its dtype name."""
    inner = getattr(net, "net", None)
    if isinstance(inner, torch.nn.Module) and isinstance(getattr(net, "dtype", None), torch.dtype):
        if net.dtype != torch.float16:
            raise ExportError("engine 'onnx' runs fp32 or fp16 graphs; use --dtype fp32")
        return inner, "fp16"
    return net, "fp32"


_SESSIONS: dict[tuple, OrtDenoiser] = {}


def remember(path: Path, digest: str) -> Path | None:
    """Put an exported file where ``--engine onnx`` looks for these networks (a hard link, else a
    copy), so sampling after ``fastdiff export onnx`` does not export again; None if it cannot."""
    import shutil

    from fastdiff.files import atomic_write

    target = cache_dir() / f"{digest}.onnx"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
    except OSError:
        return None
    return target


def cached_export(model, classifier=None, null_label=None, config: OnnxExportConfig | None = None) -> Path:
    """The exported graph of these networks in the cache folder, exported now if absent (or if
    the cached file does not read back as this export)."""
    config = config or OnnxExportConfig()
    digest = denoiser_hash(model, classifier, null_label, config.dtype, config.opset)
    path = cache_dir() / f"{digest}.onnx"
    if path.is_file():
        try:
            if read_export(path).hash == digest:
                return path
        except ExportError:
            pass  # a damaged cache entry: export again over it
    print(f"fastdiff: exporting the guided denoiser to ONNX (once) into {path}", file=sys.stderr)
    export_onnx(model, path, classifier=classifier, null_label=null_label, config=config)
    return path


def onnx_engine(step: SamplingStep, device: torch.device):
    """The engine function behind ``ENGINES['onnx']``."""
    model, classifier, null_label, classifier_scale, cfg_scale = _networks(step)
    model, dtype = _plain(model)
    if classifier is not None:
        classifier, _ = _plain(classifier)
    path = cached_export(model, classifier, null_label, OnnxExportConfig(dtype=dtype))
    graph = read_export(path)
    check_export(graph, want_classifier=classifier is not None, want_cfg=null_label is not None)
    key = (str(path), str(device), torch.get_num_threads())
    if key not in _SESSIONS:
        _SESSIONS[key] = OrtDenoiser(graph, device)
    return OnnxStep(step, _SESSIONS[key], classifier_scale, cfg_scale)


__all__ = ["OnnxStep", "OrtDenoiser", "cache_dir", "cached_export", "onnx_engine", "remember"]
