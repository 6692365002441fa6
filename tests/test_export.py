"""fastdiff.export without a full export: the backward decompositions against autograd, the
matmul attention, metadata checks and their one-line errors, the TensorRT module's checks, and
an upsampler's low_res through both runners (hand-built graphs and a TensorRT stand-in)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdiff.diffusion import ClassifierGuidance
from fastdiff.export import ExportError, OnnxExportConfig, check_export, read_export
from fastdiff.export.graph import DenoiserSignature, classifier_gradient, decompositions, matmul_attention
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


def test_adaptive_pool_backward_is_atens():
    """The decomposition of a global pool's backward (make_fx traces a 1x1 adaptive pool as a mean
    here, so the trace above does not reach it) is the aten op it stands for."""
    x, grad = torch.randn(2, 4, 5, 7), torch.randn(2, 4, 1, 1)
    aten = torch.ops.aten._adaptive_avg_pool2d_backward.default
    torch.testing.assert_close(decompositions()[aten](grad, x), aten(grad, x))


def test_the_exported_classifier_gradient_is_classifier_guidances():
    """The denoiser's gradient output (the label picked by a one-hot product) is what
    ClassifierGuidance gives the eager samplers, sign and scale included."""
    torch.manual_seed(0)
    weight = torch.randn(2 * 4 * 4, 5)

    def classifier(x, t):
        return (x.flatten(1) * t[:, None]) @ weight

    x, t, y = torch.randn(3, 2, 4, 4), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4, 0, 2])
    want = ClassifierGuidance(classifier, 2.5)(x, t, y)
    torch.testing.assert_close(classifier_gradient(classifier, x, t, y, torch.tensor(2.5)), want)


@pytest.mark.parametrize("order", ["new", "legacy"])
def test_matmul_attention_is_the_reference(order):
    qkv = torch.randn(2, 3 * 2 * 8, 10)
    torch.testing.assert_close(matmul_attention(qkv, 2, order), attention_reference(qkv, 2, order))


def test_signature_names_inputs_by_guidance():
    assert DenoiserSignature(False, False, False).inputs == ["x_t", "timestep"]
    sig = DenoiserSignature(True, True, True)
    assert sig.inputs == ["x_t", "timestep", "labels", "classifier_scale", "cfg_scale"]
    assert sig.outputs == ["model_output", "gradient"] and sig.guidance == "classifier+cfg"
    sr = DenoiserSignature(True, False, False, superres=True)
    assert sr.inputs == ["x_t", "timestep", "low_res", "labels"] and sr.kind == "superres"


def test_config_refuses_old_opsets_and_unknown_dtypes():
    with pytest.raises(ExportError, match="opset"):
        OnnxExportConfig(opset=13)
    with pytest.raises(ExportError, match="^opset must be at least 18, got 17$"):
        OnnxExportConfig(opset=17)  # torch.onnx wrote ADM's graphs in 18 under metadata saying 17
    with pytest.raises(ExportError, match="dtype"):
        OnnxExportConfig(dtype="int8")
    newest = onnx.defs.onnx_opset_version()  # above it the exporter wrote opset 18, metadata aside
    assert OnnxExportConfig(opset=newest).opset == newest
    with pytest.raises(ExportError, match=rf"^opset must be at most {newest} \(onnx "):
        OnnxExportConfig(opset=newest + 1)


def _fake_export(path, sig: DenoiserSignature, digest="0" * 64, graph=None, **meta):
    """A tiny ONNX file with a denoiser's names and fastdiff metadata (no export needed): an
    untyped Identity graph, or ``graph`` (an onnx GraphProto)."""
    from onnx import TensorProto, helper

    if graph is None:
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in sig.inputs]
        outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in sig.outputs]
        nodes = [helper.make_node("Identity", ["x_t"], [n]) for n in sig.outputs]
        graph = helper.make_graph(nodes, "g", inputs, outputs)
    # IR 10, as torch.onnx writes: newer onnx releases default to an IR newer than onnxruntime reads
    # (onnx 1.23 writes 14; onnxruntime 1.30 reads up to 13)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if sig.superres:
        meta = {"fastdiff.kind": "superres", "fastdiff.low_res_shape": "[1, 4, 4]", **meta}
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


def test_hash_and_validation_see_the_weights_as_the_graph_holds_them():
    """A use_fp16 network (fp16 torso) and the Sampler's fp32 cast of it give one fp32 graph: one
    hash, and validation runs an fp32 copy (the network itself is left as it is)."""
    from builders import build_unet

    from fastdiff.export import denoiser_hash
    from fastdiff.export.validate import _as_graph_computes

    half = build_unet(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", use_fp16=True)
    full = build_unet(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1")
    full.load_state_dict(half.state_dict())  # the fp16 values, cast up
    assert denoiser_hash(half, None, None, "fp32", 18) == denoiser_hash(full, None, None, "fp32", 18)
    full.out[2].bias.data += 1
    assert denoiser_hash(half, None, None, "fp32", 18) != denoiser_hash(full, None, None, "fp32", 18)
    copy = _as_graph_computes(half, "fp32")
    assert copy.dtype == torch.float32 and half.dtype == torch.float16
    assert _as_graph_computes(full, "fp32") is full and _as_graph_computes(half, "fp16") is half


def test_hash_tells_image_sizes_apart():
    """A UNet's weights and module tree are the same at 16x16 and 32x32 (one attention level
    each): the hash still differs, so --engine onnx never serves one size's cached graph to the
    other (it was reused, and every step failed on x_t's shape)."""
    from builders import build_unet

    from fastdiff.export import denoiser_hash

    small = build_unet(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8"
    )
    large = build_unet(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16"
    )
    large.load_state_dict(small.state_dict())
    assert repr(small) == repr(large)
    assert denoiser_hash(small, None, None, "fp32", 18) != denoiser_hash(large, None, None, "fp32", 18)


def test_trace_makes_only_the_batch_symbolic():
    """The traced denoiser's inputs share one batch symbol and every other size is a number (a
    symbol per size made the bundled model's export 121 s against 94 s); the graph computes the
    denoiser at another batch size than the one it was traced at."""
    from builders import build_classifier, build_unet

    from fastdiff.export.graph import GuidedDenoiser, example_inputs, trace

    unet = build_unet(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", num_classes=4).eval()
    clf = build_classifier(
        image_size=8, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="4",
        channel_mult="1,2", num_classes=4,
    ).eval()  # fmt: skip
    denoiser = GuidedDenoiser(unet, clf)
    sig = denoiser.signature
    graph = trace(denoiser, example_inputs(sig, (3, 8, 8), 2))
    shapes = [n.meta["val"].shape for n in graph.graph.nodes if n.op == "placeholder"]
    assert [len(s) for s in shapes] == [4, 1, 1, 0]  # x_t, timestep, labels, classifier_scale
    batch = {str(s[0]) for s in shapes if len(s)}
    assert len(batch) == 1 and not batch.pop().isdigit()
    assert all(isinstance(d, int) for d in shapes[0][1:])
    inputs = example_inputs(sig, (3, 8, 8), 3, seed=1)
    for got, want in zip(graph(*inputs), denoiser(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("version", ["11.1.0", "8.6.1"])
def test_tensorrt_other_than_10_is_one_line(monkeypatch, version):
    """TensorRT 11 dropped BuilderFlag.FP16/BF16 (strongly typed networks only): it is refused by
    name before any work, not an AttributeError after parsing the graph."""
    import importlib
    from types import SimpleNamespace

    from fastdiff.export.tensorrt_engine import tensorrt

    installed = {"version": version}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(
        importlib, "import_module", lambda name: SimpleNamespace(__version__=installed["version"])
    )
    with pytest.raises(ExportError, match=rf"^TensorRT {version} is installed; .*'tensorrt>=10,<11'$"):
        tensorrt()
    installed["version"] = "10.16.0"
    assert tensorrt().__version__ == "10.16.0"


def test_tensorrt_that_does_not_load_is_one_line(tmp_path, monkeypatch):
    """A tensorrt package whose libraries are missing raises as it is imported (its __init__ loads
    libnvinfer): that was a traceback from every trt command, where a missing package is one line."""
    from fastdiff.export.tensorrt_engine import tensorrt

    package = tmp_path / "tensorrt"
    package.mkdir()
    message = "libnvinfer.so.10: cannot open shared object file:\n No such file or directory"
    (package / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(ExportError) as info:
        tensorrt()
    assert str(info.value) == (
        "TensorRT is installed but does not load (libnvinfer.so.10: cannot open shared object "
        "file: No such file or directory); reinstall tensorrt 10"
    )


def test_tensorrt_profile_covers_the_batch_inputs(tmp_path):
    from fastdiff.export.tensorrt_engine import TrtBuildConfig, profile_shapes

    graph = read_export(_fake_export(tmp_path / "a.onnx", DenoiserSignature(True, True, False)))
    shapes = profile_shapes(graph, TrtBuildConfig(min_batch=1, opt_batch=4, max_batch=16))
    assert shapes == {
        "x_t": ((1, 1, 8, 8), (4, 1, 8, 8), (16, 1, 8, 8)),
        "timestep": ((1,), (4,), (16,)),
        "labels": ((1,), (4,), (16,)),
    }
    with pytest.raises(
        ExportError, match=r"1 <= --min-batch \(8\) <= --opt-batch \(4\) <= --max-batch \(64\)$"
    ):
        TrtBuildConfig(min_batch=8, opt_batch=4)


def test_cli_export_refuses_bad_options_before_work(tmp_path):
    from click.testing import CliRunner

    from fastdiff.cli.main import main

    runner = CliRunner()
    res = runner.invoke(main, ["export", "onnx", "--out", str(tmp_path), "--opset", "12"])
    assert res.exit_code != 0 and "opset must be at least 18" in res.output
    res = runner.invoke(main, ["export", "onnx", "--out", str(tmp_path), "--opset", "17"])
    assert (res.exit_code, res.output) == (2, "Error: --opset must be at least 18, got 17\n")
    res = runner.invoke(main, ["export", "onnx", "--out", str(tmp_path), "--cfg", "--classifier", "nope.pt"])
    assert res.exit_code != 0 and "not found" in res.output
    res = runner.invoke(main, ["export", "onnx", "--out", str(tmp_path), "--max-batch", "1"])
    assert (res.exit_code, res.output) == (2, "Error: --max-batch must be at least 2, got 1\n")
    res = runner.invoke(main, ["export", "onnx", "--out", str(tmp_path), "--opset", "999"])
    assert res.output.startswith("Error: --opset must be at most ") and res.output.endswith("got 999\n")
    assert not list(tmp_path.iterdir())


def test_cli_export_without_the_onnx_extra_is_one_line_before_loading(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import fastdiff.runs.loading
    from fastdiff.cli.main import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m, *a: None if m == "onnxscript" else find_spec(m, *a)
    )
    monkeypatch.setattr(fastdiff.runs.loading, "load_diffusion_model", None)  # loading would raise
    res = CliRunner().invoke(main, ["export", "onnx", "--out", str(tmp_path / "out")])
    assert res.output == "Error: onnxscript not installed (pip install 'fastdiff[onnx]')\n"
    assert res.exit_code == 1 and not (tmp_path / "out").exists()


def test_cli_export_checks_out_before_tracing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import fastdiff.export
    from fastdiff.cli.main import main

    def no_trace(*args, **kwargs):
        raise AssertionError("exported before --out was checked")

    monkeypatch.setattr(fastdiff.export, "export_onnx", no_trace)
    (tmp_path / "afile").write_text("")
    res = CliRunner().invoke(main, ["export", "onnx", "--out", str(tmp_path / "afile" / "x")])
    assert res.output == f"Error: cannot write to --out {tmp_path / 'afile' / 'x'}: Not a directory\n"


def test_cli_export_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """The graph's write failing for lack of space was onnx's OSError traceback."""
    import errno

    from click.testing import CliRunner

    import fastdiff.export
    from fastdiff.cli.main import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fastdiff.export, "export_onnx", full)
    res = CliRunner().invoke(main, ["export", "onnx", "--out", str(tmp_path)])
    assert res.output == f"Error: cannot write to {tmp_path}: No space left on device\n"
    assert res.exit_code == 1


def test_cli_export_offers_engine_onnx_only_a_validated_graph(tmp_path, monkeypatch):
    """A graph that does not match PyTorch stays in --out for inspection, but is not put where
    ``--engine onnx`` finds it (it was linked into that cache before the validation ran)."""
    import types

    from click.testing import CliRunner

    import fastdiff.export
    import fastdiff.export.onnx_runtime
    import fastdiff.export.validate
    from fastdiff.cli.main import main

    remembered = []
    written = types.SimpleNamespace(path=tmp_path / "g.onnx", hash="0" * 64, bytes=10, node_counts={})
    monkeypatch.setattr(fastdiff.export, "export_onnx", lambda *a, **k: written)
    monkeypatch.setattr(fastdiff.export.onnx_runtime, "remember", lambda *a: remembered.append(a))
    (tmp_path / "denoiser-none-fp32.onnx.data").touch()  # a side file is no reason to skip the cache
    for ok in (False, True):
        report = types.SimpleNamespace(ok=ok, summary=lambda: "max error 0.5")
        monkeypatch.setattr(fastdiff.export.validate, "validate_export", lambda *a, r=report: r)
        res = CliRunner().invoke(main, ["export", "onnx", "--out", str(tmp_path)])
        assert (res.exit_code != 0) == (not ok) and len(remembered) == int(ok), res.output


def test_cli_export_replaces_only_its_own_earlier_export(tmp_path, monkeypatch):
    """A file already at --out/denoiser-<kind>-<dtype>.onnx is replaced by a re-export of the
    same networks and settings, never another model's graph or a file that is no export."""
    from click.testing import CliRunner

    import fastdiff.export
    from fastdiff.cli.main import main
    from fastdiff.export.onnx_export import denoiser_hash
    from fastdiff.runs.loading import load_diffusion_model

    exported = []
    monkeypatch.setattr(fastdiff.export, "export_onnx", lambda *a, **k: exported.append(a[1]) or 1 / 0)
    target = tmp_path / "denoiser-none-fp32.onnx"  # the bundled model, no guidance, fp32
    args = ["export", "onnx", "--out", str(tmp_path), "--no-validate"]
    for content in ("other", "not onnx"):
        if content == "other":
            _fake_export(target, DenoiserSignature(True, False, False), digest="1" * 64)
        else:
            target.write_text(content)
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and res.output == (
            f"Error: {target} holds another export (other networks or settings); "
            "choose another --out or delete it\n"
        ), res.output
        assert not exported
    loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device=torch.device("cpu"))
    same = denoiser_hash(loaded.model, None, None, "fp32", fastdiff.export.OnnxExportConfig().opset)
    _fake_export(target, DenoiserSignature(True, False, False), digest=same)
    res = CliRunner().invoke(main, args)
    assert exported == [target] and isinstance(res.exception, ZeroDivisionError)  # got to the export


class _FakeTrt:
    """A stand-in for the tensorrt module with the TensorRT 10 calls build_engine and TrtDenoiser
    make, recording them (TensorRT cannot be installed here); ``parse_ok`` / ``build_ok`` steer the
    failure paths. Its engine has ``profile`` ({input: (min, opt, max)}) and outputs of
    ``output_shape`` after the batch; ``execute(addresses, shapes)`` runs in execute_async_v3."""

    __version__ = "10.0-fake"

    def __init__(self, parse_ok=True, build_ok=True, profile=None, output_shape=(), execute=None):
        self.calls: list = []
        self.addresses: dict = {}
        self.shapes: dict = {}
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
            def __init__(self, data):
                self.data = data

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
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                # TensorRT's header check: a cache another device measured is refused
                fake.calls.append(("set_cache", (cache.data, ignore_mismatch)))
                if cache.data == b"another device's" and not ignore_mismatch:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

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

        class Context:
            def set_input_shape(self, name, shape):
                fake.shapes[name] = shape

            def set_tensor_address(self, name, ptr):
                fake.addresses[name] = ptr

            def execute_async_v3(self, stream):
                fake.calls.append(("execute", stream))
                if execute is not None:
                    execute(fake.addresses, fake.shapes)
                return True

        class Engine:
            def create_execution_context(self):
                return Context()

            def get_tensor_profile_shape(self, name, index):
                return profile[name]

            def get_tensor_shape(self, name):
                return (-1, *output_shape)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.calls.append(("deserialize", data))
                return Engine()

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, Parser, Runtime
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

    (tmp_path / "timing.cache").write_bytes(b"another device's")  # a shared cache folder
    fake.calls.clear()
    build_engine(graph, tmp_path / "e.engine", TrtBuildConfig(max_batch=16), tmp_path / "timing.cache")
    assert [c[1] for c in fake.calls if c[0] == "set_cache"] == [(b"another device's", False), (b"", False)]
    assert (tmp_path / "timing.cache").read_bytes() == b"timing"  # this device's timings from then on

    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: _FakeTrt(parse_ok=False))
    with pytest.raises(ExportError, match="TensorRT cannot parse .*Unsupported op Foo"):
        build_engine(graph, tmp_path / "f.engine", TrtBuildConfig())
    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: _FakeTrt(build_ok=False))
    with pytest.raises(ExportError, match="could not build an engine"):
        build_engine(graph, tmp_path / "f.engine", TrtBuildConfig())
    assert not (tmp_path / "f.engine").exists()


def test_trt_engine_builds_in_the_samplers_dtype(tmp_path, monkeypatch):
    """--engine trt builds its layers in the networks' dtype: fp32 networks an fp32 engine (no
    FP16 flag), fp16 ones an fp16 engine, bf16 ones a bf16 engine, each cached under its own key
    (every build was fp16, so the default --dtype fp32 ran in half precision without a word; and
    --dtype bf16 was refused, where export trt --precision bf16 built one). The onnx engine
    still refuses bf16 networks: its graphs are fp32 or fp16."""
    from builders import diffusion_from_flags

    from fastdiff.diffusion.samplers import SamplingStep, make_rule
    from fastdiff.engines import check_engine
    from fastdiff.engines.sampler import DTYPES
    from fastdiff.export import onnx_runtime, tensorrt_engine
    from fastdiff.export.tensorrt_engine import TrtBuildConfig, profile_shapes, trt_engine
    from fastdiff.models.nn import InDtype

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    graph = read_export(_fake_export(tmp_path / "a.onnx", DenoiserSignature(False, False, False)))
    monkeypatch.setattr(onnx_runtime, "step_graph", lambda step, engine: (graph, None, None))
    monkeypatch.setattr(tensorrt_engine, "gpu_key", lambda device=None: "stand-in sm_90")
    _FakeStreams(monkeypatch, [])
    diffusion = diffusion_from_flags({"image_size": 8, "channel_mult": "1", "timestep_respacing": "ddim4"})
    rule = make_rule(diffusion, "ddim", 0.0, torch.device("cpu"), torch.float32)
    net = torch.nn.Identity()
    flags = {}
    networks = {"fp32": net, "fp16": InDtype(net, torch.float16), "bf16": InDtype(net, torch.bfloat16)}
    for dtype, model in networks.items():
        fake = _FakeTrt(profile=profile_shapes(graph, TrtBuildConfig()), output_shape=(1, 8, 8))
        monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda fake=fake: fake)
        check_engine("trt", torch.device("cuda"), DTYPES[dtype])  # what a Sampler checks first
        trt_engine(SamplingStep(diffusion, model, rule), torch.device("cuda"))
        flags[dtype] = [c[1] for c in fake.calls if c[0] == "flag"]
    assert flags == {"fp32": [], "fp16": ["fp16"], "bf16": ["bf16"]}
    assert len(list((tmp_path / "cache" / "trt").glob("*.engine"))) == 3
    # one timing cache per (TensorRT version, GPU): the engines' folder may be shared by machines
    timing = [p.name for p in (tmp_path / "cache" / "trt").glob("timing*")]
    assert timing == [tensorrt_engine.timing_cache_name("10.0-fake", "stand-in sm_90")]
    assert timing[0] != tensorrt_engine.timing_cache_name("10.0-fake", "other sm_80")
    with pytest.raises(ExportError, match="engine 'onnx' runs fp32 or fp16 graphs"):
        onnx_runtime.step_dtype(SamplingStep(diffusion, networks["bf16"], rule), "onnx")


