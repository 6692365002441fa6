"""fastdiff.ops.upsample_conv (nearest 2x upsampling + 3x3 conv as one transposed conv) against
its reference, and the networks that run it.

Tolerances scale with the reference's own error in the same precision, with a floor of ulps at the
result's scale (``builders.assert_close_to_reference``, as the other ops' tests).
"""

from __future__ import annotations

import pytest
import torch
from builders import assert_close_in
from torch import nn

from fastdiff.ops.upsample_conv import function as up_function
from fastdiff.ops.upsample_conv import fusable, upsample_conv, upsample_conv_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (factor on the reference's own error, floor in ulps at the result's scale). The 16-bit floor is the
# fast path's own rounding: it rounds the folded 4x4 kernel (its taps sum 1-4 weights in fp32) and the
# output, where the reference rounds the output alone. Over 250 seeds x the shapes below and three
# more (C, O of 3-24), forward, dx, dweight and dbias, on an AVX2 CPU (oneDNN, fp32 accumulation),
# its error stayed under 1.6 ulps in fp16 and bf16; the reference's ranged from 0.02 to 2.5 (the
# forward's from 0.08 to 0.49), so 3x it alone, with an absolute floor of 2e-3 / 2e-2 as before,
# failed 308 of those 6750 inputs (the forward; dx on two), by up to 1.85x. fp32's error reached 19 ulps
# (dbias sums 2048 terms in another order; the reference's reached 20): an absolute floor of 2e-6
# failed dx or dbias on 412 of 3500. The floors leave 1.3x (16-bit) and 2.3x (fp32).
TOL = {torch.float32: (4.0, 32.0), torch.float16: (2.0, 2.0), torch.bfloat16: (2.0, 2.0)}
# (N, C, O, H, W): odd sizes, one pixel, C != O, non-square, channels not a multiple of 16
SHAPES = [
    (1, 3, 5, 1, 1),
    (2, 4, 6, 7, 5),
    (3, 8, 8, 8, 8),
    (2, 16, 4, 3, 9),
    (2, 32, 32, 16, 16),
    (1, 48, 40, 8, 8),
]


