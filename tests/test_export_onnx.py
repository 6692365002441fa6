"""A real export (slow: tracing and translating take minutes on a loaded 2-core machine): a tiny
classifier-guided UNet to ONNX, onnxruntime against PyTorch and torch.autograd.grad, and
``--engine onnx`` against eager sampling; a tiny upsampler through ``fastdiff export onnx`` and
``fastdiff upsample --engine onnx``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from builders import diffusion_from_flags  # noqa: E402

from fastdiff.compat.unet import EncoderUNetModel, UNetModel  # noqa: E402 (the original arguments)
from fastdiff.export import ExportError, check_export, read_export  # noqa: E402

pytestmark = pytest.mark.slow


def _tiny():
    torch.manual_seed(0)
    unet = UNetModel(8, 1, 32, 2, 1, (1,), channel_mult=(1,), num_classes=3, num_head_channels=32,
                     use_scale_shift_norm=True)  # fmt: skip
    clf = EncoderUNetModel(8, 1, 32, 3, 1, (2,), channel_mult=(1, 2), num_head_channels=32,
                           use_scale_shift_norm=True, resblock_updown=True, pool="attention")  # fmt: skip
    for net in (unet, clf):
        for p in net.parameters():
            p.data.normal_(0, 0.2)
        net.eval().requires_grad_(False)
    return unet, clf


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fastdiff.export import OnnxExportConfig
    from fastdiff.export.onnx_runtime import cached_export

    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTDIFF_CACHE", str(cache))
    unet, clf = _tiny()
    path = cached_export(unet, clf, None, OnnxExportConfig(optimize=False))
    yield unet, clf, path
    mp.undo()


def test_graph_matches_pytorch_and_autograd(exported):
    import onnx

    from fastdiff.export.validate import validate_export

    unet, clf, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)  # full shape inference
    ops = {n.op_type for n in model.graph.node}
    assert {"ConvTranspose", "MatMul", "Softmax", "InstanceNormalization"} <= ops
    report = validate_export(path, unet, clf, batches=(1, 3))
    assert report.ok, report.errors
    assert set(report.errors) == {"model_output@1", "gradient@1", "model_output@3", "gradient@3"}
    if report.inspection is not None:  # polygraphy installed: it reads the I/O as the metadata says
        assert report.inspection.problems == []
        assert report.inspection.outputs["gradient"] == {"dtype": "float32", "shape": ["batch", 1, 8, 8]}


def test_polygraphy_onnxrt_runner_matches_pytorch(exported):
    """polygraphy's own onnxruntime backend runs the file (feeds by name, numpy) as PyTorch
    computes: a second runner path next to fastdiff's io-binding one."""
    pytest.importorskip("polygraphy")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from fastdiff.export.graph import example_inputs
    from fastdiff.export.validate import reference_outputs

    unet, clf, path = exported
    graph = read_export(path)
    named = dict(zip(graph.signature.inputs, example_inputs(graph.signature, graph.image_shape, 2, seed=3)))
    with OnnxrtRunner(SessionFromOnnx(str(path))) as runner:
        got = runner.infer({k: v.numpy() for k, v in named.items()})
    refs = reference_outputs(graph, named, unet, clf)
    for name, ref in refs.items():
        err = np.abs(got[name] - ref.numpy()).max() / np.abs(ref.numpy()).max()
        assert err <= 1e-4, (name, err)


def test_other_weights_are_refused(exported):
    unet, clf, path = exported
    other = _tiny()[0]
    other.out[2].bias.data += 1
    with pytest.raises(ExportError, match="another model"):
        check_export(read_export(path), model=other, classifier=clf)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++2m"])  # dpm++2m: state across steps
def test_engine_onnx_matches_eager(exported, sampler, monkeypatch):
    import fastdiff

    unet, clf, path = exported
    monkeypatch.setenv("FASTDIFF_CACHE", str(path.parents[1]))
    flags = {"diffusion_steps": 1000, "noise_schedule": "cosine", "learn_sigma": True,
             "timestep_respacing": "5" if sampler == "ddpm" else "ddim5"}  # fmt: skip
    diffusion = diffusion_from_flags(flags)
    images = {}
    for engine in ("eager", "onnx"):
        s = fastdiff.Sampler(unet, diffusion, sampler=sampler, classifier=clf, classifier_scale=2.0,
                             engine=engine, image_shape=(1, 8, 8))  # fmt: skip
        images[engine] = s([0, 1, 2], generator=torch.Generator().manual_seed(1))
    to8 = [((x + 1) * 127.5).clamp(0, 255).round() for x in (images["eager"], images["onnx"])]
    diff = (to8[0] - to8[1]).abs()
    assert diff.max() <= 3 and diff.mean() < 0.1


