"""ADM networks: reference vectors from guided-diffusion, every architecture option, fp16/autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from builders import build_classifier, build_unet, rel_err
from conftest import load_case

from fastdiff.config import ConfigError
from fastdiff.models import (
    ClassifierConfig,
    EncoderUNetModel,
    SuperResConfig,
    SuperResModel,
    UNetConfig,
    UNetModel,
)
from fastdiff.models.nn import normalization, timestep_embedding
from fastdiff.models.unet import AttentionBlock

SMALL = dict(
    image_size=16,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=(8,),
    channel_mult=(1, 2),
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
)


def small_unet(**kw) -> UNetModel:
    args = dict(SMALL, learn_sigma=True, num_classes=10, use_new_attention_order=True)
    args.update(kw)
    return UNetModel(UNetConfig(**args))


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero weights everywhere (zero-initialised output convs would hide most of the network)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def run_unet(model: UNetModel, n: int = 2) -> torch.Tensor:
    x = torch.randn(n, model.in_channels, model.image_size, model.image_size)
    t = torch.randint(0, 1000, (n,))
    y = torch.randint(0, model.num_classes, (n,)) if model.num_classes else None
    return model(x, t, y)


# --- reference vectors -------------------------------------------------------------------------


def test_vector_forward(case_path):
    case = load_case(case_path)
    model = build_unet(**case["flags"])
    assert list(model.state_dict()) == list(case["state_dict"])
    model.load_state_dict(case["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(case["x"], case["t"], case.get("y"))
    assert out.shape == case["out"].shape
    assert rel_err(out, case["out"]) <= 1e-5


def test_vector_classifier(case_path):
    case = load_case(case_path)
    if "classifier" not in case:
        pytest.skip("case has no classifier")
    c = case["classifier"]
    model = build_classifier(**c["flags"])
    assert list(model.state_dict()) == list(c["state_dict"])
    model.load_state_dict(c["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(c["x"], c["t"])
    assert logits.shape == c["out"].shape == (c["x"].shape[0], 1000)
    assert rel_err(logits, c["out"]) <= 1e-5


# --- building blocks ---------------------------------------------------------------------------


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0.0, 3.5]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0]))  # cos half, sin half, zero pad
    freqs = torch.exp(-math.log(10000) * torch.arange(3) / 3)
    assert torch.allclose(emb[1, :3], torch.cos(3.5 * freqs))
    assert torch.allclose(emb[1, 3:6], torch.sin(3.5 * freqs))


def test_normalization_fp32_statistics():
    """ADM's norm computes in fp32 for bf16 activations (with or without autocast), as GroupNorm32."""
    gn = normalization(64)
    x = (torch.randn(2, 64, 4, 4) * 100 + 1000).bfloat16()
    ref = F.group_norm(x.float(), 32, gn.weight, gn.bias, gn.eps).bfloat16()
    assert torch.equal(gn(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gn(x), ref)


# --- architecture options ----------------------------------------------------------------------


# Every option's outputs are checked against guided-diffusion in test_variant_vectors.py; what
# stays here are the options the original's flags cannot express, and properties.


@pytest.mark.parametrize(
    "kw", [dict(model_channels=64, channel_mult=(0.5, 1, 2)), dict(dropout=0.1, learn_sigma=False)]
)
def test_every_parameter_gets_a_gradient(kw):
    model = randomize(small_unet(**kw))  # train mode: dropout active
    out = run_unet(model)
    assert out.shape == (2, model.out_channels, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_dropout_one_is_the_original_nn_dropout():
    """dropout 1.0 (the original builds nn.Dropout(p=1.0); fastdiff refused it): in training every
    res block's branch is dropped, leaving the skip path plus the last conv's bias; eval ignores it."""
    torch.manual_seed(0)
    model = randomize(small_unet(dropout=1.0))
    block = model.input_blocks[1][0]
    x, emb = torch.randn(2, 32, 16, 16), torch.randn(2, 128)
    bias = block.out_layers[-1].bias[:, None, None]
    torch.testing.assert_close(block(x, emb), block.skip_connection(x) + bias)
    plain = small_unet(dropout=0.0)
    plain.load_state_dict(model.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), plain.eval()(x, t, y))


def test_unet_structure():
    half = small_unet(model_channels=64, channel_mult=(0.5, 1, 2))
    assert half.input_blocks[0][0].out_channels == 32  # int(0.5 * 64)
    assert half.out[2].in_channels == 32
    heads = small_unet(num_head_channels=-1, num_heads=4, num_heads_upsample=2)
    assert heads.middle_block[1].num_heads == 4
    assert heads.output_blocks[0][1].num_heads == 2
    assert small_unet(num_head_channels=16).middle_block[1].num_heads == 4
    conv = dict(small_unet(resblock_updown=False).named_parameters())
    assert "input_blocks.2.0.op.weight" in conv and "output_blocks.1.2.conv.weight" in conv
    pool = dict(small_unet(resblock_updown=False, conv_resample=False).named_parameters())
    assert not any(k.startswith(("input_blocks.2.", "output_blocks.1.2.")) for k in pool)
    assert "label_emb.weight" not in small_unet(num_classes=None).state_dict()
    assert small_unet().image_size == 16 and small_unet().num_classes == 10


def test_fresh_networks_start_with_zeroed_residual_branches_and_outputs():
    """As guided-diffusion's zero_module: the last conv of every res block and attention block and
    the output convs start at zero, so a fresh block is its skip path and a fresh network predicts 0
    (what training from scratch starts from; the weights every other test loads hide it)."""
    from fastdiff.models.unet import ResBlock

    model = small_unet()
    zeroed = [m.out_layers[-1] for m in model.modules() if isinstance(m, ResBlock)]
    zeroed += [m.proj_out for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(zeroed) == 14 and all(not p.any() for m in [*zeroed, model.out[-1]] for p in m.parameters())
    assert model.input_blocks[0][0].weight.any()
    with torch.no_grad():
        assert not run_unet(model).any()
        classifier = EncoderUNetModel(ClassifierConfig(**SMALL, num_classes=4, pool="adaptive"))
        assert not classifier(torch.randn(2, 3, 16, 16), torch.tensor([3, 700])).any()


def test_label_required_iff_class_conditional():
    cond, uncond = small_unet(), small_unet(num_classes=None)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    with pytest.raises(ValueError, match="class-conditional"):
        cond(x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        uncond(x, t, torch.tensor([1]))


def test_no_res_blocks_keep_the_input_width_down_and_attend_on_the_way_up():
    """num_res_blocks 0, as guided-diffusion builds it: downsampling keeps the input conv's width
    through the middle block (and a classifier's head), attention follows the up path's res
    blocks only, so its heads split the up path's widths and num_heads only the middle's."""
    kw = dict(image_size=16, model_channels=32, channel_mult=(2, 3), attention_resolutions=(8,))
    heads = dict(num_head_channels=-1, num_heads=64, num_heads_upsample=32)
    with pytest.raises(ConfigError, match="width 96 is not divisible into 64 attention heads"):
        UNetConfig(**kw, **heads, num_res_blocks=1)  # the down path's attention at 96 channels
    model = randomize(UNetModel(UNetConfig(**kw, **heads, num_res_blocks=0, num_classes=3)))
    assert len(model.input_blocks) == 2 and len(model.output_blocks) == 2
    assert not any(isinstance(m, AttentionBlock) for m in model.input_blocks.modules())
    assert model.input_blocks[1][0].op.out_channels == 64  # the downsampler keeps 2 x 32
    assert model.middle_block[0].channels == 64 and model.middle_block[1].num_heads == 64
    up = model.output_blocks[0]
    assert (up[0].channels, up[0].out_channels, up[1].channels, up[1].num_heads) == (128, 96, 96, 32)
    assert model.output_blocks[1][0].channels == 96 + 64 and len(model.output_blocks[1]) == 1
    assert run_unet(model).shape == (2, 3, 16, 16)

    # a classifier has no up path: a width no level but the first would have is never built
    clf = dict(kw, channel_mult=(2, 1.5), num_res_blocks=0, num_classes=5)
    with pytest.raises(ConfigError, match="multiple of 32"):
        ClassifierConfig(**{**clf, "num_res_blocks": 1})
    for pool in ("attention", "spatial"):
        classifier = randomize(EncoderUNetModel(ClassifierConfig(**clf, pool=pool)))
        assert {m.channels for m in classifier.modules() if isinstance(m, AttentionBlock)} == {64}
        logits = classifier(torch.randn(2, 3, 16, 16), torch.tensor([1, 500]))
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_inputs_that_are_no_tensors_or_other_batches_are_one_error():
    """model(x, 5, y) (an int timestep), a 0-d or list timestep, a numpy x: one ValueError naming
    the argument (were AttributeError / IndexError from the embedding, and a timestep count other
    than x's was reported as y's shape)."""
    unet = small_unet()
    classifier = EncoderUNetModel(ClassifierConfig(**{**SMALL, "use_scale_shift_norm": False}, num_classes=4))
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    wrong = ((5, "int"), (torch.tensor(5), "\\[\\]"), ([5, 6], "list"), (torch.tensor([5, 6, 7]), "\\[3\\]"))
    for t, got in wrong:
        with pytest.raises(
            ValueError, match=f"timesteps must be a tensor \\[N\\]=\\[2\\] or \\[1\\], got {got}"
        ):
            unet(x, t, y)
        with pytest.raises(ValueError, match="timesteps must be a tensor"):
            classifier(x, t)
    with pytest.raises(ValueError, match="x must be a tensor \\[N, C, H, W\\], got ndarray"):
        unet(x.numpy(), torch.tensor([5, 6]), y)


def test_one_timestep_serves_the_whole_batch_as_in_guided_diffusion():
    """timesteps [1] with a batch of N broadcast in the original (its embedding row is added to
    every image's); they were refused as a count other than x's."""
    unet = randomize(small_unet()).eval()
    classifier = randomize(
        EncoderUNetModel(ClassifierConfig(**{**SMALL, "use_scale_shift_norm": False}, num_classes=4))
    ).eval()
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, torch.tensor([7]), y), unet(x, torch.tensor([7, 7, 7]), y))
        torch.testing.assert_close(classifier(x, torch.tensor([7])), classifier(x, torch.tensor([7, 7, 7])))


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_a_traced_network_warns_of_nothing_and_runs_other_batches():
    """torch.jit.trace of a UNet and a classifier: their input checks tested traced sizes, each
    a TracerWarning (the ops' own checks already stand aside while tracing)."""
    unet = randomize(small_unet()).eval()
    classifier = EncoderUNetModel(ClassifierConfig(**{**SMALL, "use_scale_shift_norm": False}, num_classes=4))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        traced = torch.jit.trace(unet, (x, t, y), check_trace=False)
        traced_classifier = torch.jit.trace(classifier.eval(), (x, t), check_trace=False)
        x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 999]), torch.tensor([0, 9, 3])
        torch.testing.assert_close(traced(x, t, y), unet(x, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traced_classifier(x, t), classifier(x, t), rtol=1e-5, atol=1e-5)


def test_superres_model():
    model = randomize(SuperResModel(SuperResConfig(**SMALL, small_size=4, learn_sigma=True, num_classes=10)))
    assert model.input_blocks[0][0].in_channels == 6
    x, low = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4)
    t, y = torch.tensor([1, 500]), torch.tensor([0, 9])
    out = model(x, t, low_res=low, y=y)
    assert out.shape == (2, 6, 16, 16)
    up = F.interpolate(low, (16, 16), mode="bilinear")
    assert torch.equal(out, UNetModel.forward(model, torch.cat([x, up], 1), t, y))