def test_cli_trt_says_what_the_machine_lacks_before_reading_the_graph(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import fastdiff.export
    from fastdiff.cli.main import main
    from fastdiff.export import tensorrt_engine

    def missing():
        raise ExportError("TensorRT not installed: pip install 'fastdiff[trt]' (tensorrt>=10, CUDA)")

    def no_read(path):
        raise AssertionError("read the graph before checking for TensorRT")

    monkeypatch.setattr(tensorrt_engine, "tensorrt", missing)
    monkeypatch.setattr(fastdiff.export, "read_export", no_read)
    res = CliRunner().invoke(main, ["export", "trt", "--onnx", str(tmp_path / "x.onnx"), "--out", "o"])
    assert res.exit_code == 1 and res.output.startswith("Error: TensorRT not installed: pip install")


def test_cli_trt_checks_out_before_the_build(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fastdiff.cli.main import main
    from fastdiff.export import tensorrt_engine

    def no_build(*args):
        raise AssertionError("built before --out was checked")

    monkeypatch.setattr(tensorrt_engine, "tensorrt", _FakeTrt)
    monkeypatch.setattr(tensorrt_engine, "build_engine", no_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    graph = _fake_export(tmp_path / "a.onnx", DenoiserSignature(True, True, False))
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "engines"
    res = CliRunner().invoke(main, ["export", "trt", "--onnx", str(graph), "--out", str(out)])
    assert res.output == f"Error: cannot write to --out {out}: Not a directory\n"


def test_an_engine_export_trt_built_is_the_one_engine_trt_runs(tmp_path, monkeypatch):
    """``fastdiff export trt`` places its engine where ``--engine trt`` looks (as ``export onnx``
    places its graph), when it is the engine that would build: sampling after the export built
    the same engine again (minutes). An engine with another batch profile is not placed."""
    from builders import diffusion_from_flags
    from click.testing import CliRunner

    from fastdiff.cli.main import main
    from fastdiff.diffusion.samplers import SamplingStep, make_rule
    from fastdiff.export import onnx_runtime, tensorrt_engine
    from fastdiff.export.tensorrt_engine import TrtBuildConfig, profile_shapes, trt_engine
    from fastdiff.models.nn import InDtype

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    graph = read_export(_fake_export(tmp_path / "a.onnx", DenoiserSignature(False, False, False)))
    fake = _FakeTrt(profile=profile_shapes(graph, TrtBuildConfig()), output_shape=(1, 8, 8))
    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt_engine, "gpu_key", lambda device=None: "stand-in sm_90")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _FakeStreams(monkeypatch, fake.calls)
    args = ["export", "trt", "--onnx", str(graph.path), "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, [*args, "--max-batch", "32"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "cache" / "trt").exists()  # not the profile engine 'trt' builds
    res = CliRunner().invoke(main, args)  # fp16, batches 1..8..64
    assert res.exit_code == 0, res.output
    built = [c for c in fake.calls if c[0] == "parse"]
    monkeypatch.setattr(onnx_runtime, "step_graph", lambda step, engine: (graph, None, None))
    diffusion = diffusion_from_flags({"image_size": 8, "channel_mult": "1", "timestep_respacing": "ddim4"})
    rule = make_rule(diffusion, "ddim", 0.0, torch.device("cpu"), torch.float32)
    model = InDtype(torch.nn.Identity(), torch.float16)  # --dtype fp16
    trt_engine(SamplingStep(diffusion, model, rule), torch.device("cuda"))
    assert [c for c in fake.calls if c[0] == "parse"] == built  # loaded, not built again
    (cached,) = (tmp_path / "cache" / "trt").iterdir()
    assert cached.read_bytes() == b"engine-bytes"


# ------------------------------------------------------------------ the cache and the graph's limits


def _add_graph(value: float):
    """An onnx_ir model adding a 1024-float initializer (large enough for a side file)."""
    import onnx_ir
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full(1024, value, np.float32), "w")
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1024]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", io[:1], io[1:], [w])
    # IR 10, not onnx's newest: an older onnxruntime (the GPU image's 1.30) refuses a newer IR
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx_ir.from_proto(model)


def test_a_side_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The weights' side file is written in a temporary folder and renamed into place: a re-export
    killed while writing it leaves the earlier pair loadable (onnx_ir wrote it under its final
    name, so the graph stood beside a truncated side file), and no temporary file is left."""
    ort = pytest.importorskip("onnxruntime")
    import onnx_ir

    from fastdiff.export.onnx_export import save_onnx

    path = tmp_path / "g.onnx"

    def run() -> float:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float(session.run(None, {"x": np.zeros(1024, np.float32)})[0][0])

    save_onnx(_add_graph(1.0), path, external=True)
    assert run() == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    real_save = onnx_ir.save

    def killed(model, target, external_data=None, **kw):
        real_save(model, target, external_data=external_data, **kw)
        with open(Path(target).parent / external_data, "r+b") as f:
            f.truncate(100)  # killed halfway through the side file
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_ir, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_onnx(_add_graph(2.0), path, external=True)
    assert run() == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    monkeypatch.setattr(onnx_ir, "save", real_save)
    save_onnx(_add_graph(2.0), path, external=True)
    assert run() == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    save_onnx(_add_graph(3.0), path)  # in one file now: the earlier side file is not left beside it
    assert run() == 3.0 and [p.name for p in tmp_path.iterdir()] == ["g.onnx"]


def test_cache_takes_no_graph_with_a_smaller_max_batch(tmp_path, monkeypatch):
    """``fastdiff export onnx --max-batch 2`` hashes as the default export (max_batch is only
    metadata): --engine onnx neither finds it through remember nor takes it from the cache."""
    from fastdiff.export import denoiser_hash, onnx_runtime
    from fastdiff.export.onnx_runtime import cache_dir, cached_export, remember

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    net = torch.nn.Linear(2, 2)
    digest = denoiser_hash(net, None, None, "fp32", 18)
    sig = DenoiserSignature(False, False, False)
    small = _fake_export(tmp_path / "small.onnx", sig, digest, **{"fastdiff.max_batch": "2"})
    assert remember(small, digest, 2) is None and not cache_dir().exists()
    exported = []
    monkeypatch.setattr(onnx_runtime, "export_onnx", lambda model, path, **kw: exported.append(path))
    cache_dir().mkdir(parents=True)
    cached = cache_dir() / f"{digest}.onnx"
    cached.write_bytes(small.read_bytes())  # as remember put it there before
    assert cached_export(net) == cached and exported == [cached]
    full = _fake_export(tmp_path / "full.onnx", sig, digest, **{"fastdiff.max_batch": "4096"})
    assert remember(full, digest, 4096) == cached and read_export(cached).max_batch == 4096
    assert cached_export(net) == cached and len(exported) == 1


def test_a_batch_the_graph_cannot_take_is_one_engine_error_line(tmp_path, monkeypatch):
    """The runner's checks run inside the sampling step: the onnx engine turns them into
    EngineError, which the sampling commands print as one line (an ExportError there was a traceback)."""
    from builders import diffusion_from_flags

    from fastdiff.diffusion.samplers import SamplingStep, make_rule
    from fastdiff.engines import EngineError, build_engine
    from fastdiff.export import onnx_runtime
    from fastdiff.export.onnx_runtime import ExportedDenoiser, OnnxStep

    sig = DenoiserSignature(False, False, False)
    denoiser = ExportedDenoiser()
    denoiser.graph = read_export(_fake_export(tmp_path / "a.onnx", sig, **{"fastdiff.max_batch": "2"}))
    diffusion = diffusion_from_flags({"image_size": 8, "channel_mult": "1", "timestep_respacing": "ddim4"})
    rule = make_rule(diffusion, "ddim", 0.0, torch.device("cpu"), torch.float32)
    plain = SamplingStep(diffusion, torch.nn.Identity(), rule)
    monkeypatch.setattr(
        onnx_runtime, "onnx_engine", lambda step, device: OnnxStep(step, denoiser, None, None)
    )
    step = build_engine("onnx", plain, torch.device("cpu"))
    x = torch.zeros(3, 1, 8, 8)
    with pytest.raises(EngineError, match=r"^batch 3 is above the exported graph's maximum 2$"):
        step(x, torch.tensor([3, 3, 3]), None, rule.init_state(x))


def test_a_batch_above_the_engines_range_is_one_line_before_the_export(tmp_path, monkeypatch):
    """A batch above what the onnx engine exports for failed at the first step, after the export
    (minutes at full size): the Sampler and ``fastdiff sample`` now say so before it."""
    from builders import build_unet, make_diffusion
    from click.testing import CliRunner

    import fastdiff
    from fastdiff.cli.main import main
    from fastdiff.engines import EngineError
    from fastdiff.export import onnx_runtime

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_runtime, "export_onnx", None)  # exporting would raise a TypeError
    limit = OnnxExportConfig.max_batch
    net = build_unet(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions=""
    )
    sampler = fastdiff.Sampler(net, make_diffusion("ddim2", steps=20), engine="onnx")
    message = f"engine 'onnx' takes batches of at most {limit} (its graph's range), got {limit + 1}"
    with pytest.raises(EngineError, match=rf"^{re.escape(message)}$"):
        sampler(num_samples=limit + 1)
    args = ["sample", "--engine", "onnx", "--batch-size", str(limit + 1), "--num-samples", str(limit + 1)]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and res.output == f"Error: {message}\n"
    # fastdiff upsample: its batch is also bounded by the low-res file's count, read from its header
    np.savez(tmp_path / "low.npz", np.zeros((limit + 1, 4, 4, 3), np.uint8))
    args = ["upsample", "--preset", "upsampler64-256", "--checkpoint", str(tmp_path / "none.pt")]
    args += ["--engine", "onnx", "--low-res", str(tmp_path / "low.npz"), "--batch-size", str(limit + 1)]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and res.output == f"Error: {message}\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ an upsampler's low_res


def _upsampler_graph(path):
    """A hand-built upsampler-like graph: model_output = x_t + bilinear Resize(low_res) 4x4 -> 8x8
    (half-pixel, F.interpolate's align_corners=False), with an upsampler's fastdiff metadata."""
    from onnx import TensorProto, helper

    sig = DenoiserSignature(False, False, False, superres=True)
    shapes = {"x_t": ["batch", 1, 8, 8], "timestep": ["batch"], "low_res": ["batch", 1, 4, 4]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    outputs = [helper.make_tensor_value_info("model_output", TensorProto.FLOAT, ["batch", 1, 8, 8])]
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    nodes = [
        helper.make_node(
            "Resize", ["low_res", "", "scales"], ["up"], mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Add", ["x_t", "up"], ["model_output"]),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, "sr", inputs, outputs, initializer=[scales])
    return _fake_export(path, sig, graph=graph)


def test_upsampler_metadata_reads_back_and_is_checked(tmp_path):
    graph = read_export(_upsampler_graph(tmp_path / "sr.onnx"))
    assert graph.kind == "superres" and graph.low_res_shape == (1, 4, 4)
    assert graph.input_shapes() == {"x_t": (1, 8, 8), "timestep": (), "low_res": (1, 4, 4)}
    with pytest.raises(ExportError, match=r"is an upsampler's graph \(it takes low_res\)"):
        check_export(graph, want_superres=False)
    base = read_export(_fake_export(tmp_path / "base.onnx", DenoiserSignature(True, False, False)))
    assert base.kind == "base" and base.low_res_shape is None
    with pytest.raises(ExportError, match="is a base model's graph .no low_res input."):
        check_export(base, want_superres=True)
    # the kind and the low-res shape must agree with the inputs
    sig = DenoiserSignature(False, False, False, superres=True)
    for meta in ({"fastdiff.low_res_shape": "null"}, {"fastdiff.kind": "base"}, {"fastdiff.kind": "x"}):
        path = _fake_export(tmp_path / "bad.onnx", sig, **meta)
        with pytest.raises(ExportError, match="incomplete or damaged|do not match"):
            read_export(path)


def test_graph_shapes_refuse_what_an_upsampler_graph_cannot_hold():
    from builders import build_superres, build_unet

    from fastdiff.export.onnx_export import graph_shapes

    with torch.device("meta"):
        sr = build_superres(large_size=16, small_size=8, num_channels=32, num_res_blocks=1, channel_mult="1")
        base = build_unet(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1")
    assert graph_shapes(sr, (3, 8, 8)) == ((3, 16, 16), (3, 8, 8))
    assert graph_shapes(base) == ((3, 8, 8), None)
    with pytest.raises(ExportError, match="exports with its low_res shape"):
        graph_shapes(sr)
    with pytest.raises(ExportError, match=r"takes \[C, H, W\] with C = 3"):
        graph_shapes(sr, (1, 8, 8))
    with pytest.raises(ExportError, match="export without guidance"):
        graph_shapes(sr, (3, 8, 8), classifier=base)
    with pytest.raises(ExportError, match="export without guidance"):
        graph_shapes(sr, (3, 8, 8), null_label=4)
    with pytest.raises(ExportError, match="not a super-resolution model"):
        graph_shapes(base, (3, 8, 8))


def test_onnxruntime_binds_low_res_and_checks_its_shape(tmp_path):
    pytest.importorskip("onnxruntime")
    from fastdiff.export.onnx_runtime import OrtDenoiser

    graph = read_export(_upsampler_graph(tmp_path / "sr.onnx"))
    session = OrtDenoiser(graph)
    x, t, low = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 5.0, 9.0]), torch.rand(3, 1, 4, 4) * 2 - 1
    out, grad = session(x, t, low_res=low)
    assert grad is None
    torch.testing.assert_close(out, x + F.interpolate(low, (8, 8), mode="bilinear"), rtol=1e-6, atol=1e-6)
    with pytest.raises(ExportError, match=r"^low_res of shape \[3, 1, 8, 8\]: .* takes \[3, 1, 4, 4\]"):
        session(x, t, low_res=torch.zeros(3, 1, 8, 8))
    with pytest.raises(ExportError, match=r"is an upsampler's graph \(it takes low_res\)"):
        session(x, t)
    with pytest.raises(ExportError, match=r"^x_t of shape \[3, 1, 16, 16\]"):
        session(torch.zeros(3, 1, 16, 16), t, low_res=low)
    base = OrtDenoiser.__new__(OrtDenoiser)  # the checks run before any session call
    base.graph = read_export(_fake_export(tmp_path / "base.onnx", DenoiserSignature(False, False, False)))
    base.device = torch.device("cpu")
    with pytest.raises(ExportError, match="is a base model's graph"):
        base.inputs(x, t, low_res=low)


def test_onnxruntime_waits_for_the_bound_inputs_before_it_runs(tmp_path):
    """onnxruntime's CUDA provider runs on a non-blocking stream of its own, which does not wait
    for the work on torch's stream that wrote the bound inputs: the binding synchronises its inputs
    (IOBinding.synchronize_inputs, which onnxruntime documents for memory written on another
    stream) before every run; without it the session could read a half-written x_t."""
    pytest.importorskip("onnxruntime")
    from fastdiff.export.onnx_runtime import OrtDenoiser

    runner = OrtDenoiser(read_export(_upsampler_graph(tmp_path / "sr.onnx")))
    calls = []

    class Binding:
        def __init__(self, io):
            self.io = io

        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(self.io, name)(*args)

            return call

    session = runner.session

    class Session:
        def io_binding(self):
            return Binding(session.io_binding())

        def run_with_iobinding(self, binding):
            calls.append("run")
            session.run_with_iobinding(binding.io)

    runner.session = Session()
    x, t, low = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 5.0]), torch.rand(2, 1, 4, 4) * 2 - 1
    for _ in range(2):
        calls.clear()
        out, _ = runner(x, t, low_res=low)
        assert calls == ["bind_input"] * 3 + ["bind_output", "synchronize_inputs", "run"]
    torch.testing.assert_close(out, x + F.interpolate(low, (8, 8), mode="bilinear"), rtol=1e-6, atol=1e-6)


def test_onnx_step_hands_low_res_to_the_graph():
    """OnnxStep around a stand-in denoiser (the eager upsampler behind the runners' call) steps as
    SamplingStep: low_res comes from the step's model_kwargs, the labels with it."""
    from builders import diffusion_from_flags
    from test_upsample import SR_FLAGS, _upsampler

    from fastdiff.diffusion.samplers import SamplingStep, make_rule
    from fastdiff.export.onnx_runtime import OnnxStep

    model = _upsampler()
    diffusion = diffusion_from_flags({**SR_FLAGS, "timestep_respacing": "ddim4"})
    rule = make_rule(diffusion, "ddim", 0.0, torch.device("cpu"), torch.float32)
    kwargs = {"low_res": torch.rand(2, 3, 8, 8) * 2 - 1, "y": torch.tensor([1, 3])}
    step = SamplingStep(diffusion, model, rule, model_kwargs=kwargs)
    calls = []

    def denoiser(x, t_model, labels, classifier_scale, cfg_scale, *, low_res):
        calls.append(low_res)
        return model(x, t_model, low_res=low_res, y=labels), None

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3])
    with torch.no_grad():
        want = step(x, t, None, rule.init_state(x))
        got = OnnxStep(step, denoiser, None, None)(x, t, None, rule.init_state(x))
    assert calls and calls[0] is kwargs["low_res"]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_an_upsampler_step_without_low_res_is_one_line():
    from builders import diffusion_from_flags
    from test_upsample import SR_FLAGS, _upsampler

    from fastdiff.diffusion.samplers import SamplingStep, make_rule
    from fastdiff.export.onnx_runtime import step_graph

    diffusion = diffusion_from_flags({**SR_FLAGS, "timestep_respacing": "ddim4"})
    rule = make_rule(diffusion, "ddim", 0.0, torch.device("cpu"), torch.float32)
    step = SamplingStep(diffusion, _upsampler(), rule, model_kwargs={"y": torch.tensor([0])})
    with pytest.raises(ExportError, match=r"pass model_kwargs=\{'low_res': \.\.\.\}"):
        step_graph(step, "onnx")


class _FakeStreams:
    """Stand-ins for torch.cuda's streams and current device on a machine without CUDA: torch's
    current stream is the default one (handle 0, as in a plain process); ``Stream()`` makes
    others (handles 1, 2, ...). Each ``wait_stream`` is recorded in ``calls`` (shared with a
    _FakeTrt's); ``current_device()`` is the device of the innermost ``torch.cuda.device`` block
    ("cuda:0" outside any)."""

    def __init__(self, monkeypatch, calls: list):
        import contextlib

        streams = self
        self.devices = ["cuda:0"]

        @contextlib.contextmanager
        def device(dev):
            self.devices.append(str(dev))
            try:
                yield
            finally:
                self.devices.pop()

        monkeypatch.setattr(torch.cuda, "device", device)

        class Stream:
            def __init__(self, device=None, handle=None):
                self.cuda_stream = len(streams.made) + 1 if handle is None else handle
                if handle is None:
                    streams.made.append(self)

            def wait_stream(self, other):
                calls.append(("wait", self.cuda_stream, other.cuda_stream))

        self.made: list = []
        self.default = Stream(handle=0)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.default)


