"""An exported graph against PyTorch: the model output against the network's forward (an
upsampler's with the same low_res), the gradient against ``torch.autograd.grad``
(ClassifierGuidance), on onnxruntime (CPU); and polygraphy's reading of the file (inputs,
outputs, dtypes, the dynamic batch, opset, layers) against what its fastdiff metadata says, so a
file TensorRT's tools would see differently from fastdiff's runtimes is caught here."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from fastdiff.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance

from .graph import example_inputs
from .onnx_export import ExportedGraph, ExportError, check_export, read_export

TOLERANCE = 1e-4  # relative to the largest magnitude: fp32 graphs reach ~1e-6


@dataclass
class Inspection:
    """What polygraphy reads from the file: opset, node count (subgraphs included), each input's
    and output's dtype and shape (a dynamic dimension by its name), and where that differs from
    the fastdiff metadata."""

    opset: int
    nodes: int
    inputs: dict[str, dict]
    outputs: dict[str, dict]
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"opset": self.opset, "nodes": self.nodes, "inputs": self.inputs, "outputs": self.outputs,
                "problems": self.problems}  # fmt: skip


def polygraphy_available() -> bool:
    """polygraphy is optional (the onnx extra): validation inspects with it where it is installed."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return False
    return True


def _read_with_polygraphy(path) -> tuple[int, int, dict, dict]:
    from polygraphy.backend.onnx import onnx_from_path
    from polygraphy.backend.onnx import util as pg
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # no "Loading model" lines
    model = onnx_from_path(str(path), ignore_external_data=True)  # the structure, not the weights
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)

    def table(meta) -> dict:
        return {name: {"dtype": dtype.name, "shape": list(shape)} for name, (dtype, shape) in meta.items()}

    inputs, outputs = pg.get_input_metadata(model.graph), pg.get_output_metadata(model.graph)
    return opset, pg.get_num_nodes(model), table(inputs), table(outputs)


def inspect_export(graph: ExportedGraph) -> Inspection:
    """polygraphy's inspection of ``graph`` against its metadata: the inputs and outputs by name
    and order, float32 tensors but int64 labels (an fp16 graph casts inside), one dynamic batch
    dimension shared by every batched tensor, the per-sample shapes, the opset; ExportError when
    polygraphy is not installed."""
    if not polygraphy_available():
        raise ExportError("polygraphy is not installed (pip install polygraphy, or fastdiff[onnx])")
    opset, nodes, inputs, outputs = _read_with_polygraphy(graph.path)
    found = Inspection(opset, nodes, inputs, outputs)
    sig, problems = graph.signature, found.problems
    if list(inputs) != sig.inputs or list(outputs) != sig.outputs:
        problems.append(f"tensors {list(inputs)} -> {list(outputs)}, metadata {sig.inputs} -> {sig.outputs}")
        return found
    if opset != graph.opset:
        problems.append(f"opset {opset}, metadata {graph.opset}")
    channels, *size = graph.image_shape
    expected = {name: ("int64" if name == "labels" else "float32", shape)
                for name, shape in graph.input_shapes().items()}  # fmt: skip
    expected.update({name: ("float32", None) for name in sig.inputs if name not in expected})  # the scales
    expected["model_output"] = ("float32", None)  # C channels, or 2C with learned sigma
    expected.update({"gradient": ("float32", graph.image_shape)} if sig.classifier else {})
    batch = inputs["x_t"]["shape"][0] if inputs["x_t"]["shape"] else None
    if not isinstance(batch, str):
        problems.append(f"x_t's batch dimension is {batch!r}, not dynamic")
    for name, (dtype, rest) in expected.items():
        got = {**inputs, **outputs}[name]
        if got["dtype"] != dtype:
            problems.append(f"{name} is {got['dtype']}, fastdiff feeds/reads {dtype}")
        shape = got["shape"]
        if name in sig.inputs and name not in graph.input_shapes():
            if shape:
                problems.append(f"{name} has shape {shape}, not a scalar")
            continue
        if not shape or shape[0] != batch:
            problems.append(f"{name}'s batch dimension is {shape[:1]}, not x_t's {batch!r}")
        want = [[c, *size] for c in (channels, 2 * channels)] if rest is None else [list(rest)]
        if list(shape[1:]) not in want:
            said = " or ".join(f"[{', '.join(map(str, [batch, *w]))}]" for w in want)
            problems.append(f"{name} has shape {shape}, metadata {said}")
    return found


