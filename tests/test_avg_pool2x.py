"""fastdiff.ops.avg_pool2x (2x2 average pooling with stride 2, ADM's Downsample without a conv)
against its reference, F.avg_pool2d: the same numbers and gradients, bit for bit, where the
strided path runs; the reference wherever it does not; and the networks that run it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops._backend import OpInputError, OpTypeError
from fastdiff.ops.avg_pool2x import avg_pool2x, avg_pool2x_reference
from fastdiff.ops.avg_pool2x import function as pool_function

# batch 1, one channel, non-square, the bundled classifier's down block's shape (smaller batch)
SHAPES = [(1, 1, 2, 2), (2, 3, 6, 4), (3, 5, 8, 10), (2, 32, 32, 32)]


@pytest.fixture
def taken(monkeypatch):
    """The inputs the strided path ran on."""
    seen = []
    strided = pool_function._pool
    monkeypatch.setattr(pool_function, "_pool", lambda x: seen.append(x) or strided(x))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_strided_path_is_the_reference_bit_for_bit(taken, monkeypatch, shape, dtype):
    """On an NCHW CPU tensor the strided adds and the gradient's copies give F.avg_pool2d's own
    numbers and gradient (its CPU kernels took 3x as long there); no element is left unwritten
    (the gradient's buffer starts as NaN under FASTDIFF_OPS_POISON)."""
    monkeypatch.setenv("FASTDIFF_OPS_POISON", "1")
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    dy = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=dtype)
    got = avg_pool2x(x)
    (dx,) = torch.autograd.grad(got, x, dy)
    assert len(taken) == 1
    want = avg_pool2x_reference(x)
    (dx_want,) = torch.autograd.grad(want, x, dy)
    assert torch.equal(got, want) and got.is_contiguous()
    assert torch.equal(dx, dx_want)
    with torch.no_grad():
        assert torch.equal(avg_pool2x(x), want) and len(taken) == 2


def test_gradcheck_and_double_backward():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(avg_pool2x, (x,))
    assert torch.autograd.gradgradcheck(avg_pool2x, (x,))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(2, 4, 5, 6),  # odd: the last row is dropped
        lambda: torch.randn(2, 4, 6, 7),
        lambda: torch.randn(2, 4, 6, 6, dtype=torch.bfloat16),  # summed in fp32, rounded once
        lambda: torch.randn(2, 4, 12, 12)[:, :, ::2, ::2],  # strided
        lambda: torch.randn(0, 4, 6, 6),
    ],
    ids=["channels_last", "odd-h", "odd-w", "bf16", "strided", "empty"],
)
def test_other_inputs_take_the_reference(taken, make):
    x = make()
    got = avg_pool2x(x)
    assert not taken
    assert torch.equal(got, F.avg_pool2d(x, 2, 2)) and got.stride() == F.avg_pool2d(x, 2, 2).stride()


def test_reference_mode_traces_and_transforms_take_the_reference(taken, monkeypatch):
    """FASTDIFF_OPS=reference, torch.jit.trace, make_fx (the ONNX export's trace: its graph keeps
    the one pooling op), torch.func and forward-mode AD see F.avg_pool2d."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 3, 4, 4)
    graph = make_fx(avg_pool2x)(x)
    calls = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert calls == ["aten.avg_pool2d.default"]
    traced = torch.jit.trace(avg_pool2x, (x,), check_trace=False)  # its check runs untraced
    assert "avg_pool2d" in str(traced.graph)
    grad = torch.func.grad(lambda t: avg_pool2x(t).square().sum())(x)
    torch.testing.assert_close(grad, torch.func.grad(lambda t: F.avg_pool2d(t, 2, 2).square().sum())(x))
    _, tangent = torch.func.jvp(avg_pool2x, (x,), (torch.ones_like(x),))
    assert torch.equal(tangent, torch.ones(2, 3, 2, 2))
    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    avg_pool2x(x)
    assert not taken
    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    avg_pool2x(x)
    assert len(taken) == 1


def test_scripted_is_the_reference():
    scripted = torch.jit.script(avg_pool2x)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(scripted(x), F.avg_pool2d(x, 2, 2))


def test_bad_input_is_one_error():
    with pytest.raises(OpTypeError, match="avg_pool2x: x must be a torch.Tensor"):
        avg_pool2x([[1.0]])
    with pytest.raises(OpInputError, match=r"avg_pool2x: x must be \[N, C, H, W\], got \(2, 4, 4\)"):
        avg_pool2x(torch.randn(2, 4, 4))


def test_the_classifiers_down_blocks_pool_with_it(taken):
    """ADM's classifier with BigGAN down blocks (the bundled one) pools through avg_pool2x: its
    gradient by x, classifier guidance's, is the one F.avg_pool2d gives, bit for bit. A hook on
    a pool still runs (the module is called)."""
    from builders import build_classifier

    torch.manual_seed(0)
    clf = build_classifier(image_size=16, classifier_width=32, classifier_depth=1, channel_mult="1,2,2",
                           classifier_attention_resolutions="4", classifier_use_scale_shift_norm=True,
                           classifier_resblock_updown=True, classifier_pool="attention")  # fmt: skip
    with torch.no_grad():
        for p in clf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    clf.eval().requires_grad_(False)
    pools = [m for m in clf.modules() if isinstance(m, torch.nn.AvgPool2d)]
    hooked = []
    pools[0].register_forward_hook(lambda m, i, o: hooked.append(1))
    x, t = torch.randn(2, 3, 16, 16, requires_grad=True), torch.tensor([10, 900])
    (got,) = torch.autograd.grad(clf(x, t).log_softmax(-1)[:, 1].sum(), x)
    assert len(pools) == 4 and len(taken) == 3 and hooked == [1]  # two pools in each down block
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pool_function, "_fast", lambda x: False)
        (want,) = torch.autograd.grad(clf(x, t).log_softmax(-1)[:, 1].sum(), x)
    assert len(taken) == 3 and torch.equal(got, want)