def test_tensorrt_runner_binds_low_res_with_a_stand_in_engine(tmp_path, monkeypatch):
    """TrtDenoiser's TensorRT 10 runtime calls (deserialize, profile, set_input_shape,
    set_tensor_address, execute_async_v3) on the stand-in, which reads the bound input memory."""
    import ctypes

    from fastdiff.export import tensorrt_engine
    from fastdiff.export.tensorrt_engine import TrtBuildConfig, TrtDenoiser, build_engine, profile_shapes

    graph = read_export(_upsampler_graph(tmp_path / "sr.onnx"))
    config = TrtBuildConfig(max_batch=16)
    profile = profile_shapes(graph, config)
    assert profile["low_res"] == ((1, 1, 4, 4), (8, 1, 4, 4), (16, 1, 4, 4)) and "labels" not in profile
    seen = {}

    def execute(addresses, shapes):
        def read(name):
            n = int(np.prod(shapes[name]))
            return np.frombuffer(ctypes.string_at(addresses[name], 4 * n), np.float32).reshape(shapes[name])

        seen["low_res"] = read("low_res").copy()
        ctypes.memmove(addresses["model_output"], addresses["x_t"], read("x_t").nbytes)

    fake = _FakeTrt(profile=profile, output_shape=(1, 8, 8), execute=execute)
    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: fake)
    _FakeStreams(monkeypatch, fake.calls)
    engine = build_engine(graph, tmp_path / "e.engine", config)
    assert dict(fake.calls)["profile"]["low_res"] == profile["low_res"]
    runner = TrtDenoiser(graph, engine, torch.device("cpu"))
    x, t, low = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.rand(2, 1, 4, 4)
    out, grad = runner(x, t, low_res=low)
    assert ("execute", 1) in fake.calls and fake.shapes["low_res"] == (2, 1, 4, 4)
    assert np.array_equal(seen["low_res"], low.numpy()) and torch.equal(out, x) and grad is None
    with pytest.raises(ExportError, match=r"^low_res of shape \[2, 1, 2, 2\]"):
        runner(x, t, low_res=torch.zeros(2, 1, 2, 2))
    with pytest.raises(ExportError, match="outside the engine profile 1..16"):
        runner(torch.zeros(17, 1, 8, 8), torch.zeros(17), low_res=torch.zeros(17, 1, 4, 4))


