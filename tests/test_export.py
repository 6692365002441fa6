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


class _FakeTrt:
    """A stand-in for the tensorrt module with the TensorRT 10 calls build_engine makes, recording
    them (TensorRT cannot be installed here); ``parse_ok`` / ``build_ok`` steer the failure paths."""

    __version__ = "10.0-fake"

    def __init__(self, parse_ok=True, build_ok=True):
        self.calls: list = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Network:
            pass

        class Parser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return parse_ok

            def get_error(self, i):
                return "Unsupported op Foo"

        class Cache:
            def serialize(self):
                return b"timing"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile", profile.shapes))

            def create_timing_cache(self, data):
                fake.calls.append(("cache_in", data))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"engine-bytes" if build_ok else None

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": "workspace"})
        self.BuilderFlag = type("BuilderFlag", (), {"FP16": "fp16", "BF16": "bf16"})


def test_tensorrt_build_path_with_a_stand_in_module(tmp_path, monkeypatch):
    from fastdiff.export import tensorrt_engine
    from fastdiff.export.tensorrt_engine import TrtBuildConfig, build_engine

    graph = read_export(_fake_export(tmp_path / "a.onnx", DenoiserSignature(True, True, False)))
    fake = _FakeTrt()
    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: fake)
    out = build_engine(graph, tmp_path / "e.engine", TrtBuildConfig(max_batch=16), tmp_path / "timing.cache")
    assert out.read_bytes() == b"engine-bytes" and (tmp_path / "timing.cache").read_bytes() == b"timing"
    assert ("flag", "fp16") in fake.calls
    profile = dict(fake.calls)["profile"]
    assert profile["x_t"] == ((1, 1, 8, 8), (8, 1, 8, 8), (16, 1, 8, 8)) and "classifier_scale" not in profile
    build_engine(graph, tmp_path / "e.engine", TrtBuildConfig(max_batch=16), tmp_path / "timing.cache")
    assert ("cache_in", b"timing") in fake.calls  # the second build starts from the saved cache

    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: _FakeTrt(parse_ok=False))
    with pytest.raises(ExportError, match="TensorRT cannot parse .*Unsupported op Foo"):
        build_engine(graph, tmp_path / "f.engine", TrtBuildConfig())
    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: _FakeTrt(build_ok=False))
    with pytest.raises(ExportError, match="could not build an engine"):
        build_engine(graph, tmp_path / "f.engine", TrtBuildConfig())
    assert not (tmp_path / "f.engine").exists()