def test_weights_in_a_side_file_check_inspect_and_validate(tmp_path, monkeypatch):
    """Above the size limit the weights go to ``<name>.data`` (protobuf's 2 GiB limit on one
    message; the full-size presets from imagenet128 up); the checker (by path), polygraphy (the
    structure only) and onnxruntime read the pair. The limit is lowered so a tiny model takes
    that path."""
    import onnx

    from fastdiff.export import OnnxExportConfig, export_onnx, onnx_export, onnx_runtime
    from fastdiff.export.validate import validate_export

    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", 0)
    unet, _ = _tiny()
    res = export_onnx(unet, tmp_path / "d.onnx", config=OnnxExportConfig(optimize=False))
    weights = sum(p.numel() * 4 for p in unet.parameters())
    side = (tmp_path / "d.onnx.data").stat().st_size  # all but the smallest tensors (kept inline)
    assert side > 0.95 * weights and side > res.bytes
    onnx.checker.check_model(str(res.path), full_check=True)
    report = validate_export(res.path, unet, batches=(1,))
    assert report.ok, report.summary()
    # fastdiff export onnx puts the pair where --engine onnx finds it, which then exports nothing
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_runtime, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    cached = onnx_runtime.remember(res.path, res.hash, 4096)
    assert (
        onnx_runtime.cached_export(unet) == cached
        and (tmp_path / "cache/onnx" / f"{res.hash}.onnx.data").is_file()
    )
    assert validate_export(cached, unet, batches=(1,)).ok


def test_an_opset_the_exporter_did_not_write_is_refused_not_written(tmp_path, monkeypatch):
    """torch.onnx converts down from 18 and, where it cannot (ADM's Split), keeps 18 silently:
    the file's metadata said 17 and validation failed after the file was written."""
    from fastdiff.export import OnnxExportConfig, export_onnx, onnx_export

    monkeypatch.setattr(onnx_export, "MIN_OPSET", 17)  # the old floor
    unet, _ = _tiny()
    with pytest.raises(
        ExportError, match="^opset 17: torch.onnx could not convert this graph and wrote opset 18$"
    ):
        export_onnx(unet, tmp_path / "d.onnx", config=OnnxExportConfig(opset=17, optimize=False))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ an upsampler (ADM-U)


@pytest.fixture(scope="module")
def exported_upsampler(tmp_path_factory):
    """A tiny random upsampler (16x16 from 8x8, class-conditional, its torso in fp16 as the
    upsampler presets' use_fp16) exported once by ``fastdiff export onnx`` from a safetensors
    carrying its flags."""
    from click.testing import CliRunner
    from test_upsample import SR_FLAGS, _low_res, _upsampler

    from fastdiff.cli.main import main
    from fastdiff.models.checkpoint import save_weights

    d = tmp_path_factory.mktemp("sr")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTDIFF_CACHE", str(d / "cache"))
    model = _upsampler()
    model.convert_to_fp16()
    save_weights(model, d / "sr.safetensors", {"flags": {**SR_FLAGS, "use_fp16": True}})
    np.savez(d / "low.npz", _low_res(5), np.array([0, 1, 2, 3, 1]))
    r = CliRunner().invoke(
        main, ["export", "onnx", "--checkpoint", str(d / "sr.safetensors"), "--out", str(d)]
    )
    assert r.exit_code == 0, r.output
    assert "(ok)" in r.output  # validated against the fp32 form the graph computes
    yield model, d, d / "denoiser-superres-fp32.onnx"
    mp.undo()


def test_upsampler_graph_takes_low_res_and_matches_pytorch(exported_upsampler):
    import onnx

    from fastdiff.export.validate import validate_export

    model, _, path = exported_upsampler
    graph = read_export(path)
    assert graph.kind == "superres" and graph.low_res_shape == (3, 8, 8) and graph.image_shape == (3, 16, 16)
    onnx_model = onnx.load(str(path))
    assert [i.name for i in onnx_model.graph.input] == ["x_t", "timestep", "low_res", "labels"]
    dims = onnx_model.graph.input[2].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 8, 8]  # dynamic batch, small size
    initializers = {i.name for i in onnx_model.graph.initializer}
    convs = [n for n in onnx_model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert "ConvTranspose" in {n.op_type for n in convs}  # the up ResBlock's upsample_conv
    assert all(n.input[1] in initializers for n in convs)  # constant kernels, as TensorRT wants
    report = validate_export(path, model, batches=(1, 3))
    assert max(report.errors.values()) <= 1e-5, report.errors
    if report.inspection is not None:
        assert report.inspection.problems == [] and report.inspection.inputs["low_res"]["shape"][1:] == [
            3,
            8,
            8,
        ]


def test_upsample_engine_onnx_matches_eager(exported_upsampler, tmp_path):
    from click.testing import CliRunner

    from fastdiff.cli.main import main

    _, d, _ = exported_upsampler
    cached = sorted((d / "cache" / "onnx").glob("*.onnx"))
    images = {}
    for engine in ("eager", "onnx"):
        out = tmp_path / engine
        args = ["upsample", "--no-progress", "--device", "cpu", "--checkpoint", d / "sr.safetensors",
                "--low-res", d / "low.npz", "--steps", 4, "--batch-size", 3, "--engine", engine,
                "--out", out]  # fmt: skip
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        with np.load(out / "samples_5x16x16x3.npz") as z:
            images[engine] = z["arr_0"].astype(np.int64)
            assert z["arr_1"].tolist() == [0, 1, 2, 3, 1]
    # the export's file (the Sampler's fp32 cast of the fp16 torso hashes alike), not a second export
    assert sorted((d / "cache" / "onnx").glob("*.onnx")) == cached
    diff = np.abs(images["eager"] - images["onnx"])
    assert diff.max() <= 3 and diff.mean() < 0.1, (diff.max(), diff.mean())
