"""ada_group_norm: Triton kernels (CPU interpreter, and CUDA when present), the op, the modules.

Accuracy is judged against the reference in float64: the kernel must be within a few times the
reference's own low-precision error (ref_lp vs ref64), plus a small floor. Kernel outputs are
poisoned with NaN before launch (FASTDIFF_OPS_POISON) so an unwritten element fails.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from builders import assert_close_to_reference, compiled_call_targets, func_grad_and_autograd
from torch import nn

from fastdiff.ops._backend import triton_interpret
from fastdiff.ops.ada_group_norm import (
    AdaGroupNormSiLU,
    GroupNorm,
    GroupNormSiLU,
    ada_group_norm,
    ada_group_norm_reference,
)
from fastdiff.ops.ada_group_norm.reference import ada_group_norm_backward_reference, group_stats_reference

KERNEL_MODULE = "fastdiff.ops.ada_group_norm.triton_kernel"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
LOW = (torch.float32, torch.float16, torch.bfloat16)
# what the kernel tests set for themselves (tk), as this run started
KERNEL_ENV = {k: os.environ.get(k) for k in ("FASTDIFF_OPS", "FASTDIFF_OPS_POISON", "TRITON_INTERPRET")}


@pytest.fixture(scope="module")
def _interpreted_kernels():
    """triton_kernel with interpreted kernels, imported once for the module.

    TRITON_INTERPRET is read when the kernels are decorated (at import), so it is set for the
    import only if the kernel module was not imported yet; on a CUDA machine the GPU tests cover
    the kernels.
    """
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    with pytest.MonkeyPatch.context() as mp:
        if not triton_interpret():
            if HAS_CUDA or KERNEL_MODULE in sys.modules:
                pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 set before triton_kernel is imported")
            mp.setenv("TRITON_INTERPRET", "1")
        from triton.runtime.interpreter import InterpretedFunction

        from fastdiff.ops.ada_group_norm import triton_kernel

    if not isinstance(triton_kernel._fwd_kernel, InterpretedFunction):
        pytest.skip("triton_kernel was imported without TRITON_INTERPRET=1")
    return triton_kernel


@pytest.fixture
def tk(_interpreted_kernels, monkeypatch):
    """triton_kernel, with the ops sending CPU tensors to its interpreted kernels and poisoning
    their outputs for this test alone: set for the module, FASTDIFF_OPS=triton held for every
    later test of the file, which then ran the kernels where it meant the CPU's paths."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTDIFF_OPS_POISON", "1")
    monkeypatch.setenv("FASTDIFF_OPS", "triton")  # these tests are about the kernels
    return _interpreted_kernels


def test_the_kernel_import_shared_by_the_module_leaves_the_environment_alone(_interpreted_kernels):
    """The module-scoped ``tk`` set FASTDIFF_OPS=triton (and poisoning) until the file ended:
    every later test without ``tk`` ran the interpreted kernels where it meant the CPU's paths.
    The module shares only the import; ``tk`` sets the environment per test."""
    assert {k: os.environ.get(k) for k in KERNEL_ENV} == KERNEL_ENV


def make_inputs(
    shape, groups, dtype, *, affine=True, ada=True, channels_last=False, device="cpu", pdtype=None, mean=0.0
):
    """Random x, weight, bias, scale, shift (never zeros); params in pdtype (default: dtype)."""
    pdtype = pdtype or dtype
    n, c = shape[0], shape[1]
    per_channel = torch.randn(1, c, *[1] * (len(shape) - 2), device=device)
    x = torch.randn(shape, device=device) * 2 + mean + per_channel
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (1 + 0.5 * torch.randn(c, device=device)).to(pdtype) if affine else None
    b = (0.5 * torch.randn(c, device=device)).to(pdtype) if affine else None
    sc = (0.5 * torch.randn(n, c, device=device)).to(pdtype) if ada else None
    sh = (0.5 * torch.randn(n, c, device=device)).to(pdtype) if ada else None
    return x, w, b, sc, sh


def to64(ts):
    return [None if t is None else t.double() for t in ts]


def ref_grads(inputs, groups, act, dy):
    """Autograd grads through the reference chain (x, w, b, scale, shift; None where absent)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = ada_group_norm_reference(leaves[0], groups, *leaves[1:], 1e-5, act)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy.to(y.dtype)))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def check_kernel(mod, inputs, groups, act, what, num_chunks=None, grads=True, factor=3.0):
    """Kernel forward (+ backward) vs the float64 reference, with the low-precision reference's error."""
    x = inputs[0]
    y, mean, rstd = mod.forward(x, groups, *inputs[1:], 1e-5, act, num_chunks=num_chunks)
    assert y.dtype == x.dtype and y.stride() == x.stride(), what
    m64, r64 = group_stats_reference(x.double(), groups)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), r64, rtol=1e-5, atol=1e-5)
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    y64, g64 = ref_grads(to64(inputs), groups, act, dy.double())
    ylp, glp = ref_grads(inputs, groups, act, dy)
    assert_close_to_reference(y, y64, ylp, factor, floor_ulps=1.0, what=f"{what} y")
    if not grads:
        return
    got = mod.backward(dy, x, groups, *inputs[1:], mean, rstd, act, num_chunks=num_chunks)
    assert got[0].stride() == x.stride()
    for name, g, r64_, rlp, t in zip(("dx", "dweight", "dbias", "dscale", "dshift"), got, g64, glp, inputs):
        if t is None:
            assert g is None, name
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        # fp32 sums over many elements: allow a floor relative to the summed magnitudes
        assert_close_to_reference(g, r64_, rlp, factor, floor_ulps=8.0, what=f"{what} {name}")
    # by x alone (classifier guidance): the same dx, no parameter grads
    alone = mod.backward(
        dy, x, groups, *inputs[1:], mean, rstd, act, param_grads=False, num_chunks=num_chunks
    )
    assert torch.equal(alone[0], got[0]) and alone[1:] == (None,) * 4, what