def test_tensorrt_runs_on_a_stream_of_its_own_after_torchs_and_before_it(tmp_path, monkeypatch):
    """execute_async_v3 got torch's current stream, the default one in a plain fastdiff process,
    which TensorRT's API documents as costing extra device synchronisations ("use non-default
    stream instead"): the runner enqueues on its own stream, after the work that wrote its inputs
    on torch's stream and before the work that reads its outputs there, every call."""
    from fastdiff.export import tensorrt_engine
    from fastdiff.export.tensorrt_engine import TrtBuildConfig, TrtDenoiser, profile_shapes

    graph = read_export(_fake_export(tmp_path / "a.onnx", DenoiserSignature(False, False, False)))
    fake = _FakeTrt(profile=profile_shapes(graph, TrtBuildConfig()), output_shape=(1, 8, 8))
    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: fake)
    streams = _FakeStreams(monkeypatch, fake.calls)
    (tmp_path / "e.engine").write_bytes(b"engine-bytes")
    runner = TrtDenoiser(graph, tmp_path / "e.engine", torch.device("cpu"))
    for _ in range(2):
        fake.calls.clear()
        runner(torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 2.0]))
        assert fake.calls == [("wait", 1, 0), ("execute", 1), ("wait", 0, 1)]
    assert len(streams.made) == 1  # one stream for the runner, not one per call