def _inputs(shape, dtype, channels_last=False, device=DEVICE, seed=0):
    n, c, o, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(o, c, 3, 3, generator=g) / (3 * c**0.5)
    bias = torch.randn(o, generator=g)
    x, weight, bias = (t.to(device, dtype) for t in (x, weight, bias))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_folded_matches_reference(shape, dtype, channels_last, seed, no_tf32):
    """The transposed conv (the fast path itself, whatever the dispatch picks for this dtype),
    forward and the gradients of x, weight and bias. Two seeds: the max error of one input varies
    several-fold from seed to seed (bf16's forward at (2, 4, 6, 7, 5) seed 1 failed 3x the
    reference's error alone, by 1.4x channels-last; fp32's dx at (1, 48, 40, 8, 8) an absolute
    floor of 2e-6 at both seeds)."""
    if dtype == torch.float16 and DEVICE == "cpu" and shape[1] * shape[2] > 256:
        pytest.skip("PyTorch's CPU fp16 convs are too slow for the larger shapes")
    x, weight, bias = (t.requires_grad_() for t in _inputs(shape, dtype, channels_last, seed=seed))
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    out = up_function._folded(x, weight, bias)
    ref_lp = upsample_conv_reference(x, weight, bias)
    ref64 = upsample_conv_reference(*leaves64)
    assert_close_in(TOL, out, ref64, ref_lp, dtype, "forward")
    cl = torch.channels_last
    assert out.is_contiguous(memory_format=cl) == ref_lp.is_contiguous(memory_format=cl)  # same layout

    dy = torch.randn(ref64.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    grads = torch.autograd.grad(out, (x, weight, bias), dy.to(dtype))
    grads_lp = torch.autograd.grad(ref_lp, (x, weight, bias), dy.to(dtype))
    grads64 = torch.autograd.grad(ref64, leaves64, dy.double())
    for name, g, g_lp, g64 in zip(("dx", "dweight", "dbias"), grads, grads_lp, grads64, strict=True):
        assert_close_in(TOL, g, g64, g_lp, dtype, name)


def test_gradcheck():
    """float64, through the public op (the CPU runs the transposed conv for it): first and second
    derivatives, so training through it and gradient penalties are exact too."""
    x, weight, bias = (t.requires_grad_() for t in _inputs((2, 3, 2, 3, 4), torch.float64, device="cpu"))
    assert up_function._use_fold(x, weight, bias)
    assert torch.autograd.gradcheck(upsample_conv, (x, weight, bias))
    assert torch.autograd.gradgradcheck(upsample_conv, (x, weight, bias))


def test_without_bias():
    x, weight, _ = _inputs((2, 4, 6, 5, 5), torch.float64, device="cpu")
    torch.testing.assert_close(upsample_conv(x, weight), upsample_conv_reference(x, weight))


def test_fold_weight_layout():
    """Kernel index k = output row - 2 * input row + 1: phase 0 sums taps (1, 2) at k = 1."""
    w = torch.arange(9.0).reshape(1, 1, 3, 3)
    folded = up_function.fold_weight(w)
    assert folded.shape == (1, 1, 4, 4)
    rows = torch.tensor([[0.0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(folded[0, 0], rows @ w[0, 0] @ rows.T)


def test_16_bit_fold_rounds_once():
    """fp16/bf16 tap sums are the fp32 sums rounded once, as TOL's 16-bit floor counts them (summed
    in 16 bits they would round up to three more times, within that floor)."""
    weight = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        w = weight.to(dtype)
        assert torch.equal(up_function.fold_weight(w), up_function.fold_weight(w.float()).to(dtype))


def test_frozen_weight_is_folded_once_and_again_after_a_change(monkeypatch):
    """Sampling on the CPU folds each frozen weight once; an in-place update (load_state_dict,
    an optimizer step) or new storage folds it again, and a weight that needs a gradient is
    never served from the cache."""
    folds = []
    fold = up_function.fold_weight
    monkeypatch.setattr(up_function, "fold_weight", lambda w: folds.append(1) or fold(w))
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 4, 5, 5)

    def check():
        out = upsample_conv(x, conv.weight, conv.bias)
        torch.testing.assert_close(out, upsample_conv_reference(x, conv.weight, conv.bias))

    check()
    check()
    assert len(folds) == 1
    conv.load_state_dict({"weight": torch.randn(6, 4, 3, 3), "bias": torch.zeros(6)})
    check()
    assert len(folds) == 2
    conv.weight.data = torch.randn(6, 4, 3, 3)
    check()
    assert len(folds) == 3
    conv.requires_grad_(True)
    check()
    check()
    assert len(folds) == 5


def test_fold_ignores_autocast():
    """The tap sums stay fp32 inside autocast (its GEMM would run in bf16 there), so a frozen
    weight first folded under autocast still gives fp32 calls fp32 accuracy afterwards."""
    x, weight, bias = _inputs((1, 4, 4, 3, 3), torch.float32, device="cpu")
    want = up_function.fold_weight(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(up_function.fold_weight(weight), want)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            upsample_conv(x, weight, bias)
        out = upsample_conv(x, weight, bias)
    ref64 = upsample_conv_reference(x.double(), weight.double(), bias.double())
    ref_lp = upsample_conv_reference(x, weight, bias)
    assert_close_in(TOL, out, ref64, ref_lp, torch.float32, "after autocast")


def test_frozen_weight_written_through_data_is_folded_again():
    """``p.data.mul_()`` / ``ema.data.lerp_()`` (hand-written SGD, EMA updates) change the values
    without a version bump or new storage: a later sample must not run the old fold."""
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 4, 5, 5)
    upsample_conv(x, conv.weight, conv.bias)
    conv.weight.data.lerp_(torch.randn(6, 4, 3, 3), 0.5)
    torch.testing.assert_close(
        upsample_conv(x, conv.weight, conv.bias), upsample_conv_reference(x, conv.weight, conv.bias)
    )


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_script_and_trace_of_a_frozen_weight():
    """torch.jit.trace under no_grad failed its check ("Graphs differed across invocations"):
    the first call folded the weight, the second took the kept fold, a constant in the graph, so
    a trace without the check ignored later weights. Traced, the fold comes from the weight on
    every call; scripted, upsample_conv is the reference. The trace warns of nothing (the
    checks of the weight's and bias's sizes gave TracerWarnings)."""

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)

        def forward(self, x):
            return upsample_conv(x, self.conv.weight, self.conv.bias)

    net, x = Up().eval(), torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        modules = (torch.jit.trace(net, x), torch.jit.script(net))
        for module in modules:
            module.conv.weight.mul_(2)
            x = torch.randn(3, 4, 6, 7)
            torch.testing.assert_close(
                module(x), upsample_conv_reference(x, module.conv.weight, module.conv.bias)
            )


def test_vmap_over_weights():
    """torch.func.vmap over stacked weights (an ensemble through functional_call): a batched
    weight has no storage to key a cache on."""
    x, weights = torch.randn(2, 4, 5, 5), torch.randn(3, 6, 4, 3, 3)
    with torch.no_grad():
        got = torch.func.vmap(lambda w: upsample_conv(x, w))(weights)
    for i in range(3):
        torch.testing.assert_close(got[i], upsample_conv_reference(x, weights[i]))


def test_frozen_weight_first_folded_in_inference_mode_then_differentiated_by_x():
    """A frozen model sampled under inference_mode, then differentiated by its input (inversion,
    guidance through the model): the cached fold must be a tensor autograd can save."""
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    with torch.inference_mode():
        upsample_conv(torch.randn(1, 4, 3, 3), conv.weight, conv.bias)
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    (dx,) = torch.autograd.grad(upsample_conv(x, conv.weight, conv.bias).square().sum(), x)
    (expect,) = torch.autograd.grad(upsample_conv_reference(x, conv.weight, conv.bias).square().sum(), x)
    torch.testing.assert_close(dx, expect, atol=1e-5, rtol=1e-5)


def test_weights_made_in_inference_mode():
    """Weights made under inference_mode (inference tensors) are folded and kept like any other."""
    with torch.inference_mode():
        x, weight, bias = _inputs((2, 4, 6, 5, 5), torch.float32, device="cpu")
        torch.testing.assert_close(upsample_conv(x, weight, bias), upsample_conv_reference(x, weight, bias))
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(upsample_conv(x, weight, bias), upsample_conv_reference(x, weight, bias))


def test_dispatch(monkeypatch):
    """CPU: the transposed conv for fp32/bf16/fp64, the reference for fp16 (PyTorch's CPU fp16
    transposed conv measured slower than its conv); FASTDIFF_OPS=reference: always the reference."""
    calls = []
    reference = upsample_conv_reference
    monkeypatch.setattr(up_function, "_folded", lambda *a: calls.append("fold") or reference(*a))
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        upsample_conv(*_inputs((1, 2, 2, 3, 3), dtype, device="cpu"))
    assert calls == ["fold"] * 3
    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    upsample_conv(*_inputs((1, 2, 2, 3, 3), torch.float32, device="cpu"))
    assert calls == ["fold"] * 3


@pytest.mark.parametrize(
    "x_shape, w_shape",
    [
        ((2, 4, 5), (4, 4, 3, 3)),
        ((1, 4, 5, 5), (4, 3, 3, 3)),
        ((1, 4, 5, 5), (4, 4, 1, 1)),
        ((1, 4, 5, 5), (4, 4, 3)),
    ],
)
def test_bad_shapes(x_shape, w_shape):
    # a ValueError, and the RuntimeError F.conv2d raises for the same mistake
    with pytest.raises(ValueError, match="upsample_conv: x must be"):
        upsample_conv(torch.zeros(x_shape), torch.zeros(w_shape))
    with pytest.raises(RuntimeError, match="upsample_conv: x must be"):
        upsample_conv(torch.zeros(x_shape), torch.zeros(w_shape))


def test_bad_bias_and_dtype():
    """Said in the caller's terms, not the folded kernel's ([C, O, 4, 4], transposed=1); integers
    are refused as interpolate refuses them, not convolved."""
    x, w = torch.zeros(1, 4, 5, 5), torch.zeros(6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"bias must be \[6\], got \(4,\)"):
        upsample_conv(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="floating-point"):
        upsample_conv(x.long(), w.long())


def test_wrong_kinds_and_mixed_dtypes():
    """A non-tensor argument is one TypeError naming it (was an AttributeError); a weight or bias
    of another dtype or device than x one error in the caller's terms (was F.conv_transpose2d's
    about the folded kernel), except under autocast, which casts them as it does for F.conv2d."""
    x, w, b = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(6)
    with pytest.raises(TypeError, match="upsample_conv: x must be a torch.Tensor, got ndarray"):
        upsample_conv(x.numpy(), w, b)
    with pytest.raises(TypeError, match="upsample_conv: bias must be a torch.Tensor or None, got list"):
        upsample_conv(x, w, b.tolist())
    for args, message in (
        ((x, w.bfloat16(), b), "weight must be torch.float32 on cpu as x is, got torch.bfloat16 on cpu"),
        ((x, w, b.double()), "bias must be torch.float32 on cpu as x is, got torch.float64 on cpu"),
        ((x, w, b.to("meta")), "bias must be torch.float32 on cpu as x is, got torch.float32 on meta"),
    ):
        with pytest.raises(RuntimeError, match=f"upsample_conv: {message}"):
            upsample_conv(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = upsample_conv(x.bfloat16(), w, b)
        want = upsample_conv_reference(x.bfloat16(), w, b)
    assert got.dtype == want.dtype == torch.bfloat16


class _LoraConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "conv, expected",
    [
        (nn.Conv2d(4, 4, 3, padding=1), True),
        (nn.Conv2d(4, 8, 3, padding=1, bias=False), True),
        (nn.Conv2d(4, 4, 3, padding=1, stride=2), False),
        (nn.Conv2d(4, 4, 1), False),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2), False),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), False),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), False),
        (_LoraConv(4, 4, 3, padding=1), False),
        (nn.Conv1d(4, 4, 3, padding=1), False),
        (nn.Identity(), False),
    ],
)
def test_fusable(conv, expected):
    assert fusable(conv) is expected