# (shape, groups, options): 96 channels/32 groups (3 per group), 1x1, odd HxW, 3D, batch 1 and 3,
# more than 64 channels in one group (several channel tiles), channels_last.
CASES = [
    ((1, 96, 7, 7), 32, dict()),
    ((1, 8, 1, 1), 4, dict()),
    ((2, 12, 5, 9), 3, dict(ada=False)),
    ((3, 8, 13), 2, dict(affine=False)),
    ((1, 160, 3, 3), 1, dict()),
    ((2, 96, 5, 5), 32, dict(channels_last=True)),
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-g{c[1]}-{','.join(c[2]) or 'ada'}")
def test_kernel_matches_reference(tk, case, dtype):
    shape, groups, opts = case
    inputs = make_inputs(shape, groups, dtype, **opts)
    for act in ("silu", None) if dtype == torch.float32 else ("silu",):
        check_kernel(tk, inputs, groups, act, f"{shape} {dtype} {act}")


def test_kernel_mixed_dtypes(tk):
    """ADM fp16: activations and scale/shift fp16, GroupNorm weight/bias fp32."""
    x, w, b, sc, sh = make_inputs((2, 64, 6, 6), 32, torch.float16, pdtype=torch.float32)
    check_kernel(tk, (x, w, b, sc.half(), sh.half()), 32, "silu", "mixed")


def test_kernel_strided_weight_and_bias(tk):
    """weight and bias as strided [C] views (columns of one [C, 2] tensor): the kernels read
    them by channel, not as if they were dense (channel 1 read element 1 of the storage)."""
    x, w, b, sc, sh = make_inputs((2, 8, 3, 3), 4, torch.float32)
    wb = torch.stack([w, b], dim=1)
    assert wb[:, 0].stride() == (2,)
    check_kernel(tk, (x, wb[:, 0], wb[:, 1], sc, sh), 4, "silu", "strided weight/bias")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("resident", [0, 2048], ids=["tiled", "resident"])
def test_split_path(tk, monkeypatch, channels_last, resident):
    """Chunks (not tile-aligned) with several tiles each, and their merges, vs the unsplit path,
    both tiled (per-element Welford across tiles) and resident (the group is one tile)."""
    monkeypatch.setattr(tk, "_TILE_ELEMS", 32)
    monkeypatch.setattr(tk, "_RESIDENT_ELEMS", resident)
    inputs = make_inputs((1, 16, 9, 11), 4, torch.float32, channels_last=channels_last)
    assert tk._plan(inputs[0], 4, 4, 99, 1)[-1] == bool(resident)
    for k in (1, 3):
        check_kernel(tk, inputs, 4, "silu", f"chunks={k}", num_chunks=k)


def test_tiled_channel_tail(tk, monkeypatch):
    """Groups wider than a channel tile (80 = 64 + a 16-row tail) with a partial last position tile."""
    monkeypatch.setattr(tk, "_TILE_ELEMS", 128)
    monkeypatch.setattr(tk, "_RESIDENT_ELEMS", 0)
    assert tk._tiles(80, 15) == (64, 2)
    inputs = make_inputs((2, 80, 3, 5), 1, torch.float32, mean=50.0)
    check_kernel(tk, inputs, 1, "silu", "channel tail")


def test_split_heuristic(tk):
    """Batch 1, 256x256, 256 channels, 32 groups splits to fill an H100; a big batch does not."""
    _, ts = tk._tiles(8, 256 * 256)
    k, chunk = tk._chunks(132, 32, 8, 256 * 256, ts, None)
    assert k > 8 and chunk % ts == 0 and (k - 1) * chunk < 256 * 256 <= k * chunk
    assert tk._chunks(132, 32 * 32, 8, 64 * 64, ts, None)[0] == 1
    assert tk._chunks(132, 32, 4, 8 * 8, 64, None)[0] == 1  # small groups: a split would not pay
    assert tk._chunks(1, 1, 4, 10, 4, 50) == (10, 1)  # forced, clamped to one position per chunk


@pytest.mark.parametrize(
    "num_chunks,resident", [(1, 0), (1, 2048), (4, 0)], ids=["tiled", "resident", "split"]
)
def test_large_mean_statistics(tk, monkeypatch, num_chunks, resident):
    """x = 1000 + noise: E[x^2] - E[x]^2 in fp32 would lose the variance; Welford/Chan keep it."""
    monkeypatch.setattr(tk, "_TILE_ELEMS", 64)
    monkeypatch.setattr(tk, "_RESIDENT_ELEMS", resident)
    x = 1000 + torch.randn(2, 8, 16, 16)
    y, mean, rstd = tk.forward(x, 2, None, None, None, None, 1e-5, None, num_chunks=num_chunks)
    m64, r64 = group_stats_reference(x.double(), 2)
    torch.testing.assert_close(rstd.double(), r64, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-7, atol=0)
    ref = ada_group_norm_reference(x.double(), 2, activation=None)
    assert (y.double() - ref).abs().max() < 2e-4


def test_poison_catches_unwritten(tk):
    """The poisoning that every kernel comparison relies on is active."""
    from fastdiff.ops._backend import new_output

    assert torch.isnan(new_output(torch.empty(3))).all() and torch.isnan(new_output((2,))).all()


def test_public_op_runs_kernel_gradcheck(tk):
    """gradcheck in float64 through the public op; in the interpreter fp64 runs the Triton kernels."""
    from fastdiff.ops.ada_group_norm.function import _pick_kernel

    x, w, b, sc, sh = (t.double().requires_grad_() for t in make_inputs((2, 6, 3, 2), 3, torch.float64))
    assert _pick_kernel(x, 3) is tk
    op = lambda *a: ada_group_norm(a[0], 3, *a[1:])  # noqa: E731
    assert torch.autograd.gradcheck(op, (x, w, b, sc, sh), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda x_, b_: ada_group_norm(x_, 3, None, b_, activation=None), (x, b), fast_mode=True
    )


def test_public_op_double_backward(tk):
    """create_graph=True (a gradient penalty) differentiates the gradient again, as nn.GroupNorm's
    does; the kernels' backward op has no derivative, so it comes from the reference's graph."""
    x, w, b, sc, sh = (t.requires_grad_() for t in make_inputs((1, 4, 3), 2, torch.float64))
    op = lambda x_, w_, sc_: ada_group_norm(x_, 2, w_, b.detach(), sc_, sh.detach())  # noqa: E731
    assert torch.autograd.gradgradcheck(op, (x, w, sc))


def test_torch_func_grad_eager_and_compiled(tk):
    """torch.func.grad (the compile engine's classifier gradient, one graph) cannot see a custom
    op's autograd (pytorch/pytorch#168393): inside it the op runs on plain PyTorch."""
    x, w, b, sc, sh = make_inputs((2, 8, 3, 5), 4, torch.float32)

    def loss(x_):
        return ada_group_norm(x_, 4, w, b, sc, sh).square().sum()

    want, got = func_grad_and_autograd(loss, x)
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)