def test_tensorrt_builds_loads_and_runs_on_the_samplers_gpu(tmp_path, monkeypatch):
    """TensorRT builds for, deserializes on and enqueues on the current CUDA device: a Sampler on
    cuda:1 (a current device of cuda:0, as a Python caller leaves it) had its engine built and
    deserialized on cuda:0 and then run with cuda:1's tensors."""
    from builders import diffusion_from_flags

    from fastdiff.diffusion.samplers import SamplingStep, make_rule
    from fastdiff.export import onnx_runtime, tensorrt_engine
    from fastdiff.export.tensorrt_engine import TrtBuildConfig, profile_shapes, trt_engine

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    graph = read_export(_fake_export(tmp_path / "a.onnx", DenoiserSignature(False, False, False)))
    monkeypatch.setattr(onnx_runtime, "step_graph", lambda step, engine: (graph, None, None))
    monkeypatch.setattr(tensorrt_engine, "gpu_key", lambda device=None: "stand-in sm_90")
    seen = []
    fake = _FakeTrt(
        profile=profile_shapes(graph, TrtBuildConfig()),
        output_shape=(1, 8, 8),
        execute=lambda addresses, shapes: seen.append(("execute", streams.devices[-1])),
    )
    builder, runtime = fake.Builder, fake.Runtime

    class Builder(builder):
        def build_serialized_network(self, network, config):
            seen.append(("build", streams.devices[-1]))
            return super().build_serialized_network(network, config)

    class Runtime(runtime):
        def deserialize_cuda_engine(self, data):
            seen.append(("deserialize", streams.devices[-1]))
            return super().deserialize_cuda_engine(data)

    fake.Builder, fake.Runtime = Builder, Runtime
    monkeypatch.setattr(tensorrt_engine, "tensorrt", lambda: fake)
    streams = _FakeStreams(monkeypatch, fake.calls)
    diffusion = diffusion_from_flags({"image_size": 8, "channel_mult": "1", "timestep_respacing": "ddim4"})
    rule = make_rule(diffusion, "ddim", 0.0, torch.device("cpu"), torch.float32)
    step = trt_engine(SamplingStep(diffusion, torch.nn.Identity(), rule), torch.device("cuda:1"))
    inputs = {"x_t": torch.zeros(2, 1, 8, 8), "timestep": torch.tensor([1.0, 2.0])}
    step.denoiser._run(inputs, {"model_output": torch.empty(2, 1, 8, 8)})  # host memory: no CUDA here
    assert seen == [("build", "cuda:1"), ("deserialize", "cuda:1"), ("execute", "cuda:1")]


