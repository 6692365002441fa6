"""Deployment: the classifier-guided denoiser as one ONNX graph, and the runtimes that run it.

``export_onnx`` writes the UNet and the classifier's input gradient (forward and backward as
ordinary ops, no autograd at inference), or an upsampler with its ``low_res`` input, into one
file with provenance metadata;
``onnx_runtime`` runs the sampling loop around an onnxruntime session; ``tensorrt_engine``
builds and runs TensorRT engines from that file. Importing this package imports neither onnx,
onnxruntime nor TensorRT: each is imported where it is used.
"""

from .onnx_export import (
    ExportedGraph,
    ExportError,
    ExportResult,
    OnnxExportConfig,
    check_export,
    denoiser_hash,
    export_onnx,
    read_export,
)

__all__ = [
    "ExportError",
    "ExportResult",
    "ExportedGraph",
    "OnnxExportConfig",
    "check_export",
    "denoiser_hash",
    "export_onnx",
    "read_export",
]