def test_compiled_op_reaches_the_kernel(tk):
    """While torch.compile traces, the op outside a torch.func transform is the kernels' custom op
    (the compile engine's UNet) and inside torch.func.grad plain PyTorch (its classifier gradient);
    dynamo's view of the functorch stack once sent both to plain PyTorch."""
    x, w, b, sc, sh = make_inputs((2, 8, 3, 5), 4, torch.float32)

    def norm(x_):
        return ada_group_norm(x_, 4, w, b, sc, sh)

    def step(x_):
        return norm(x_), torch.func.grad(lambda t: norm(t).square().sum())(x_)

    (y, g), targets = compiled_call_targets(step, x)
    assert [t for t in targets if t.startswith("fastdiff.")] == ["fastdiff.ada_group_norm"]
    assert any("group_norm" in t and not t.startswith("fastdiff.") for t in targets)
    want_y, want_g = step(x)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["dual", "jvp"])
def test_forward_mode_ad(tk, how):
    """Forward-mode AD (dual tensors, torch.func.jvp) gets the reference's tangent: the custom op
    has no forward derivative, and its output silently carried no tangent."""
    import torch.autograd.forward_ad as fwAD

    x, w, b, sc, sh = make_inputs((2, 8, 3, 3), 4, torch.float32)
    tx, tsc = torch.randn_like(x), torch.randn_like(sc)

    def tangent(op):
        if how == "jvp":
            return torch.func.jvp(lambda x_, s_: op(x_, 4, w, b, s_, sh), (x, sc), (tx, tsc))[1]
        with fwAD.dual_level():
            return fwAD.unpack_dual(op(fwAD.make_dual(x, tx), 4, w, b, fwAD.make_dual(sc, tsc), sh)).tangent

    got = tangent(ada_group_norm)
    assert got is not None
    torch.testing.assert_close(got, tangent(ada_group_norm_reference), rtol=1e-5, atol=1e-5)


def test_public_op_asks_for_parameter_grads_only_when_needed(tk, monkeypatch):
    """Guidance differentiates by x alone (frozen weights, emb-derived scale/shift): the backward
    then skips the parameter grads; training still gets all of them."""
    asked = []
    backward = tk.backward

    def spy(*args, param_grads, **kw):
        asked.append(param_grads)
        return backward(*args, param_grads=param_grads, **kw)

    monkeypatch.setattr(tk, "backward", spy)
    x, w, b, sc, sh = make_inputs((2, 8, 4, 4), 2, torch.float32)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(ada_group_norm(x, 2, w, b, sc, sh).square().sum(), x)
    assert asked == [False]
    w.requires_grad_()
    dx2, dw = torch.autograd.grad(ada_group_norm(x, 2, w, b, sc, sh).square().sum(), (x, w))
    assert asked == [False, True]
    lx, lw = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = torch.autograd.grad(ada_group_norm_reference(lx, 2, lw, b, sc, sh).square().sum(), (lx, lw))
    for got, expect in zip((dx, dx2, dw), (ref[0], ref[0], ref[1])):
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


KERNELS = ("_stats_kernel", "_fwd_kernel", "_bwd_sums_kernel", "_bwd_dx_kernel", "_param_grads_kernel")


@pytest.mark.parametrize("shape", [(8, 1024, 16, 16), (8, 256, 128, 128)], ids=["unsplit", "split"])
def test_backward_launches(tk, monkeypatch, shape):
    """ImageNet-256's AdaGN at batch 8 on an H100 (meta tensors, launches recorded): the gradient by x
    alone is the dx kernel (after the chunk sums when split) and no torch op; the parameter grads
    add one launch, not a chain of small torch ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    log = []

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append(self.name)

    class TorchOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            copies = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
            if torch.Tag.pointwise in func.tags or torch.Tag.reduction in func.tags or func in copies:
                log.append(str(func))
            return func(*args, **(kwargs or {}))

    for name in KERNELS:
        monkeypatch.setattr(tk, name, Launch(name))
    monkeypatch.setattr(tk, "_sms", lambda _x: 132)
    monkeypatch.setenv("FASTDIFF_OPS_POISON", "0")
    c = shape[1]
    x = torch.empty(shape, dtype=torch.float16, device="meta")
    w = b = torch.empty(c, device="meta")
    sc, sh = torch.empty(shape[0], 2 * c, dtype=torch.float16, device="meta").chunk(2, 1)
    _, mean, rstd = tk.forward(x, 32, w, b, sc, sh, 1e-5, "silu")
    split = ["_bwd_sums_kernel"] if shape[2] == 128 else []
    for param_grads, extra in ((False, []), (True, ["_param_grads_kernel"])):
        log.clear()
        with TorchOps():
            tk.backward(torch.empty_like(x), x, 32, w, b, sc, sh, mean, rstd, "silu", param_grads=param_grads)
        assert log == [*split, "_bwd_dx_kernel", *extra], param_grads


def test_public_op_layouts(tk):
    """channels_last in -> channels_last out; permuted layouts; ADM's [N, C, 1, 1] and [1, C] scale."""
    x, w, b, sc, sh = make_inputs((2, 16, 5, 6), 4, torch.float32, channels_last=True)
    y = ada_group_norm(x, 4, w, b, sc, sh)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = ada_group_norm_reference(x, 4, w, b, sc, sh)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    xp = x.contiguous().transpose(2, 3)  # W/H swapped in memory: the op copies it
    torch.testing.assert_close(
        ada_group_norm(xp, 4, w, b, sc, sh),
        ada_group_norm_reference(xp, 4, w, b, sc, sh),
        rtol=1e-5,
        atol=1e-5,
    )
    y4 = ada_group_norm(x, 4, w, b, sc[:, :, None, None], sh[:, :, None, None])
    torch.testing.assert_close(y4, y)
    y1 = ada_group_norm(x, 4, w, b, sc[:1], sh[:1])
    ref1 = ada_group_norm_reference(x, 4, w, b, sc[:1].expand(2, -1), sh[:1].expand(2, -1))
    torch.testing.assert_close(y1, ref1)