def test_cli_export_refuses_guidance_for_upsamplers_before_loading(tmp_path):
    from click.testing import CliRunner

    from fastdiff.cli.main import main

    base = ["export", "onnx", "--preset", "upsampler64-256", "--checkpoint", str(tmp_path / "absent.pt")]
    for extra, option in ((["--cfg"], "--cfg"), (["--classifier", "bundled"], "--classifier")):
        res = CliRunner().invoke(main, [*base, *extra, "--out", str(tmp_path / "out")])
        assert res.exit_code == 1 and f"{option}: upsamplers export without guidance" in res.output
        assert "Traceback" not in res.output
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "checkpoint not found" in res.output  # loaded as an upsampler
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ polygraphy's inspection


def _typed_classifier_graph(path, labels=None, batch="batch", out_channels=2):
    """A hand-built classifier-guided graph with typed inputs and outputs: model_output = x_t
    repeated ``out_channels`` times, gradient = classifier_scale * x_t; ``labels`` its ONNX type
    (int64 unless given), ``batch`` x_t's first dimension."""
    from onnx import TensorProto, helper

    sig = DenoiserSignature(True, True, False)
    types = {
        "x_t": (TensorProto.FLOAT, [batch, 1, 8, 8]),
        "timestep": (TensorProto.FLOAT, ["batch"]),
        "labels": (labels or TensorProto.INT64, ["batch"]),
        "classifier_scale": (TensorProto.FLOAT, []),
    }
    inputs = [helper.make_tensor_value_info(n, *types[n]) for n in sig.inputs]
    outputs = [
        helper.make_tensor_value_info("model_output", TensorProto.FLOAT, ["batch", out_channels, 8, 8]),
        helper.make_tensor_value_info("gradient", TensorProto.FLOAT, ["batch", 1, 8, 8]),
    ]
    nodes = [
        helper.make_node("Concat", ["x_t"] * out_channels, ["model_output"], axis=1),
        helper.make_node("Mul", ["x_t", "classifier_scale"], ["gradient"]),
    ]
    return _fake_export(path, sig, graph=helper.make_graph(nodes, "g", inputs, outputs))


