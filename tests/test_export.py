"""fastdiff.export without a full export: the backward decompositions against autograd, the
matmul attention, metadata checks and their one-line errors, the TensorRT module's checks."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from fastdiff.export import ExportError, OnnxExportConfig, check_export, read_export
from fastdiff.export.graph import DenoiserSignature, decompositions, matmul_attention
from fastdiff.ops.attention.reference import attention_reference

onnx = pytest.importorskip("onnx")


def _traced_gradient(fn, x):
    """fn's input gradient traced with make_fx and the export decompositions (symbolic batch)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def grad(x):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            return torch.autograd.grad(fn(x_in).square().sum(), x_in)[0]

    table = decompositions()
    gm = make_fx(grad, decomposition_table=table, tracing_mode="symbolic", _allow_non_fake_inputs=True)(x)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    return gm, targets


@pytest.mark.parametrize("stride,padding,size", [(1, 1, 8), (2, 1, 8), (2, 1, 7), (2, 0, 9)])
def test_convolution_backward_is_a_transposed_convolution(stride, padding, size):
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 3, 3)
    x = torch.randn(2, 3, size, size)

    def fn(x):
        return F.conv2d(F.silu(x), weight, None, stride, padding)

    gm, targets = _traced_gradient(fn, x)
    assert "aten.convolution_backward.default" not in targets
    x3 = torch.randn(3, 3, size, size)  # another batch size than traced
    x_in = x3.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(fn(x_in).square().sum(), x_in)
    torch.testing.assert_close(gm(x3), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [8, 9])
def test_pool_backwards_are_upsamples(size):
    x = torch.randn(2, 4, size, size)

    def fn(x):
        h = F.avg_pool2d(x, 2)
        return h * F.adaptive_avg_pool2d(h, 1)

    gm, targets = _traced_gradient(fn, x)
    assert not {"aten.avg_pool2d_backward.default", "aten._adaptive_avg_pool2d_backward.default"} & targets
    x_in = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(fn(x_in).square().sum(), x_in)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["new", "legacy"])
def test_matmul_attention_is_the_reference(order):
    qkv = torch.randn(2, 3 * 2 * 8, 10)
    torch.testing.assert_close(matmul_attention(qkv, 2, order), attention_reference(qkv, 2, order))


def test_signature_names_inputs_by_guidance():
    assert DenoiserSignature(False, False, False).inputs == ["x_t", "timestep"]
    sig = DenoiserSignature(True, True, True)
    assert sig.inputs == ["x_t", "timestep", "labels", "classifier_scale", "cfg_scale"]
    assert sig.outputs == ["model_output", "gradient"] and sig.guidance == "classifier+cfg"


def test_config_refuses_old_opsets_and_unknown_dtypes():
    with pytest.raises(ExportError, match="opset"):
        OnnxExportConfig(opset=13)
    with pytest.raises(ExportError, match="dtype"):
        OnnxExportConfig(dtype="int8")


def _fake_export(path, sig: DenoiserSignature, digest="0" * 64, **meta):
    """A tiny ONNX file with a denoiser's names and fastdiff metadata (no export needed)."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in sig.inputs]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in sig.outputs]
    nodes = [helper.make_node("Identity", ["x_t"], [n]) for n in sig.outputs]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))
    props = {
        "fastdiff.hash": digest,
        "fastdiff.inputs": json.dumps(sig.inputs),
        "fastdiff.class_cond": json.dumps(sig.class_cond),
        "fastdiff.image_shape": "[1, 8, 8]",
        "fastdiff.null_label": "null",
        "fastdiff.dtype": "fp32",
        "fastdiff.max_batch": "64",
        "fastdiff.opset": "18",
        **meta,
    }
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def test_read_export_refuses_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        read_export(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x0f\xff not protobuf" * 10)
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        read_export(junk)
    path = _fake_export(tmp_path / "plain.onnx", DenoiserSignature(False, False, False))
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match="not a fastdiff export"):
        read_export(path)
    damaged = _fake_export(tmp_path / "damaged.onnx", DenoiserSignature(False, False, False))
    model = onnx.load(str(damaged))
    for p in model.metadata_props:
        if p.key == "fastdiff.image_shape":
            p.value = "{not json"
    onnx.save(model, str(damaged))
    with pytest.raises(ExportError, match="incomplete or damaged"):
        read_export(damaged)


def test_check_export_names_what_does_not_fit(tmp_path):
    plain = read_export(_fake_export(tmp_path / "a.onnx", DenoiserSignature(True, False, False)))
    with pytest.raises(ExportError, match="exported without a classifier"):
        check_export(plain, want_classifier=True)
    with pytest.raises(ExportError, match="without classifier-free guidance"):
        check_export(plain, want_cfg=True)
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ExportError, match="another model or configuration"):
        check_export(plain, model=net)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_missing_is_one_line(tmp_path):
    from fastdiff.export.tensorrt_engine import tensorrt

    with pytest.raises(ExportError, match=r"^TensorRT not installed: pip install"):
        tensorrt()


def test_tensorrt_profile_covers_the_batch_inputs(tmp_path):
    from fastdiff.export.tensorrt_engine import TrtBuildConfig, profile_shapes

    graph = read_export(_fake_export(tmp_path / "a.onnx", DenoiserSignature(True, True, False)))
    shapes = profile_shapes(graph, TrtBuildConfig(min_batch=1, opt_batch=4, max_batch=16))
    assert shapes == {
        "x_t": ((1, 1, 8, 8), (4, 1, 8, 8), (16, 1, 8, 8)),
        "timestep": ((1,), (4,), (16,)),
        "labels": ((1,), (4,), (16,)),
    }
    with pytest.raises(ExportError, match="min <= opt <= max"):
        TrtBuildConfig(min_batch=8, opt_batch=4)


def test_cli_export_refuses_bad_options_before_work(tmp_path):
    from click.testing import CliRunner

    from fastdiff.cli.main import main

    runner = CliRunner()
    res = runner.invoke(main, ["export", "onnx", "--out", str(tmp_path), "--opset", "12"])
    assert res.exit_code != 0 and "opset must be at least 17" in res.output
    res = runner.invoke(main, ["export", "onnx", "--out", str(tmp_path), "--cfg", "--classifier", "nope.pt"])
    assert res.exit_code != 0 and "not found" in res.output
    res = runner.invoke(main, ["export", "trt", "--onnx", str(tmp_path / "x.onnx"), "--out", str(tmp_path)])
    assert res.exit_code != 0 and "ONNX file not found" in res.output
    assert not list(tmp_path.iterdir())