def test_public_op_backward_expanded_grad(tk):
    """y.sum().backward() hands the kernel an all-zero-stride dy; [1, C] scale sums its grad over N."""
    x, w, b, sc, sh = (t.requires_grad_() for t in make_inputs((2, 8, 4, 4), 2, torch.float32))
    sc1 = sc[:1].detach().requires_grad_()
    ada_group_norm(x, 2, w, b, sc1, sh).sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, sc1, sh)]
    lx, lw, lb, lsc, lsh = leaves
    ada_group_norm_reference(lx, 2, lw, lb, lsc.expand(2, -1), lsh).sum().backward()
    for got, ref in zip((x, w, b, sc1, sh), leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-4)


def test_opcheck(tk):
    x, w, b, sc, sh = make_inputs((2, 4, 3, 3), 2, torch.float32)
    op = torch.ops.fastdiff.ada_group_norm.default
    torch.library.opcheck(op, (x, 2, w, b, sc, sh, 1e-5, "silu"))
    torch.library.opcheck(op, (x, 2, None, None, None, None, 1e-5, None))


def test_export_keeps_the_op(tk):
    """torch.export traces through the custom op (fake implementation) and keeps it as one node
    (where the kernel runs: on the CPU only in the interpreter, which tk sets up)."""
    m = AdaGroupNormSiLU(2, 8)
    x, sc, sh = torch.randn(2, 8, 4, 4), torch.randn(2, 8), torch.randn(2, 8)
    ep = torch.export.export(m, (x, sc, sh))
    assert "fastdiff.ada_group_norm" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x, sc, sh), m(x, sc, sh))


# --- reference path and modules (no kernel needed) -------------------------------------------


def test_reference_path_gradcheck(monkeypatch):
    """FASTDIFF_OPS=reference: the op runs the reference and its closed-form backward."""
    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    x, w, b, sc, sh = (t.requires_grad_() for t in make_inputs((2, 6, 3, 2), 3, torch.float64))
    assert torch.autograd.gradcheck(lambda *a: ada_group_norm(a[0], 3, *a[1:]), (x, w, b, sc, sh))


@pytest.mark.parametrize("scale_grad", [False, True], ids=["guidance", "training"])
def test_reference_path_copies_nothing_under_autograd(monkeypatch, scale_grad):
    """Where autograd records (the classifier's forward under guidance; a trained AdaGN's scale),
    the CPU chain makes no copy: an in-place SiLU (or scale, when the scale needs a gradient)
    made autograd clone the value it overwrote, a copy more than the out-of-place op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    x, w, b, sc, sh = make_inputs((2, 8, 4, 4), 4, torch.float32)
    x, sc = x.requires_grad_(), sc.requires_grad_(scale_grad)
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        y = ada_group_norm(x, 4, w, b, sc, sh)
        grads = torch.autograd.grad(y.square().sum(), (x, sc) if scale_grad else (x,))
    assert not {"clone", "copy_"} & set(ops), ops
    lx, lsc = x.detach().double().requires_grad_(), sc.detach().double().requires_grad_(scale_grad)
    y64 = F.group_norm(lx, 4, w.double(), b.double()) * (1 + lsc[:, :, None, None])
    y64 = F.silu(y64 + sh.double()[:, :, None, None])
    ref = torch.autograd.grad(y64.square().sum(), (lx, lsc) if scale_grad else (lx,))
    for got, expect in zip(grads, ref):
        torch.testing.assert_close(got, expect.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_cpu_path_runs_only_the_chain(monkeypatch, mode):
    """An fp32 AdaGN on the CPU dispatches the chain's five ops and nothing more: no no-op casts,
    no reshapes of ADM's [N, C, 1, 1] chunks to [N, C] and back, no torch.promote_types (each a
    dispatch of ~1 us, about half of a batch-1 norm's cost, 46 norms a forward of the bundled
    model); the same numbers as the chain written out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setenv("FASTDIFF_OPS", mode)
    x, w, b, _, _ = make_inputs((1, 64, 2, 2), 32, torch.float32)
    scale, shift = torch.randn(1, 128, 1, 1).chunk(2, 1)  # ADM's emb_out.chunk(2, dim=1)
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with Ops():
            y = ada_group_norm(x, 32, w, b, scale, shift)
        want = F.silu(F.group_norm(x, 32, w, b) * (1 + scale) + shift)
    assert ops == ["native_group_norm", "add", "mul_", "add_", "silu_"]
    assert torch.equal(y, want)


def test_reference_path_bias_without_weight(monkeypatch):
    """A bias without a weight is differentiable on the CPU path too (F.group_norm's own CPU
    backward fails there: "tensor does not have a device")."""
    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    x, _, b, _, _ = make_inputs((2, 4, 3), 2, torch.float64, ada=False)
    x, b = x.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, b_: ada_group_norm(x_, 2, None, b_), (x, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape, affine, ada, act",
    [
        ((2, 8, 4, 4), True, True, "silu"),
        ((2, 8, 3, 5), True, False, "silu"),
        ((2, 8, 3, 5), False, False, None),
        ((2, 6, 7), True, True, None),  # [B, C, T] with C innermost: an attention block's view
    ],
    ids=["ada", "affine", "plain", "3d"],
)
def test_channels_last_inference_path_matches_the_reference(monkeypatch, shape, affine, ada, act, dtype):
    """A channels-last CPU x that no gradient is recorded for (a channels-last UNet's sampling
    pass) takes the channels-last path: the reference's values to float rounding, in x's layout.
    Under autograd, and under FASTDIFF_OPS=reference, the reference runs."""
    from fastdiff.ops.ada_group_norm import function

    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    x, w, b, sc, sh = make_inputs(shape, 2, dtype, affine=affine, ada=ada, mean=3.0)
    x = x.mT.contiguous().mT if x.dim() == 3 else x.to(memory_format=torch.channels_last)
    taken = []
    spy = function.ada_group_norm_channels_last
    monkeypatch.setattr(function, "ada_group_norm_channels_last", lambda *a: taken.append(1) or spy(*a))
    with torch.no_grad():
        y = ada_group_norm(x, 2, w, b, sc, sh, activation=act)
    assert taken and y.dtype == x.dtype and y.stride() == x.stride()
    want = ada_group_norm_reference(x.double(), 2, *to64((w, b, sc, sh)), activation=act)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    taken.clear()
    y = ada_group_norm(x.requires_grad_(), 2, w, b, sc, sh, activation=act)
    assert not taken and y.grad_fn is not None
    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    with torch.no_grad():
        ada_group_norm(x, 2, w, b, sc, sh, activation=act)
    assert not taken


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_cpu_paths_skip_the_kernel_checks(monkeypatch, channels_last):
    """A CPU tensor no kernel is asked for (FASTDIFF_OPS auto or reference) goes to its PyTorch
    path without _has_kernel's checks (about as much as the norm itself at batch 1),
    and [N, C] scale and shift are passed on as they are: the same values, bit for bit, as the
    path called directly. FASTDIFF_OPS=triton still asks the kernel checks."""
    from fastdiff.ops.ada_group_norm import function
    from fastdiff.ops.ada_group_norm.channels_last import ada_group_norm_channels_last

    x, w, b, sc, sh = make_inputs((1, 8, 4, 4), 2, torch.float32, ada=True)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    asked = []
    monkeypatch.setattr(function, "_has_kernel", lambda t: asked.append(1) or False)
    path = ada_group_norm_channels_last if channels_last else ada_group_norm_reference
    for mode in ("auto", "reference"):
        monkeypatch.setenv("FASTDIFF_OPS", mode)
        with torch.no_grad():
            y = ada_group_norm(x, 2, w, b, sc, sh)
            want = (ada_group_norm_reference if mode == "reference" else path)(
                x, 2, w, b, sc, sh, 1e-5, "silu"
            )
        assert torch.equal(y, want) and not asked
    assert function._per_sample(sc, 1, 8) is sc
    monkeypatch.setenv("FASTDIFF_OPS", "triton")
    monkeypatch.setattr(sys.modules["fastdiff.ops._backend"], "triton_interpret", lambda: True)
    monkeypatch.setattr(function, "triton_missing", lambda t: None)
    with torch.no_grad():
        ada_group_norm(x, 2, w, b, sc, sh)
    assert asked


