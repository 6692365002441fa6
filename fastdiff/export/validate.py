"""An exported graph against PyTorch: the model output against the network's forward (an
upsampler's with the same low_res), the gradient against ``torch.autograd.grad``
(ClassifierGuidance), on onnxruntime (CPU)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from fastdiff.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance

from .graph import example_inputs
from .onnx_export import check_export, read_export

TOLERANCE = 1e-4  # relative to the largest magnitude: fp32 graphs reach ~1e-6


@dataclass
class ValidationReport:
    """Relative max errors per batch size, and onnxruntime vs eager seconds per call."""

    errors: dict[str, float] = field(default_factory=dict)
    ort_seconds: dict[int, float] = field(default_factory=dict)
    eager_seconds: dict[int, float] = field(default_factory=dict)
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())

    def summary(self) -> str:
        worst = max(self.errors.values(), default=0.0)
        return f"onnxruntime vs PyTorch: worst relative error {worst:.2e} ({'ok' if self.ok else 'FAIL'})"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _as_graph_computes(net, dtype: str):
    """``net`` computing as an fp32 graph of it does: a network with an fp16 torso
    (guided-diffusion's use_fp16) is exported with its weights in fp32, so the reference is an
    fp32 copy of it (its own fp16 convs differ from the graph by ~1e-4)."""
    if net is None or dtype != "fp32" or all(p.dtype == torch.float32 for p in net.parameters()):
        return net
    return copy.deepcopy(net).float()


def validate_export(path, model, classifier=None, null_label=None, batches=(1, 3)) -> ValidationReport:
    """Run the file and the networks on the same inputs for each batch size in ``batches``."""
    from .onnx_runtime import OrtDenoiser

    graph = read_export(path)
    model, classifier = (_as_graph_computes(net, graph.dtype) for net in (model, classifier))
    check_export(
        graph, model=model, classifier=classifier, null_label=null_label, low_res_shape=graph.low_res_shape
    )
    session = OrtDenoiser(graph)
    report = ValidationReport(tolerance=TOLERANCE if graph.dtype == "fp32" else 2e-2)
    sig = graph.signature
    for n in batches:
        inputs = example_inputs(sig, graph.image_shape, n, seed=n, low_res_shape=graph.low_res_shape)
        named = dict(zip(sig.inputs, inputs))
        x, t, y = named["x_t"], named["timestep"], named.get("labels")
        cs, gs = named.get("classifier_scale"), named.get("cfg_scale")
        kwargs = {"low_res": named["low_res"]} if sig.superres else {}
        start = time.perf_counter()
        scales = (None if cs is None else float(cs), None if gs is None else float(gs))
        out, grad = session(x, t, y, *scales, **kwargs)
        report.ort_seconds[n] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            if sig.cfg:
                ref = ClassifierFreeGuidance(model, float(gs), null_label)(x, t, y=y, **kwargs)
            else:
                ref = model(x, t, y=y, **kwargs) if sig.class_cond else model(x, t, **kwargs)
        report.errors[f"model_output@{n}"] = _rel(out, ref)
        if sig.classifier:
            ref_grad = ClassifierGuidance(classifier, float(cs))(x, t, y=y)
            report.errors[f"gradient@{n}"] = _rel(grad, ref_grad)
        report.eager_seconds[n] = time.perf_counter() - start
    return report


__all__ = ["TOLERANCE", "ValidationReport", "validate_export"]