def test_polygraphy_reads_the_graph_as_its_metadata_says(tmp_path):
    pytest.importorskip("polygraphy")
    from fastdiff.export.validate import inspect_export

    found = inspect_export(read_export(_typed_classifier_graph(tmp_path / "g.onnx")))
    assert found.problems == [] and found.opset == 18 and found.nodes == 2
    assert found.inputs["labels"] == {"dtype": "int64", "shape": ["batch"]}
    assert found.inputs["classifier_scale"] == {"dtype": "float32", "shape": []}
    assert found.outputs["model_output"]["shape"] == ["batch", 2, 8, 8]
    sr = inspect_export(read_export(_upsampler_graph(tmp_path / "sr.onnx")))
    assert sr.problems == [] and sr.inputs["low_res"]["shape"] == ["batch", 1, 4, 4]


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"labels": onnx.TensorProto.FLOAT}, "labels is float32, fastdiff feeds/reads int64"),
        ({"batch": 4}, "x_t's batch dimension is 4, not dynamic"),
        (
            {"out_channels": 3},
            r"model_output has shape \['batch', 3, 8, 8\], metadata \[batch, 1, 8, 8\] or \[batch, 2, 8, 8\]",
        ),
    ],
)
def test_polygraphy_finds_what_differs_from_the_metadata(tmp_path, change, problem):
    pytest.importorskip("polygraphy")
    from fastdiff.export.validate import ValidationReport, inspect_export

    found = inspect_export(read_export(_typed_classifier_graph(tmp_path / "g.onnx", **change)))
    assert any(re.fullmatch(problem, p) for p in found.problems), found.problems
    report = ValidationReport(errors={"model_output@1": 0.0}, inspection=found)
    assert not report.ok and "polygraphy: " in report.summary()