@pytest.mark.parametrize("resblock_updown", [False, True])
def test_unet_runs_it(monkeypatch, resblock_updown):
    """Both of ADM's upsamplers (Upsample's conv, the BigGAN up ResBlock's first conv) run one
    upsample_conv each, and the network's output and input gradient match the reference path."""
    from builders import build_unet

    torch.manual_seed(0)
    net = build_unet(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2,2",
        attention_resolutions="8",
        num_head_channels=32,
        learn_sigma=True,
        class_cond=True,
        num_classes=4,
        use_scale_shift_norm=True,
        resblock_updown=resblock_updown,
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
    calls = []
    folded = up_function._folded
    monkeypatch.setattr(up_function, "_folded", lambda *a: calls.append(1) or folded(*a))
    out = net(x, t, y=y)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    assert len(calls) == 2
    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    ref = net(x, t, y=y)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_choice_is_measured_ahead_of_time(monkeypatch):
    """On a GPU the path per shape is measured only inside autotuning(), then reused."""
    from fastdiff.ops import autotuning

    monkeypatch.setenv("FASTDIFF_BACKEND_CACHE", "0")
    monkeypatch.setattr(up_function, "_CHOICES", up_function.Choices("upsample_conv"))
    x, weight, bias = _inputs((4, 64, 64, 16, 16), torch.float16, channels_last=True)
    upsample_conv(x, weight, bias)
    assert up_function._CHOICES.values == {}
    with autotuning():
        out = upsample_conv(x, weight, bias)
    (choice,) = up_function._CHOICES.values.values()
    assert choice in ("fold", "reference")
    ref64 = upsample_conv_reference(*(t.double() for t in (x, weight, bias)))
    assert_close_in(TOL, out, ref64, upsample_conv_reference(x, weight, bias), torch.float16, "forward")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_capture(monkeypatch):
    """The fold builds its matrix on the device (no host copy), so a CUDA graph captures the
    whole op, and a replay reads the weight as it is then (nothing is cached on CUDA)."""
    monkeypatch.setenv("FASTDIFF_BACKEND_CACHE", "0")
    monkeypatch.setattr(up_function, "_CHOICES", up_function.Choices("upsample_conv"))
    x, weight, bias = _inputs((2, 32, 32, 8, 8), torch.float16, channels_last=True)
    assert up_function._use_fold(x, weight, bias)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        upsample_conv(x, weight, bias)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = upsample_conv(x, weight, bias)
    weight.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    ref64 = upsample_conv_reference(*(t.double() for t in (x, weight, bias)))
    assert_close_in(TOL, out, ref64, upsample_conv_reference(x, weight, bias), torch.float16, "replay")


@pytest.mark.parametrize("dims", [1, 3])
def test_other_dims_keep_interpolate_then_conv(monkeypatch, dims):
    """ADM's 1-D and 3-D Upsample (3-D doubles the inner two dims only) are left as they were."""
    import torch.nn.functional as F

    from fastdiff.models.unet import Upsample

    monkeypatch.setattr(up_function, "_folded", lambda *a: pytest.fail("the fold is 2-D only"))
    torch.manual_seed(0)
    up = Upsample(4, True, dims=dims, out_channels=6)
    x = torch.randn((2, 4) + (5,) * dims)
    size = (x.shape[2], 10, 10) if dims == 3 else (10,)
    with torch.no_grad():
        torch.testing.assert_close(up(x), up.conv(F.interpolate(x, size, mode="nearest")))