def test_channels_last_inference_path_keeps_eps_where_it_matters():
    """Groups whose variance (1e-6) is below eps (1e-5), where eps sets the scale: random inputs
    of variance ~4 could not tell a wrong eps (only a 100-step variant vector, minutes in, did)."""
    x, w, b, sc, sh = make_inputs((2, 8, 4, 4), 2, torch.float32)
    x = (x * 5e-4).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = ada_group_norm(x, 2, w, b, sc, sh, activation="silu")
    want = ada_group_norm_reference(x.double(), 2, *to64((w, b, sc, sh)), activation="silu")
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_channels_last_inference_path_under_cpu_autocast():
    """Under CPU autocast the channels-last path's statistics stay fp32 (autocast ran its
    matmuls in fp16, where the sums of squares overflowed: NaN from a UNet under fp16 autocast)."""
    x, w, b, sc, sh = make_inputs((2, 8, 16, 16), 2, torch.float16, channels_last=True)
    x = x * 30
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        y = ada_group_norm(x, 2, w, b, sc, sh)
    want = ada_group_norm_reference(x.double(), 2, *to64((w, b, sc, sh)))
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2)


def test_reference_path_channels_last_parameter_grads_only():
    """channels_last x that needs no gradient, weight and bias that do (norms trained on frozen
    features): F.group_norm's own CPU backward segfaults there, so this runs in a child process."""
    import subprocess

    code = (
        "import torch\n"
        "from fastdiff.ops import ada_group_norm\n"
        "x = torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last)\n"
        "w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)\n"
        "y = ada_group_norm(x, 2, w, b)\n"
        "assert y.is_contiguous(memory_format=torch.channels_last)\n"
        "dw, db = torch.autograd.grad(y.square().sum(), (w, b))\n"
        "lw, lb = w.detach().requires_grad_(), b.detach().requires_grad_()\n"
        "ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.contiguous(), 2, lw, lb))\n"
        "want = torch.autograd.grad(ref.square().sum(), (lw, lb))\n"
        "torch.testing.assert_close((dw, db), want)\n"
    )
    env = {**os.environ, "FASTDIFF_OPS": "reference"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_modules_are_one_call_each_under_fx_symbolic_trace():
    """torch.fx.symbolic_trace (feature extractors, FX quantization) sees each module as one call,
    as it sees nn.GroupNorm: traced into, the op met a Proxy ("ada_group_norm: x must be a
    torch.Tensor, got Proxy"). The GraphModule computes what the network does."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn, self.plain, self.ada = GroupNormSiLU(2, 4), GroupNorm(2, 4), AdaGroupNormSiLU(2, 4)

        def forward(self, x, emb):
            return self.ada(self.plain(self.gn(x)), emb[:, :4], emb[:, 4:])

    net, x, emb = Net(), torch.randn(2, 4, 3, 3), torch.randn(2, 8)
    graph = torch.fx.symbolic_trace(net)
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and "ada_group_norm" in n.name]
    assert len(calls) == 3
    torch.testing.assert_close(graph(x, emb), net(x, emb), rtol=0, atol=0)


class _Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn, self.plain, self.ada = GroupNormSiLU(2, 4), GroupNorm(2, 4), AdaGroupNormSiLU(2, 4)

    def forward(self, x, emb):
        return self.ada(self.plain(self.gn(x)), emb[:, :4], emb[:, 4:])


def _script_and_trace(net, inputs, other_inputs):
    """net scripted and traced (on ``inputs``), each saved and loaded back: their outputs on
    ``other_inputs`` (another shape), and the traced graph's text. The trace skips its check
    under the interpreter, which refuses the kernels the check's eager rerun launches."""
    check = not (triton_interpret() and os.environ.get("FASTDIFF_OPS") == "triton")
    scripted, traced = torch.jit.script(net), torch.jit.trace(net, inputs, check_trace=check)
    loaded = []
    for module in (scripted, traced):
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        loaded.append(torch.jit.load(buf))
    return [m(*other_inputs) for m in loaded], str(traced.inlined_graph)


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_modules_script_and_trace():
    """torch.jit.script of a network holding the modules failed ("Don't support conversion in
    JoinedStr": TorchScript compiled the op's checks); scripted it runs the reference, and both
    TorchScript forms, saved and loaded back, compute what the network does at other shapes.
    The trace warns of nothing (the op's size checks and F.group_norm's each gave TracerWarnings)."""
    torch.manual_seed(0)
    net = _Norms()
    outs, _ = _script_and_trace(
        net,
        (torch.randn(2, 4, 3, 3), torch.randn(2, 8)),
        (x := torch.randn(3, 4, 5, 2), emb := torch.randn(3, 8)),
    )
    for out in outs:
        torch.testing.assert_close(out, net(x, emb), rtol=1e-5, atol=1e-5)


class _ConvNorms(nn.Module):
    """The norms after layers with weights, as in a user's network: their inputs and the AdaGN's
    scale and shift need a gradient while grad mode is on."""

    def __init__(self):
        super().__init__()
        self.conv, self.emb = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(4, 16)
        self.gn, self.ada = GroupNormSiLU(4, 8), AdaGroupNormSiLU(2, 8)

    def forward(self, x, emb):
        scale, shift = self.emb(emb).chunk(2, dim=1)
        return self.ada(self.gn(self.conv(x)), scale, shift)


@pytest.mark.parametrize("channels_last", [False, True])
def test_trace_with_its_default_check(monkeypatch, channels_last):
    """torch.jit.trace checks a trace by tracing again under no_grad: the reference's in-place
    SiLU and scale and its contiguous copy, each picked by requires_grad, made the two graphs
    differ (TracingCheckError from torch.jit.trace(net, x) for any network of trainable norms)."""
    monkeypatch.setenv("FASTDIFF_OPS", "auto")  # the check reruns the net eagerly: no interpreted kernels
    torch.manual_seed(0)
    net, x, emb = _ConvNorms(), torch.randn(2, 3, 5, 5), torch.randn(2, 4)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    for mode in (net.train, net.eval):
        traced = torch.jit.trace(mode(), (x, emb))
        torch.testing.assert_close(traced(x, emb), net(x, emb))


@pytest.mark.parametrize("edit", ["x", "weight", "bias", "scale", "shift"])
def test_kernel_path_refuses_inputs_edited_in_place_before_backward(tk, edit):
    """The custom op saves its inputs with their versions: an input edited in place between the
    forward and the backward is torch's "modified by an inplace operation" error (nn.GroupNorm's
    own for x and weight), never a gradient of the edited values."""
    torch.manual_seed(0)
    leaves = [torch.randn(*shape, requires_grad=True) for shape in ((2, 4, 3, 3), (4,), (4,), (2, 4), (2, 4))]
    inputs = dict(zip(("x", "weight", "bias", "scale", "shift"), [t * 1 for t in leaves]))
    y = ada_group_norm(inputs["x"], 2, inputs["weight"], inputs["bias"], inputs["scale"], inputs["shift"])
    y.mul_(2)  # the output itself is not saved: editing it is fine
    inputs[edit].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_trace_records_no_custom_op(tk):
    """Where the kernels run, a torch.jit.trace records the reference's native ops: the custom
    op it recorded is unknown wherever the graph is loaded without fastdiff (libtorch)."""
    torch.manual_seed(0)
    net, x, emb = _Norms(), torch.randn(2, 4, 3, 3), torch.randn(2, 8)
    (_, traced_out), graph = _script_and_trace(net, (x, emb), (x, emb))
    assert "fastdiff::" not in graph and "group_norm" in graph
    torch.testing.assert_close(traced_out, net(x, emb), rtol=1e-5, atol=1e-5)


BROKEN_TRITONS = {  # triton/__init__.py -> the error each op names
    "raise ImportError('libtriton.so: cannot open')\n": "ImportError: libtriton.so: cannot open",
    "": "ModuleNotFoundError: No module named 'triton.language'",
}


@pytest.mark.parametrize("init", list(BROKEN_TRITONS))
def test_a_broken_triton_falls_back_with_one_warning_naming_its_error(init, tmp_path):
    """A triton that is present but does not import (a missing shared library) raised its
    ImportError from inside the first op asked for a kernel, and one without triton.language (a
    leftover folder) an AttributeError from torch's dynamo at `import fastdiff.ops`; each op now
    runs its PyTorch path with one warning naming the error, torch.compile still works, and
    FASTDIFF_OPS=triton in a run is one line."""
    import subprocess

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text(init)
    code = (
        "import warnings, torch\n"
        "from fastdiff.ops import GroupNormSiLU, attention\n"
        "assert torch.compile(torch.neg, backend='eager')(torch.ones(1)).item() == -1\n"
        "from fastdiff.ops.attention.sdpa import sdpa_attention\n"
        "from fastdiff.runs.device import check_ops_mode\n"
        "from fastdiff.runs.errors import RunError\n"
        "x, qkv, m = torch.randn(2, 8, 3, 3), torch.randn(2, 12, 5), GroupNormSiLU(4, 8)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        y, a = m(x), attention(qkv, 2)\n"
        "print(sorted(str(w.message) for w in caught))\n"
        "torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4)))\n"
        "torch.testing.assert_close(a, sdpa_attention(qkv, 2, 'new'))\n"
        "try:\n"
        "    check_ops_mode()\n"
        "except RunError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "FASTDIFF_OPS": "triton", "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    why = f"triton does not import ({BROKEN_TRITONS[init]})"
    warned, refused = run.stdout.splitlines()
    assert warned == str(
        [
            f"fastdiff.ops.ada_group_norm: {why}; using the PyTorch reference",
            f"fastdiff.ops.attention: {why}; using PyTorch's SDPA",
        ]
    )
    assert refused == f"FASTDIFF_OPS=triton runs the Triton kernels, but {why}"


@pytest.mark.parametrize("channels_last", [False, True])
def test_vmap_over_scale_and_shift_alone(channels_last):
    """torch.func.vmap over scale/shift with one shared x (a batch of conditionings): h is not
    batched where scale is, so the reference's in-place scale-shift cannot run there."""
    x, w, b, sc, sh = make_inputs((2, 8, 3, 3), 4, torch.float32, channels_last=channels_last)
    scales, shifts = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    got = torch.func.vmap(lambda s, t: ada_group_norm(x, 4, w, b, s, t))(scales, shifts)
    for i in range(3):
        torch.testing.assert_close(got[i], ada_group_norm(x, 4, w, b, scales[i], shifts[i]))


@pytest.mark.parametrize("act", ["silu", None])
def test_closed_form_backward_matches_autograd(act):
    inputs = make_inputs((3, 12, 4, 5), 4, torch.float64, channels_last=True)
    dy = torch.randn(inputs[0].shape, dtype=torch.float64)
    _, expect = ref_grads(inputs, 4, act, dy)
    mean, rstd = group_stats_reference(inputs[0], 4)
    got = ada_group_norm_backward_reference(dy, inputs[0], 4, *inputs[1:], mean, rstd, act)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_reference_is_groupnorm32_chain():
    """fp16: GN (with affine) in fp32, cast, then scale-shift and SiLU in fp16, like guided-diffusion."""
    x, w, b, sc, sh = make_inputs((2, 8, 3, 3), 4, torch.float16, pdtype=torch.float32)
    sc, sh = sc.half(), sh.half()
    h = F.group_norm(x.float(), 4, w, b).half()
    expect = F.silu(h * (1 + sc[:, :, None, None]) + sh[:, :, None, None])
    assert torch.equal(ada_group_norm_reference(x, 4, w, b, sc, sh), expect)


@pytest.mark.parametrize("cls", [GroupNorm, GroupNormSiLU, AdaGroupNormSiLU])
def test_module_state_dict_matches_groupnorm(cls):
    ours, theirs = cls(4, 12, eps=1e-6), nn.GroupNorm(4, 12, eps=1e-6)
    assert isinstance(ours, nn.GroupNorm)
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    theirs.weight.data.normal_()
    theirs.bias.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert cls(4, 12, affine=False).weight is None and cls(4, 12, affine=False).state_dict() == {}


@pytest.mark.parametrize("channels_last", [False, True])
def test_modules_match_torch(channels_last):
    """Through whichever path is active (the kernel under TRITON_INTERPRET=1, else the reference)."""
    theirs = nn.GroupNorm(4, 12)
    theirs.weight.data.normal_()
    theirs.bias.data.normal_()
    x = torch.randn(2, 12, 5, 3) + 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for cls, post in ((GroupNorm, lambda t: t), (GroupNormSiLU, F.silu)):
        m = cls(4, 12)
        m.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(m(x), post(theirs(x)), rtol=1e-5, atol=1e-5)
    m = AdaGroupNormSiLU(4, 12)
    m.load_state_dict(theirs.state_dict())
    emb = torch.randn(2, 24, 1, 1)
    scale, shift = emb.chunk(2, dim=1)
    expect = F.silu(theirs(x) * (1 + scale) + shift)
    torch.testing.assert_close(m(x, scale, shift), expect, rtol=1e-5, atol=1e-5)


def test_module_fp16_input_fp32_params():
    """GroupNorm32 use: fp32 params, fp16 activations -> fp16 output with fp32 statistics."""
    m = GroupNormSiLU(4, 8)
    x = (torch.randn(2, 8, 4, 4) * 30 + 200).half()
    y = m(x)
    assert y.dtype == torch.float16
    ref = F.silu(F.group_norm(x.double(), 4, m.weight.double(), m.bias.double()))
    assert (y.double() - ref).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=str)
def test_modules_under_cpu_autocast_return_what_torch_does(dtype, autocast):
    """The CPU's autocast has no rule for group_norm: nn.GroupNorm returns the input's dtype."""
    x, scale = torch.randn(2, 4, 3, 3, dtype=dtype), torch.randn(2, 4, dtype=dtype)
    with torch.autocast("cpu", dtype=autocast):
        want = nn.GroupNorm(2, 4)(x)
        torch.testing.assert_close(GroupNorm(2, 4)(x), want)
        torch.testing.assert_close(GroupNormSiLU(2, 4)(x), F.silu(want))
        assert (
            AdaGroupNormSiLU(2, 4)(x, scale, scale).dtype
            == GroupNorm(2, 4, keep_dtype=True)(x).dtype
            == dtype
        )


def test_autocast_runs_group_norm_in_fp32_on_every_device_type_but_the_cpu():
    """What ``autocast_input`` assumes, asked of torch's dispatcher: autocast has a rule (its fp32
    list) for group_norm on CUDA, XPU and MPS, and none on the CPU."""
    has_rule = torch._C._dispatch_has_kernel_for_dispatch_key
    assert not has_rule("aten::group_norm", "AutocastCPU")
    assert all(has_rule("aten::group_norm", f"Autocast{d}") for d in ("CUDA", "XPU", "MPS"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("ops_mode", ["auto", "reference"])
def test_modules_under_cuda_autocast_return_what_torch_does(monkeypatch, ops_mode):
    """Under CUDA autocast nn.GroupNorm takes fp16 in and returns fp32 (group_norm is on the fp32
    list); the modules returned fp16 (a custom op has no autocast rule, and the reference casts
    back to the input's dtype). ``keep_dtype`` keeps GroupNorm32's fp16."""
    monkeypatch.setenv("FASTDIFF_OPS", ops_mode)
    torch.manual_seed(0)
    theirs = nn.GroupNorm(32, 64).cuda()
    x, scale = torch.randn(2, 64, 8, 8, device="cuda").half(), torch.randn(2, 64, device="cuda").half()
    with torch.autocast("cuda", dtype=torch.float16):
        want = theirs(x)
        assert want.dtype == torch.float32
        for cls, act in ((GroupNorm, lambda t: t), (GroupNormSiLU, F.silu)):
            m = cls(32, 64).cuda()
            m.load_state_dict(theirs.state_dict())
            torch.testing.assert_close(m(x), act(want), rtol=1e-4, atol=1e-4)
            assert cls(32, 64, keep_dtype=True).cuda()(x).dtype == torch.float16
        ada = AdaGroupNormSiLU(32, 64).cuda()
        assert ada(x, scale, scale).dtype == torch.float32
        assert AdaGroupNormSiLU(32, 64, keep_dtype=True).cuda()(x, scale, scale).dtype == torch.float16


def test_validation_errors():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="divisible"):
        ada_group_norm(x, 4)
    with pytest.raises(ValueError, match="activation"):
        ada_group_norm(x, 3, activation="gelu")
    with pytest.raises(ValueError, match="scale"):
        ada_group_norm(x, 3, scale=torch.randn(3, 6), shift=torch.randn(2, 6))
    with pytest.raises(ValueError, match="weight"):
        ada_group_norm(x, 3, weight=torch.randn(5))


def test_wrong_kinds_of_argument_are_one_type_error():
    """A numpy array, a list or a float where a tensor goes, a float or str group count: one
    TypeError naming the argument (an AttributeError from ``x.dim()``, or group_norm's TypeError
    about its own 'position 2', before); a one-element integer tensor is a count."""
    x = torch.randn(2, 6, 3, 3)
    for kw, message in (
        ({"x": x.numpy()}, "x must be a torch.Tensor, got ndarray"),
        ({"x": x.tolist()}, "x must be a torch.Tensor, got list"),
        ({"scale": 0.5}, "scale must be a torch.Tensor or None, got float"),
        ({"weight": [1.0] * 6}, "weight must be a torch.Tensor or None, got list"),
        ({"num_groups": 3.0}, "num_groups must be an int, got 3.0"),
        ({"num_groups": "3"}, "num_groups must be an int, got '3'"),
    ):
        args = {"x": x, "num_groups": 3, **kw}
        with pytest.raises(TypeError, match=f"ada_group_norm: {message}") as e:
            ada_group_norm(**args)
        assert isinstance(e.value, ValueError)  # still the ops' one error type, OpInputError
    torch.testing.assert_close(ada_group_norm(x, torch.tensor(3)), ada_group_norm(x, 3))


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (1, 4, 1), (1, 4)])
def test_a_group_of_one_value_in_a_batch_of_one_is_refused_on_every_path(tk, monkeypatch, shape):
    """nn.GroupNorm refuses a batch of one whose groups hold one value each (a ValueError); the
    kernels returned the bias for it. Every path refuses it now, before any work, and a batch of
    two (which torch normalizes to the bias) still runs."""
    x, w, b = torch.randn(shape), torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.GroupNorm(4, 4)(x)
    for mode in ("auto", "reference", "triton"):
        monkeypatch.setenv("FASTDIFF_OPS", mode)
        with pytest.raises(
            ValueError, match=r"^ada_group_norm: expected more than 1 value per group, got x "
        ):
            ada_group_norm(x, 4, w, b, activation=None)
        with pytest.raises(ValueError, match="more than 1 value per group"):
            GroupNormSiLU(4, 4)(x)
        two = torch.cat([x, x])
        # torch's x * rstd - mean * rstd rounds by ~1e-5 at rstd = eps ** -0.5; the kernels give b
        expected = F.group_norm(two, 4, w, b)
        torch.testing.assert_close(ada_group_norm(two, 4, w, b, activation=None), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", [GroupNorm, GroupNormSiLU])
def test_module_refuses_what_groupnorm_refuses(cls):
    """The drop-in raises where nn.GroupNorm raises, with the type it raises (RuntimeError; ours is
    a ValueError too) and one message; an integer input is refused, not normalized and truncated."""
    theirs, ours = nn.GroupNorm(2, 4), cls(2, 4)
    for bad in (torch.randn(2, 6, 3), torch.randn(4), torch.ones(2, 4, 3, dtype=torch.long)):
        with pytest.raises(RuntimeError):
            theirs(bad)
        with pytest.raises(RuntimeError, match="ada_group_norm: ") as e:
            ours(bad)
        assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("cls", [GroupNorm, GroupNormSiLU, AdaGroupNormSiLU])
def test_modules_refuse_what_is_no_tensor_in_the_ops_terms(cls):
    """A list or numpy array given to a module was an AttributeError from its autocast step
    ("'list' object has no attribute 'device'", inside fastdiff), not the op's one TypeError."""
    m, x = cls(2, 4), torch.randn(2, 4, 3)
    args = (torch.zeros(2, 4), torch.zeros(2, 4)) if cls is AdaGroupNormSiLU else ()
    for bad, kind in ((x.tolist(), "list"), (x.numpy(), "ndarray")):
        with pytest.raises(TypeError, match=f"^ada_group_norm: x must be a torch.Tensor, got {kind}$"):
            m(bad, *args)


# --- CUDA ------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not HAS_CUDA or not HAS_TRITON or triton_interpret(),
    reason="needs CUDA and triton, with TRITON_INTERPRET unset",
)