def test_without_polygraphy_validation_says_so_in_one_line(tmp_path, monkeypatch):
    import sys

    from fastdiff.export.validate import ValidationReport, inspect_export, polygraphy_available

    monkeypatch.setitem(sys.modules, "polygraphy", None)  # as if not installed
    assert not polygraphy_available()
    with pytest.raises(ExportError, match=r"^polygraphy is not installed \(pip install polygraphy"):
        inspect_export(read_export(_typed_classifier_graph(tmp_path / "g.onnx")))
    report = ValidationReport(errors={"model_output@1": 0.0})
    assert report.ok and report.summary().endswith("polygraphy inspection skipped (not installed) (ok)")


def _side_file_export(path: Path, digest: str) -> Path:
    """A fake export of a 1024-float weight written with its side file, as export_onnx writes the
    large presets (``w`` added to x_t in each output, so onnxruntime must read the side file)."""
    import onnx_ir
    from onnx import TensorProto, helper, numpy_helper

    from fastdiff.export.onnx_export import save_onnx

    sig = DenoiserSignature(False, False, False)
    w = numpy_helper.from_array(np.full(1024, 1.0, np.float32), "w")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in sig.inputs]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in sig.outputs]
    nodes = [helper.make_node("Add", ["x_t", "w"], [n]) for n in sig.outputs]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w])
    path.parent.mkdir(parents=True, exist_ok=True)
    _fake_export(path, sig, digest, graph=graph, **{"fastdiff.max_batch": "4096"})
    save_onnx(onnx_ir.from_proto(onnx.load(str(path))), path, external=True)
    assert (path.parent / f"{path.name}.data").stat().st_size >= 4096
    return path


def test_a_graph_with_a_side_file_is_cached_with_it_and_checked_whole(tmp_path, monkeypatch):
    """``fastdiff export onnx``'s side-file graph goes into the cache with its side file (it was not
    linked, so --engine onnx exported again), loads there in onnxruntime, and a cached graph whose
    side file is missing or truncated is exported again (onnxruntime failed with a traceback)."""
    ort = pytest.importorskip("onnxruntime")
    from fastdiff.export import denoiser_hash, onnx_runtime
    from fastdiff.export.onnx_runtime import cache_dir, cached_export, remember

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    net = torch.nn.Linear(2, 2)
    digest = denoiser_hash(net, None, None, "fp32", 18)
    made = _side_file_export(tmp_path / "out" / "denoiser-none-fp32.onnx", digest)
    cached = remember(made, digest, 4096)
    assert cached == cache_dir() / f"{digest}.onnx"
    assert sorted(p.name for p in cache_dir().iterdir()) == [cached.name, f"{cached.name}.data"]
    exported = []

    def export(model, path, **kw):
        exported.append(path)
        _side_file_export(path, digest)

    monkeypatch.setattr(onnx_runtime, "export_onnx", export)
    assert cached_export(net) == cached and exported == []
    session = ort.InferenceSession(str(cached), providers=["CPUExecutionProvider"])
    feed = {"x_t": np.zeros(1024, np.float32), "timestep": np.zeros(1, np.float32)}
    assert session.run(None, feed)[0][0] == 1.0
    side = cache_dir() / f"{cached.name}.data"

    def truncate():  # a new file: the cache's side file is a hard link to the export's
        head = side.read_bytes()[:100]
        side.unlink()
        side.write_bytes(head)

    for damage in (truncate, side.unlink):
        damage()
        state = "truncated" if side.exists() else "missing"
        with pytest.raises(ExportError, match=rf"^{re.escape(str(cached))}: .* is {state}; re-export it"):
            read_export(cached)
        assert cached_export(net) == cached and exported == [cached]
        exported.clear()
        assert read_export(cached).hash == digest  # whole again
    assert read_export(made).hash == digest  # the export's own pair is untouched by the cache's


def test_cli_export_holds_its_out_folder_and_clears_its_killed_temporaries(tmp_path, monkeypatch):
    """fastdiff export onnx locks --out (the folder itself: --out . leaves no .lock among the
    user's files) so a second export into it is one line before writing, and removes what a
    killed export of its file left (a side-file export's temporary folder), nothing else's."""
    import types

    from click.testing import CliRunner

    import fastdiff.export
    import fastdiff.export.onnx_runtime
    from fastdiff.cli.main import main
    from fastdiff.files import locked_folder

    out = tmp_path / "shared"
    killed = out / ".denoiser-none-fp32.onnx.abcd1234"
    killed.mkdir(parents=True)
    (killed / "denoiser-none-fp32.onnx.data").write_bytes(b"half")
    others = [out / "notes.txt", out / ".grid.png.abcd1234.png"]  # the user's, another writer's
    for p in others:
        p.write_bytes(b"")
    written = types.SimpleNamespace(path=out / "g.onnx", hash="0" * 64, bytes=10, node_counts={})
    calls = []
    monkeypatch.setattr(fastdiff.export, "export_onnx", lambda *a, **k: calls.append(a) or written)
    monkeypatch.setattr(fastdiff.export.onnx_runtime, "remember", lambda *a: None)
    args = ["export", "onnx", "--no-validate", "--out", str(out)]
    with locked_folder(out):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and not calls and killed.exists()
    assert (
        res.output
        == f"Error: {out} is in use by another fastdiff process; wait for it or choose another --out\n"
    )
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and len(calls) == 1, res.output
    assert sorted(out.iterdir()) == sorted(others)


def test_cached_export_clears_a_killed_export_of_its_graph(tmp_path, monkeypatch):
    """A killed side-file export into the cache leaves its temporary folder; the next export of
    that graph removes it (it stayed for good), not another graph's (an export may be writing it)."""
    from fastdiff.export import denoiser_hash, onnx_runtime
    from fastdiff.export.onnx_runtime import cache_dir, cached_export
    from fastdiff.files import temp_folder

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    net = torch.nn.Linear(2, 2)
    digest = denoiser_hash(net, None, None, "fp32", 18)
    killed, other = temp_folder(cache_dir() / f"{digest}.onnx"), temp_folder(cache_dir() / "other.onnx")
    monkeypatch.setattr(
        onnx_runtime, "export_onnx", lambda model, path, **kw: _side_file_export(path, digest)
    )
    assert cached_export(net) == cache_dir() / f"{digest}.onnx"
    assert not killed.exists() and other.exists()


def test_stored_tensors_walks_subgraphs_attributes_and_functions():
    """Every tensor whose bytes a side file may hold, found without onnx's private walker (which a
    release may rename): initializers, attribute tensors, subgraphs' and functions' ones."""
    from onnx import TensorProto, helper

    from fastdiff.export.onnx_export import stored_tensors

    def tensor(name):
        return helper.make_tensor(name, TensorProto.FLOAT, [1], [1.0])

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["y"])], "b", [], [out], [tensor("b")])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=tensor("const")),
        helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(nodes, "g", [], [out], [tensor("w")])
    function = helper.make_function(
        "local", "f", [], ["z"], [helper.make_node("Constant", [], ["z"], value=tensor("in_f"))], []
    )
    model = helper.make_model(graph, functions=[function])
    assert sorted(t.name for t in stored_tensors(model)) == ["b", "b", "const", "in_f", "w"]
