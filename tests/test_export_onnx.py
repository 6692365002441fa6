"""A real export (slow: tracing and translating take minutes on a loaded 2-core machine): a tiny
classifier-guided UNet to ONNX, onnxruntime against PyTorch and torch.autograd.grad, and
``--engine onnx`` against eager sampling."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from builders import diffusion_from_flags  # noqa: E402

from fastdiff.export import ExportError, check_export, read_export  # noqa: E402
from fastdiff.models.unet import EncoderUNetModel, UNetModel  # noqa: E402

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


def test_other_weights_are_refused(exported):
    unet, clf, path = exported
    other = _tiny()[0]
    other.out[2].bias.data += 1
    with pytest.raises(ExportError, match="another model"):
        check_export(read_export(path), model=other, classifier=clf)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_engine_onnx_matches_eager(exported, sampler, monkeypatch):
    import fastdiff

    unet, clf, path = exported
    monkeypatch.setenv("FASTDIFF_CACHE", str(path.parents[1]))
    flags = {"diffusion_steps": 1000, "noise_schedule": "cosine", "learn_sigma": True,
             "timestep_respacing": "ddim5" if sampler == "ddim" else "5"}  # fmt: skip
    diffusion = diffusion_from_flags(flags)
    images = {}
    for engine in ("eager", "onnx"):
        s = fastdiff.Sampler(unet, diffusion, sampler=sampler, classifier=clf, classifier_scale=2.0,
                             engine=engine, image_shape=(1, 8, 8))  # fmt: skip
        images[engine] = s([0, 1, 2], generator=torch.Generator().manual_seed(1))
    to8 = [((x + 1) * 127.5).clamp(0, 255).round() for x in (images["eager"], images["onnx"])]
    diff = (to8[0] - to8[1]).abs()
    assert diff.max() <= 3 and diff.mean() < 0.1