@dataclass
class ValidationReport:
    """Relative max errors per batch size, onnxruntime vs eager seconds per call, and
    polygraphy's inspection (None where polygraphy is not installed)."""

    errors: dict[str, float] = field(default_factory=dict)
    ort_seconds: dict[int, float] = field(default_factory=dict)
    eager_seconds: dict[int, float] = field(default_factory=dict)
    tolerance: float = TOLERANCE
    inspection: Inspection | None = None

    @property
    def ok(self) -> bool:
        inspected = self.inspection is None or not self.inspection.problems
        return inspected and all(e <= self.tolerance for e in self.errors.values())

    def summary(self) -> str:
        worst = max(self.errors.values(), default=0.0)
        line = f"onnxruntime vs PyTorch: worst relative error {worst:.2e}"
        if self.inspection is None:
            line += "; polygraphy inspection skipped (not installed)"
        elif self.inspection.problems:
            line += f"; polygraphy: {'; '.join(self.inspection.problems)}"
        else:
            line += f"; polygraphy: {self.inspection.nodes} nodes, I/O as the metadata says"
        return f"{line} ({'ok' if self.ok else 'FAIL'})"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _as_graph_computes(net, dtype: str):
    """``net`` computing as an fp32 graph of it does: a network with an fp16 torso
    (guided-diffusion's use_fp16) is exported with its weights in fp32, so the reference is an
    fp32 copy of it (its own fp16 convs differ from the graph by ~1e-4)."""
    if net is None or dtype != "fp32" or all(p.dtype == torch.float32 for p in net.parameters()):
        return net
    return copy.deepcopy(net).float()


def reference_outputs(graph: ExportedGraph, named: dict, model, classifier=None, null_label=None) -> dict:
    """What PyTorch computes for the graph's inputs ``named``: the model output (classifier-free
    guidance mixed in) and the classifier gradient of ClassifierGuidance (torch.autograd.grad)."""
    sig = graph.signature
    x, t, y = named["x_t"], named["timestep"], named.get("labels")
    kwargs = {"low_res": named["low_res"]} if sig.superres else {}
    with torch.no_grad():
        if sig.cfg:
            ref = ClassifierFreeGuidance(model, float(named["cfg_scale"]), null_label)(x, t, y=y, **kwargs)
        else:
            ref = model(x, t, y=y, **kwargs) if sig.class_cond else model(x, t, **kwargs)
    refs = {"model_output": ref}
    if sig.classifier:
        refs["gradient"] = ClassifierGuidance(classifier, float(named["classifier_scale"]))(x, t, y=y)
    return refs


def validation_inputs(graph: ExportedGraph, batch: int) -> dict:
    """The graph's inputs by name that validation feeds it at ``batch`` (seeded by the batch size),
    so other checks can compare on the same inputs."""
    inputs = example_inputs(
        graph.signature, graph.image_shape, batch, seed=batch, low_res_shape=graph.low_res_shape
    )
    return dict(zip(graph.signature.inputs, inputs))


def validate_export(path, model, classifier=None, null_label=None, batches=(1, 3)) -> ValidationReport:
    """Run the file and the networks on the same inputs for each batch size in ``batches``, and
    inspect the file with polygraphy where it is installed."""
    from .onnx_runtime import OrtDenoiser

    graph = read_export(path)
    model, classifier = (_as_graph_computes(net, graph.dtype) for net in (model, classifier))
    check_export(
        graph, model=model, classifier=classifier, null_label=null_label, low_res_shape=graph.low_res_shape
    )
    session = OrtDenoiser(graph)
    report = ValidationReport(tolerance=TOLERANCE if graph.dtype == "fp32" else 2e-2)
    report.inspection = inspect_export(graph) if polygraphy_available() else None
    sig = graph.signature
    for n in batches:
        named = validation_inputs(graph, n)
        cs, gs = named.get("classifier_scale"), named.get("cfg_scale")
        kwargs = {"low_res": named["low_res"]} if sig.superres else {}
        start = time.perf_counter()
        scales = (None if cs is None else float(cs), None if gs is None else float(gs))
        got = session(named["x_t"], named["timestep"], named.get("labels"), *scales, **kwargs)
        report.ort_seconds[n] = time.perf_counter() - start
        start = time.perf_counter()
        refs = reference_outputs(graph, named, model, classifier, null_label)
        report.eager_seconds[n] = time.perf_counter() - start
        for name, out in zip(sig.outputs, got):
            report.errors[f"{name}@{n}"] = _rel(out, refs[name])
    return report


__all__ = [
    "TOLERANCE",
    "Inspection",
    "ValidationReport",
    "inspect_export",
    "polygraphy_available",
    "reference_outputs",
    "validate_export",
    "validation_inputs",
]