@pytest.fixture
def cuda_tk(monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS_POISON", "1")
    from fastdiff.ops.ada_group_norm import triton_kernel

    return triton_kernel


GPU_CASES = CASES + [
    ((1, 256, 256, 256), 32, dict()),  # batch 1 at 256x256: the split path
    ((1, 256, 256, 256), 32, dict(channels_last=True)),
    ((16, 512, 16, 16), 32, dict()),
    ((4, 384, 31, 33), 32, dict(channels_last=True)),
    ((8, 1024, 8, 8), 32, dict()),  # ImageNet-256 batch 8 at 8x8: a resident group of 2048
    ((8, 1024, 16, 16), 32, dict()),  # ... at 16x16: four tiles, one reduction
    ((8, 768, 8, 8), 32, dict(channels_last=True)),  # ImageNet-64 at 8x8: 24 channels padded to 32
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-g{c[1]}-{','.join(c[2]) or 'ada'}")
@pytest.mark.gpu
@needs_gpu
def test_gpu_kernel_matches_reference(cuda_tk, case, dtype):
    shape, groups, opts = case
    inputs = make_inputs(shape, groups, dtype, device="cuda", **opts)
    for act in ("silu", None):
        # factor 4: the GPU's approximate exp/rsqrt add about an ulp over the interpreter's numpy
        check_kernel(cuda_tk, inputs, groups, act, f"cuda {shape} {dtype} {act}", factor=4.0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_chunks", [1, 5, None])
def test_gpu_split_and_large_mean(cuda_tk, num_chunks):
    inputs = make_inputs((1, 256, 128, 128), 32, torch.float32, device="cuda", mean=1000.0)
    check_kernel(cuda_tk, inputs, 32, "silu", f"cuda chunks={num_chunks}", num_chunks=num_chunks, factor=4.0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_op_compile_and_graph():
    """torch.compile(fullgraph) and CUDA-graph capture trace through the custom op."""
    m = AdaGroupNormSiLU(32, 128).cuda()
    x = torch.randn(2, 128, 16, 16, device="cuda", dtype=torch.float16)
    sc, sh = torch.randn(2, 128, device="cuda").half(), torch.randn(2, 128, device="cuda").half()
    eager = m(x, sc, sh)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x, sc, sh), eager)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = m(x, sc, sh)
    g.replay()
    torch.testing.assert_close(out, eager)
    ref = ada_group_norm_reference(x.float(), 32, m.weight, m.bias, sc.float(), sh.float())
    assert (eager.float() - ref).abs().max() < 1e-2