def test_encoder_rejects_unknown_pool():
    with pytest.raises(ConfigError, match="unknown pool"):
        ClassifierConfig(**SMALL, num_classes=7, pool="max")


# --- precision and memory options --------------------------------------------------------------


def test_use_fp16_structure_and_output():
    ref = randomize(small_unet()).eval()
    fp16 = small_unet(use_fp16=True).eval()
    fp16.load_state_dict(ref.state_dict())  # fp32 weights cast into the fp16 torso
    resblock = fp16.input_blocks[1][0]
    assert resblock.in_layers[2].weight.dtype == torch.float16
    assert fp16.middle_block[1].qkv.weight.dtype == torch.float16
    assert resblock.in_layers[0].weight.dtype == torch.float32  # norms stay fp32
    assert resblock.emb_layers[1].weight.dtype == torch.float32  # embedding path stays fp32
    assert fp16.time_embed[0].weight.dtype == fp16.out[2].weight.dtype == torch.float32
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        expected, got = ref(x, t, y), fp16(x, t, y)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-2
    fp16.convert_to_fp32()
    assert fp16.input_blocks[1][0].in_layers[2].weight.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(fp16(x, t, y), expected) < 1e-3  # fp16-rounded weights, fp32 math


def test_classifier_fp16():
    kw = dict(SMALL, use_scale_shift_norm=False, resblock_updown=False, num_classes=5, pool="attention")
    ref = randomize(EncoderUNetModel(ClassifierConfig(**kw))).eval()
    fp16 = EncoderUNetModel(ClassifierConfig(**kw, use_fp16=True)).eval()
    fp16.load_state_dict(ref.state_dict())
    assert fp16.input_blocks[0][0].weight.dtype == torch.float16
    assert fp16.out[2].qkv_proj.weight.dtype == torch.float32
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        assert rel_err(fp16(x, t), ref(x, t)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_use_fp16_cuda(case_path):
    case = load_case(case_path)
    model = build_unet(**{**case["flags"], "use_fp16": True}).cuda().eval()
    model.load_state_dict(case["state_dict"])
    with torch.no_grad():
        out = model(case["x"].cuda(), case["t"].cuda(), None if case.get("y") is None else case["y"].cuda())
    assert out.dtype == torch.float32
    assert rel_err(out.cpu(), case["out"]) < 1e-2


def _output_dtypes(model: torch.nn.Module, names: list[str], run) -> dict[str, torch.dtype]:
    """The dtype of each named submodule's output during ``run()``."""
    seen: dict[str, torch.dtype] = {}
    modules = dict(model.named_modules())

    def record(name, out):
        seen.setdefault(name, out.dtype)

    hooks = [modules[n].register_forward_hook(lambda m, a, out, n=n: record(n, out)) for n in names]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_meta_device_forward():
    """A forward on the meta device gives the output shape with no memory (the Triton compile
    check in CI reads every preset's op calls this way); autocast has no meta device."""
    x, t = torch.empty(2, 3, 16, 16, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    out = small_unet().to("meta")(x, t, torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, 6, 16, 16) and out.is_meta
    clf = EncoderUNetModel(ClassifierConfig(**SMALL, num_classes=4, pool="attention")).to("meta")
    assert clf(x, t).shape == (2, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_torso_low_and_the_rest_fp32(dtype):
    """Under autocast, only the torso computes in low precision, where guided-diffusion's fp16
    mode puts it: embeddings, ResBlock embedding projections and output head stay fp32 (an fp16
    output conv's weight gradient overflowed the loss scale)."""
    model = randomize(small_unet()).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = model(x, t, y)
    got = {}

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            got["out"] = model(x, t, y)

    fp32 = ["time_embed", "label_emb", "input_blocks.1.0.emb_layers", "out", "out.2"]
    seen = _output_dtypes(model, [*fp32, "input_blocks.0.0", "middle_block.1"], run)
    assert {n: seen[n] for n in fp32} == dict.fromkeys(fp32, torch.float32)
    assert seen["input_blocks.0.0"] == seen["middle_block.1"] == dtype
    assert got["out"].dtype == torch.float32 and rel_err(got["out"], expected) < 5e-2

    clf = randomize(EncoderUNetModel(ClassifierConfig(**SMALL, num_classes=4, pool="attention"))).eval()
    with torch.no_grad():
        expected = clf(x, t)

    def run_clf():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            got["clf"] = clf(x, t)

    seen = _output_dtypes(clf, ["time_embed", "out", "input_blocks.0.0"], run_clf)
    assert seen == {"time_embed": torch.float32, "out": torch.float32, "input_blocks.0.0": dtype}
    assert rel_err(got["clf"], expected) < 5e-2


def test_whole_model_bf16():
    """model.to(bfloat16) runs end to end (the embedding follows the weights' dtype)."""
    model = randomize(small_unet()).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = model(x, t, y)
        got = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert got.dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    assert rel_err(got, expected) < 5e-2


def test_gradient_checkpointing_same_grads(monkeypatch):
    import fastdiff.models.nn as mnn

    calls = []
    real = mnn.checkpoint
    monkeypatch.setattr(mnn, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    plain = randomize(small_unet())
    ckpt = small_unet(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    plain(x, t, y).square().mean().backward()
    assert not calls
    ckpt(x, t, y).square().mean().backward()
    assert calls and all(kw == {"use_reentrant": False, "preserve_rng_state": True} for kw in calls)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name


# --- the networks run on fastdiff.ops ----------------------------------------------------------


@pytest.mark.parametrize("updown", [True, False], ids=["resblock-updown", "conv-resample"])
def test_cpu_inference_runs_the_torso_channels_last(monkeypatch, updown):
    """A CPU pass without autograd (sampling) from a batch of 16 runs the UNet's torso
    channels_last, oneDNN's fast layout there, and returns NCHW: the NCHW pass's values to
    float32 rounding. A hook on an attention projection still runs. Where autograd records, the
    torso stays NCHW."""
    from fastdiff.models import unet as unet_module

    torch.manual_seed(0)
    model = randomize(small_unet(resblock_updown=updown)).eval()
    layouts, hooked = [], []
    conv = model.output_blocks[0][0].in_layers[2]
    conv.register_forward_hook(lambda m, i, o: layouts.append(i[0].is_contiguous()))
    qkv = next(m for m in model.modules() if isinstance(m, AttentionBlock)).qkv
    qkv.register_forward_hook(lambda m, i, o: hooked.append(1))
    n = unet_module.CHANNELS_LAST_MIN_BATCH
    x, t, y = torch.randn(n, 3, 16, 16), torch.arange(n) * 60, torch.arange(n) % 10
    with torch.no_grad():
        got = model(x, t, y)
        with monkeypatch.context() as m:
            m.setattr(unet_module, "_channels_last_torso", lambda x: False)
            want = model(x, t, y)
    assert layouts == [False, True] and got.is_contiguous() and len(hooked) == 2
    assert rel_err(got, want) <= 1e-5
    model(x, t, y)
    assert layouts[-1]


def test_reference_ops_run_the_torso_nchw_at_every_batch(monkeypatch):
    """FASTDIFF_OPS=reference keeps the original's NCHW torso from a batch of 16 too, so the
    UNet is guided-diffusion's arithmetic (channels-last convs round otherwise, by ~3e-6)."""
    from fastdiff.models import unet as unet_module

    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    x = torch.randn(unet_module.CHANNELS_LAST_MIN_BATCH, 3, 16, 16)
    with torch.no_grad():
        assert not unet_module._channels_last_torso(x)


@pytest.mark.parametrize("n", [1, 2, 15])
def test_cpu_inference_of_a_small_batch_runs_the_torso_nchw(n):
    """Below a batch of 16 the torso runs NCHW on the CPU, measured faster there (the bundled
    model's UNet 12% at batch 1, 4% at 2-8). A batch of one had run a mixed layout: the torso
    turned NCHW after its first attention block, whose output torch read as NCHW."""
    model = small_unet().eval()
    layouts = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, i, o: layouts.append(i[0].is_contiguous()))
    with torch.no_grad():
        model(torch.randn(n, 3, 16, 16), torch.full((n,), 10), torch.arange(n) % 10)
    assert layouts and all(layouts)


def test_a_make_fx_trace_keeps_the_torso_nchw():
    """fastdiff's ONNX export traces the networks with make_fx under no_grad on the CPU: the
    channels-last torso leaked into that trace as layout copies and transposed matmuls (the
    bundled model's graph had 2134 nodes against 2090). At a batch the torso would run
    channels_last outside the trace (below it, NCHW proves nothing)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fastdiff.models import unet as unet_module
    from fastdiff.ops._backend import traced

    model = randomize(small_unet()).eval()
    n = unet_module.CHANNELS_LAST_MIN_BATCH
    x, t, y = torch.randn(n, 3, 16, 16), torch.arange(n) * 60, torch.arange(n) % 10
    seen = []
    with torch.no_grad():
        graph = make_fx(lambda x, t, y: (seen.append(traced()), model(x, t, y))[1])(x, t, y)
    assert seen == [True] and not traced()
    formats = [n.kwargs.get("memory_format") for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.channels_last not in formats
    assert not any("linear" in str(n.target) for n in graph.graph.nodes)


def _ops_modes():
    """The ops modes this machine can run: reference and auto always; the Triton kernels on CUDA,
    or in the interpreter when TRITON_INTERPRET=1 (small networks only: it is slow)."""
    from fastdiff.ops._backend import triton_available, triton_interpret

    kernels = triton_available() and (torch.cuda.is_available() or triton_interpret())
    return ["auto", "triton"] if kernels else ["auto"]


def test_models_are_built_on_the_ops():
    """One ADM implementation: every norm, AdaGN and attention is a fastdiff.ops layer, fused
    SiLUs leave nn.Identity in their slots (so state_dict keys stay guided-diffusion's)."""
    from fastdiff import ops

    model = small_unet()
    kinds = {type(m) for m in model.modules()}
    assert ops.AdaGroupNormSiLU in kinds and ops.GroupNormSiLU in kinds and ops.QKVAttention in kinds
    assert torch.nn.GroupNorm not in kinds and torch.nn.SiLU in kinds  # SiLU only in the embedding MLPs
    block = model.input_blocks[1][0]
    assert isinstance(block.in_layers[1], torch.nn.Identity) and isinstance(
        block.out_layers[1], torch.nn.Identity
    )
    assert "input_blocks.1.0.out_layers.0.weight" in model.state_dict()
    legacy = small_unet(use_new_attention_order=False)
    assert ops.QKVAttentionLegacy in {type(m) for m in legacy.modules()}


def _interpreted(mode: str) -> list:
    # the interpreter takes ~35 s a network: it runs in the slow stage (CI runs both)
    return [pytest.mark.slow] if mode == "triton" and not torch.cuda.is_available() else []


@pytest.mark.parametrize(
    "mode, kw",
    [pytest.param(mode, dict(), marks=_interpreted(mode)) for mode in _ops_modes()]
    # the other variant runs on the fast paths only
    + [("auto", dict(use_scale_shift_norm=False, use_new_attention_order=False))],
)
def test_ops_modes_agree(monkeypatch, mode, kw):
    """The same network through the fast paths (or the kernels) and through the reference, forward
    and the classifier-style input gradient, fp32 to float32 rounding."""
    torch.manual_seed(0)
    model = randomize(small_unet(image_size=8, **kw)).eval()
    clf = randomize(
        build_classifier(
            image_size=8,
            classifier_width=32,
            classifier_depth=1,
            classifier_attention_resolutions="4",
            channel_mult="1,2",
            classifier_pool="attention",
            num_classes=10,
        )
    ).eval()
    x, t, y = torch.randn(1, 3, 8, 8), torch.tensor([500]), torch.tensor([3])

    def run():
        xi = x.clone().requires_grad_(True)
        logits = clf(xi, t)
        (g,) = torch.autograd.grad(logits[0, 3], xi)
        with torch.no_grad():
            return model(x, t, y), logits.detach(), g

    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    ref = run()
    monkeypatch.setenv("FASTDIFF_OPS", mode)
    for got, want, what in zip(run(), ref, ("unet", "classifier", "input gradient")):
        assert rel_err(got, want) <= 1e-5, what
