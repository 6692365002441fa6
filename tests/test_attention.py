"""fastdiff.ops.attention against guided-diffusion's QKVAttention(Legacy) math.

Kernel tests run the Triton kernels on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (set
before triton is imported; CI exports it for the whole suite). Outputs are poisoned with NaN
(``FASTDIFF_OPS_POISON=1``) so an element the kernels forget to write fails. Tolerances scale with
the reference's own error in the same low precision, with a floor of ulps at the result's scale
(``builders.assert_close_to_reference``, as the GroupNorm tests).
"""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
from builders import assert_close_in, compiled_call_targets, func_grad_and_autograd
from torch import nn

from fastdiff.ops._backend import triton_available, triton_interpret
from fastdiff.ops.attention import QKVAttention, QKVAttentionLegacy, attention, attention_reference
from fastdiff.ops.attention import function as attn_function
from fastdiff.ops.attention.reference import backward_reference, forward_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _kernels_runnable() -> bool:
    """CUDA, or the interpreter, which triton picks when a kernel is decorated (module import)."""
    if not triton_available() or not (CUDA or triton_interpret()):
        return False
    from fastdiff.ops.attention import triton_kernel

    return CUDA or type(triton_kernel._fwd_kernel).__name__ == "InterpretedFunction"


KERNEL = _kernels_runnable()
needs_kernel = pytest.mark.skipif(
    not KERNEL,
    reason="Triton kernels need triton and CUDA, or TRITON_INTERPRET=1 exported before triton is imported",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and triton")
# (factor on the reference's own low-precision error, floor in ulps at the result's scale). The
# 16-bit floor is the kernels' own rounding: they cast P and the result to 16 bits, at up to a full
# ulp each in triton's interpreter, whose fp32-to-bf16 cast truncates (CUDA rounds to nearest). Over
# 50 seeds x d 40..128 x T 4..36, fp16's error stayed under 0.8 ulps there, bf16's under 1.6; the
# reference's ranged from 0.2 to 1.8, so 2x it alone (with an absolute floor of 0.02, as before)
# failed bf16 on 79 of those 1000 inputs. fp32 keeps its floor of about 2e-6 at scale 1.
TOL = {torch.float32: (4.0, 16.0), torch.float16: (2.0, 2.0), torch.bfloat16: (2.0, 2.0)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS_POISON", "1")
    monkeypatch.setenv("FASTDIFF_OPS", "triton")  # the kernels, also on the CPU (interpreter)


def _check_fwd_bwd(batch, heads, head_dim, length, order, dtype, device=DEVICE, kernel=True):
    x = torch.randn(batch, 3 * heads * head_dim, length, device=device).to(dtype)
    dout = torch.randn(batch, heads * head_dim, length, device=device).to(dtype)
    assert attn_function._kernel_for(x, heads) == kernel, "the kernel should (not) handle this input"
    xs = {
        "kernel": x.clone().requires_grad_(),
        "lp": x.clone().requires_grad_(),
        "64": x.double().requires_grad_(),
    }
    out = attention(xs["kernel"], heads, order)
    ref_lp = attention_reference(xs["lp"], heads, order)
    ref64 = attention_reference(xs["64"], heads, order)
    assert_close_in(TOL, out, ref64.detach(), ref_lp.detach(), dtype, "out")
    out.backward(dout)
    ref_lp.backward(dout)
    ref64.backward(dout.double())
    assert_close_in(TOL, xs["kernel"].grad, xs["64"].grad, xs["lp"].grad, dtype, "dqkv")


SHAPES = [  # (B, H, d, T)
    (1, 1, 32, 2),
    (2, 2, 48, 49),
    (1, 4, 32, 64),
    (2, 1, 64, 33),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("order", ["new", "legacy"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}d{}T{}".format(*s))
def test_kernel_matches_reference(shape, order, dtype):
    _check_fwd_bwd(*shape, order, dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("order", ["new", "legacy"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 2, 32, 65)], ids=lambda s: "B{}H{}d{}T{}".format(*s))
def test_sdpa_path_matches_reference(monkeypatch, shape, order, dtype):
    """Where no Triton kernel runs (here: the CPU), attention is PyTorch's fused SDPA on 4-D inputs:
    held to the same tolerances as a kernel, forward and backward."""
    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    _check_fwd_bwd(*shape, order, dtype, device="cpu", kernel=False)


@pytest.mark.parametrize("order", ["new", "legacy"])
def test_sdpa_path_takes_a_channels_last_qkv_as_it_is(monkeypatch, order):
    """A qkv whose channels are innermost (a channels-last UNet's, made by a matmul over [B, T, C])
    reaches SDPA without the permuting copy, and its output is the contiguous qkv's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    qkv = torch.randn(2, 9, 3 * 2 * 8).mT  # [B, 3*H*d, T], C innermost
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Ops():
        out = attention(qkv, 2, order)
    assert not {"clone", "copy_"} & set(ops), ops
    torch.testing.assert_close(out, attention(qkv.contiguous(), 2, order), rtol=1e-6, atol=1e-6)
    want = attention_reference(qkv.double(), 2, order)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 96, 40), (1, 2, 32, 300)], ids=["d96", "T300"])
def test_kernel_odd_head_dim_and_long_sequence(shape):
    _check_fwd_bwd(*shape, "legacy" if shape[2] == 96 else "new", torch.float32)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 176, 20), (2, 2, 192, 33)], ids=["d176", "d192"])
@pytest.mark.parametrize("order", ["new", "legacy"])
def test_kernel_fp32_wide_heads_read_in_chunks(shape, order):
    """fp32 at head dim > 128 reads the d-summed dots' operands 32 channels at a time (chunks
    partly and wholly past d): the same numbers as the reference, forward and backward."""
    from fastdiff.ops.attention import triton_kernel

    assert triton_kernel._d_chunk(torch.float32, 256) < 256
    _check_fwd_bwd(*shape, order, torch.float32)


@needs_kernel
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("shape", [(1, 2, 320, 5), (2, 2, 32, 1)], ids=["d320", "T1"])
def test_wide_heads_and_one_position_take_sdpa(monkeypatch, shape, dtype):
    """Heads wider than 256 channels and T = 1 run SDPA: the kernels spill there (and took them)."""
    from fastdiff.ops.attention import triton_kernel

    monkeypatch.setattr(triton_kernel, "forward", lambda *a: pytest.fail("the kernel ran"))
    _check_fwd_bwd(*shape, "legacy", dtype, kernel=False)
    assert attn_function._kernel_for(torch.randn(1, 3 * 2 * 256, 5).to(dtype), 2)


@needs_kernel
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 96, 36), (1, 1, 192, 17), (1, 2, 24, 17), (1, 1, 40, 17), (1, 1, 100, 9), (1, 1, 80, 9)],
    ids=["d96", "d192", "d24", "d40", "d100T9", "d80T9"],
)
def test_kernel_unaligned_shapes_on_their_gpu_tiles(monkeypatch, shape, dtype):
    """T or d not a multiple of 16 (6x6 images, the classifier's pool) take smaller tiles, which fit
    the registers; the interpreter runs them as picked for a GPU (bf16 on its own tiles: its bf16
    dots run upcast, which the interpreter's tile choice goes with), forward and backward. bf16 at
    d = 80, T = 9 (3x3) failed an absolute floor of 0.02: dqkv off by 0.022, 2.4x the reference's
    own error, 1.4 ulps at its scale (the interpreter's bf16 casts truncate)."""
    from fastdiff.ops.attention import triton_kernel

    if dtype != torch.bfloat16:
        monkeypatch.setattr(triton_kernel, "triton_interpret", lambda: False)
    _check_fwd_bwd(*shape, "new", dtype)


def test_unaligned_tiles_where_the_shape_needs_them(monkeypatch):
    """T or d off a multiple of 16 takes the unaligned tiles, except d = 40 / 48 at an aligned T,
    whose 64-channel block keeps the aligned tiles (the unaligned ones, tuned for T = 65, spill
    there in fp32 dQ on sm_90; checked with the offline compile)."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    f32 = torch.float32
    assert tk._config("dq", 40, 64, f32) == tk._CONFIGS[("dq", True, 64)]
    assert tk._config("dq", 48, 256, f32) == tk._CONFIGS[("dq", True, 64)]
    assert tk._config("dq", 64, 65, f32) == tk._UNALIGNED[("dq", True, 64)]
    assert tk._config("dq", 24, 64, f32) == tk._UNALIGNED[("dq", True, 32)]
    # d = 40 at an unaligned T: neither d nor T a multiple of 16 (d = 64's tile spills there)
    assert tk._config("dq", 40, 65, f32) == tk._UNALIGNED_HEADS[("dq", True, 64)]
    assert tk._config("dq", 40, 65, torch.float16) == tk._UNALIGNED[("dq", False, 64)]


def test_fp32_dq_at_head_dims_and_t_off_16_offers_no_8_warps(monkeypatch):
    """fp32 dQ with neither d (33..63) nor T a multiple of 16 keeps its 4-warp 16-row tile in
    autotuning too (8 warps spilled 8 B on sm_80 and 16 B on sm_90 at d = 33..60, T = 33..1025, with
    triton 3.8; offline compile); d = 64 and 16 bits still offer 8, an aligned T keeps its 8-warp tile."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    f32 = torch.float32
    for head_dim, length in itertools.product((33, 40, 44, 60), (33, 65, 100, 1025)):
        assert tk.candidates("dq", head_dim, length, f32) == [(16, 16, 4, 2)], (head_dim, length)
    assert tk.candidates("dq", 64, 65, f32) == [(32, 16, 4, 2), (32, 16, 8, 2)]
    assert tk.candidates("dq", 40, 64, f32) == [(32, 32, 8, 2)]
    assert (32, 32, 8, 2) in tk.candidates("dq", 40, 65, torch.float16)


def test_fp32_forward_at_head_dims_off_16_takes_8_warps(monkeypatch):
    """fp32 forward at head dims 33..63 not a multiple of 16 takes 8 warps at every T (d = 40's
    4-warp tile spilled 8 B on sm_80 at T = 17, 64, 256, 1024; offline compile, triton 3.9 / 3.6);
    d = 48 and 64, dQ and the 16-bit forward keep their tiles."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    f32 = torch.float32
    rows = {17: 32, 36: 64, 64: 64, 65: 64, 1024: 64}
    for head_dim, length in itertools.product((40, 44, 60), rows):
        assert tk.candidates("fwd", head_dim, length, f32) == [(rows[length], 16, 8, 2)], (head_dim, length)
    assert tk._config("fwd", 48, 64, f32) == tk._config("fwd", 64, 64, f32) == (64, 16, 4, 2)
    assert tk._config("dq", 40, 64, f32) == tk._CONFIGS[("dq", True, 64)]
    assert tk._config("fwd", 40, 64, torch.float16) == (64, 64, 8, 3)


def test_16_bit_forward_at_head_dims_under_32_off_16_takes_8_warps(monkeypatch):
    """The 16-bit forward at head dims under 32 not a multiple of 16 takes 8 warps at every T (d = 24's
    4-warp tile spilled 8 B on sm_80 at T = 256 and 1024 with triton 3.6, d = 8's half-rows one on
    sm_90 at T = 17 with 3.9; offline compile); d = 16 and 32 keep 4."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    for dtype, head_dim in itertools.product((torch.float16, torch.bfloat16), (8, 24)):
        assert tk.candidates("fwd", head_dim, 1024, dtype) == [(128, 64, 8, 3), (64, 64, 8, 3)]
        assert tk.candidates("fwd", head_dim, 17, dtype) == [(32, 32, 8, 3), (16, 32, 8, 3)]
        assert tk._config("fwd", head_dim, 9, dtype) == (16, 16, 8, 3)
        assert tk._config("fwd", 16, 1024, dtype) == tk._config("fwd", 32, 1024, dtype) == (128, 64, 4, 3)


def test_16_bit_forward_half_rows_at_d_32_and_t_33_to_63_take_32_keys(monkeypatch):
    """The 16-bit forward's half-rows alternative at d = 32 (and 16), T = 33..63 not a multiple of 16
    takes 32 keys per step with its 32 rows (32 x 64 spilled 16 B on sm_90 with triton 3.6; offline
    compile); the default, the 8-warp alternative, aligned and longer T, 8-warp d = 24 and dQ keep
    their tiles."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    for dtype, head_dim in itertools.product((torch.float16, torch.bfloat16), (16, 32)):
        for length in (33, 36, 47, 63):
            got = tk.candidates("fwd", head_dim, length, dtype)
            assert got == [(64, 64, 4, 3), (32, 32, 4, 3), (64, 64, 8, 3)], (dtype, head_dim, length)
        assert tk.candidates("fwd", head_dim, 48, dtype) == [(64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 8, 3)]
        assert tk.candidates("fwd", head_dim, 65, dtype)[1] == (64, 64, 4, 3)
        assert tk.candidates("dq", head_dim, 36, dtype)[1] == (32, 64, 4, 2)
        assert tk.candidates("fwd", 24, 36, dtype)[1] == (32, 64, 8, 3)


def test_fp32_dq_up_to_32_channels_at_an_unaligned_t_runs_one_stage(monkeypatch):
    """fp32 dQ at head dims up to 32 with T not a multiple of 16 takes one stage (two spilled 8 B on
    sm_90 at d = 32, T = 17..1025, with triton 3.6; offline compile), except at T up to 16, whose
    16-row tile keeps two (one spilled 8 B there on sm_90 with 3.9)."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    f32 = torch.float32
    for head_dim, length in itertools.product((8, 24, 32), (17, 36, 65, 1025)):
        assert tk.candidates("dq", head_dim, length, f32) == [(32, 16, 8, 1)], (head_dim, length)
    for head_dim, length in itertools.product((8, 16, 24, 32), (4, 9, 16)):
        assert tk.candidates("dq", head_dim, length, f32) == [(16, 16, 8, 2)], (head_dim, length)
    assert tk._config("dq", 32, 64, f32) == tk._CONFIGS[("dq", True, 32)]


def test_fp32_dkdv_over_128_channels_at_an_unaligned_t_reads_16_channels_a_step(monkeypatch):
    """fp32 dK/dV at head dims over 128 with T or d not a multiple of 16 sums its d-dots 16 channels
    a step (32 spilled 32 B on sm_80 at d = 144..256, T = 17..1025 off 16, with triton 3.8; offline
    compile); aligned shapes, dQ and the forward keep 32, 16-bit dots the whole head."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    chunks: dict = {}

    class Recorder:  # the backward's launches, on meta tensors: (kernel name, D_CHUNK) per shape
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: chunks.__setitem__(self.name, kw.get("D_CHUNK"))

    for name in ("_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(tk, name, Recorder(name))
    monkeypatch.setattr(tk, "triton_interpret", lambda: False)

    def launched(head_dim, length, dtype=torch.float32):
        qkv = torch.empty(1, 3 * head_dim, length, dtype=dtype, device="meta")
        out = torch.empty(1, head_dim, length, dtype=dtype, device="meta")
        lse = torch.empty(1, length, device="meta")
        tk.backward(out, qkv, out, lse, 1, "new")
        return chunks["_bwd_dkdv_kernel"], chunks["_bwd_dq_kernel"]

    for head_dim, length in itertools.product((144, 192, 200, 256), (17, 65, 1025)):
        assert launched(head_dim, length) == (16, 32), (head_dim, length)
    assert launched(192, 64) == launched(256, 1024) == (32, 32)
    assert launched(128, 65) == (128, 32)
    assert launched(192, 65, torch.float16) == (256, 256)
    assert tk._d_chunk(torch.float32, 256) == 32


def test_sequences_up_to_16_take_their_own_warps(monkeypatch):
    """T up to 16 shrinks the tiles to 16 rows, where 16-bit dQ at head dims 65..128 takes 4 warps
    (8 spilled 8 B on sm_80 at T = 4 or 9) and fp32 forward and dQ at 33..128 take 8 (4 spilled up
    to 24 B on sm_80 or sm_90): offline compile, triton 3.9 and 3.6. 16-bit dK/dV at 65..128 takes
    1 stage (2 spilled 8 B on sm_90 at T = 2, 4, 9, 15 with triton 3.8). T = 17, the other kernels and
    head dims keep their tiles."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    f32 = torch.float32
    for dtype, head_dim in itertools.product((torch.float16, torch.bfloat16), (80, 96, 100, 112, 128)):
        for length in (2, 4, 9, 15, 16):
            where = (dtype, head_dim, length)
            assert tk.candidates("dq", head_dim, length, dtype) == [(16, 16, 4, 2)], where
            assert tk.candidates("dkdv", head_dim, length, dtype) == [(16, 16, 8, 1)], where
        assert tk._config("dq", head_dim, 17, dtype) == tk._UNALIGNED[("dq", False, 128)]
        assert tk._config("dkdv", head_dim, 17, dtype) == tk._UNALIGNED[("dkdv", False, 128)]
        assert tk._config("fwd", head_dim, 9, dtype) == (16, 16, 8, 2)
    for head_dim, length in itertools.product((40, 48, 64, 80, 100, 128), (4, 9, 16)):
        assert tk.candidates("fwd", head_dim, length, f32) == [(16, 16, 8, 2)], (head_dim, length)
    for head_dim, length in itertools.product((40, 48, 64), (4, 9, 16)):
        assert tk.candidates("dq", head_dim, length, f32) == [(16, 16, 8, 2)], (head_dim, length)
    assert tk._config("fwd", 64, 17, f32) == (32, 16, 4, 2)
    assert tk._config("fwd", 32, 9, f32) == (16, 16, 4, 2)
    assert tk._config("dq", 128, 9, f32) == (16, 16, 8, 1)
    assert tk._config("dq", 64, 9, torch.float16) == (16, 16, 4, 2)  # d = 64's unaligned tile


def test_short_sequences_keep_the_default_warps(monkeypatch):
    """T up to 32 shrinks the tiles to 16 or 32 rows, where a 4-warp default's 8-warp alternative
    spills (offline compile: 16-bit dK/dV at d = 8 and dQ at d = 24, T = 17, on sm_90 with triton
    3.6): autotuning there never changes the warp count; longer T still offers 8 warps."""
    pytest.importorskip("triton")
    from fastdiff.ops.attention import triton_kernel as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    shapes = itertools.product(
        (torch.float16, torch.float32), (8, 24, 64, 128), (4, 9, 17, 32), ("fwd", "dkdv", "dq")
    )
    for dtype, head_dim, length, kernel in shapes:
        options = tk.candidates(kernel, head_dim, length, dtype)
        assert {w for _, _, w, _ in options} == {options[0][2]}, (kernel, dtype, head_dim, length)
    assert tk.candidates("dkdv", 8, 33, torch.float16)[1] == (64, 64, 8, 2)


@needs_kernel
@pytest.mark.parametrize("order", ["new", "legacy"])
def test_kernel_bf16(order):
    """In the interpreter the kernels' bf16 dots run upcast (its bf16 tl.dot is wrong); the
    GPU tests below cover native bf16 dots."""
    _check_fwd_bwd(2, 2, 64, 77, order, torch.bfloat16)


@needs_kernel
def test_kernel_strided_input_and_saved_lse():
    """qkv that is a transposed view (channel stride 1) is read in place; lse matches the reference."""
    heads, head_dim, length = 2, 32, 40
    base = torch.randn(2, length, 3 * heads * head_dim, device=DEVICE)
    x = base.transpose(1, 2)
    out, lse = torch.ops.fastdiff.attention(x, heads, "new")
    ref, ref_lse = forward_reference(x.double(), heads, "new")
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=0)
    assert lse.dtype == torch.float32 and lse.shape == (2 * heads, length)


@needs_kernel
def test_kernel_expanded_grad():
    """``out.sum().backward()`` hands the backward a zero-stride gradient."""
    x = torch.randn(1, 3 * 2 * 32, 20, device=DEVICE, requires_grad=True)
    attention(x, 2, "legacy").sum().backward()
    x64 = x.detach().double().requires_grad_()
    attention_reference(x64, 2, "legacy").sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=0)


def test_gradcheck_float64():
    """float64 runs the reference path of the op, checking its backward formula and autograd wiring
    (the kernel grads are compared with float64 reference grads above)."""
    x = torch.randn(1, 3 * 2 * 4, 5, dtype=torch.float64, requires_grad=True)
    for order in ("new", "legacy"):
        assert torch.autograd.gradcheck(lambda t, o=order: attention(t, 2, o), (x,))


def test_double_backward_float64():
    """create_graph=True (a gradient penalty) differentiates the gradient again, as through
    guided-diffusion's einsums; the op's own backward has no derivative."""
    x = torch.randn(1, 3 * 2 * 2, 3, dtype=torch.float64, requires_grad=True)
    for order in ("new", "legacy"):
        assert torch.autograd.gradgradcheck(lambda t, o=order: attention(t, 2, o), (x,))


def test_first_order_records_sdpas_own_backward(monkeypatch):
    """Inside first_order (classifier guidance's gradient by x, never differentiated again) the
    CPU's attention records SDPA's own backward, without _TwiceDifferentiable's inner graph and
    nested autograd.grad; the gradient is the same, bit for bit. Outside it the gradient can
    still be differentiated again (test_double_backward_float64)."""
    from fastdiff.diffusion.guidance import ClassifierGuidance
    from fastdiff.ops.attention.sdpa import first_order

    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    qkv = torch.randn(2, 3 * 2 * 8, 16, requires_grad=True)
    dy = torch.randn(2, 2 * 8, 16)
    for order in ("new", "legacy"):
        twice = attention(qkv, 2, order)
        with first_order():
            plain = attention(qkv, 2, order)
        assert type(twice.grad_fn).__name__ == "_TwiceDifferentiableBackward"
        assert "TwiceDifferentiable" not in type(plain.grad_fn).__name__
        assert torch.equal(twice, plain)
        assert torch.equal(torch.autograd.grad(twice, qkv, dy)[0], torch.autograd.grad(plain, qkv, dy)[0])

    class Classifier(nn.Module):  # logits through one attention, as the ADM classifier's pool
        def forward(self, x, t):
            return attention(x.flatten(2).repeat(1, 3, 1), 1, "new").mean(-1)

    sdpa = sys.modules["fastdiff.ops.attention.sdpa"]
    calls = []
    monkeypatch.setattr(sdpa._TwiceDifferentiable, "apply", lambda *a: calls.append(1))
    x = torch.randn(2, 4, 3, 3)
    gradient = ClassifierGuidance(Classifier(), 2.0)(x, torch.tensor([5, 6]), y=torch.tensor([0, 3]))
    assert gradient.shape == x.shape and not calls


@needs_kernel
@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_onnx_export_of_a_network_whose_ops_run_kernels(dynamo, tmp_path, monkeypatch):
    """A user network with fastdiff's layers exports to ONNX where the ops run kernels (CUDA,
    FASTDIFF_OPS=triton): each op takes its plain PyTorch path inside torch.onnx.export (the
    export failed on "unrecognized namespace fastdiff::ada_group_norm", ONNX having no
    translation for a custom op), and onnxruntime gives the eager numbers."""
    ort = pytest.importorskip("onnxruntime")
    from fastdiff.ops import GroupNormSiLU

    monkeypatch.setenv("FASTDIFF_OPS", "triton")
    net = nn.Sequential(GroupNormSiLU(2, 6), nn.Flatten(2), QKVAttention(1)).to(DEVICE).eval()
    x = torch.randn(2, 6, 3, 3, device=DEVICE)
    with torch.no_grad():
        want = net(x)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), path, dynamo=dynamo, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.cpu().numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want.cpu(), rtol=1e-4, atol=1e-5)


def test_second_derivative_with_torch_func(monkeypatch):
    """torch.func.grad of torch.func.grad (a gradient penalty written with torch.func) ran SDPA,
    whose fused backward has no derivative ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); two grad
    levels take the reference, one keeps SDPA."""
    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    qkv = torch.randn(2, 3 * 2 * 4, 5)

    def penalty(fn):
        def loss(t):
            return fn(t, 2, "legacy").square().sum()

        return torch.func.grad(lambda t: torch.func.grad(loss)(t).square().sum())(qkv)

    torch.testing.assert_close(penalty(attention), penalty(attention_reference), rtol=1e-4, atol=1e-4)


def test_modules_are_one_call_each_under_fx_symbolic_trace():
    """torch.fx.symbolic_trace sees QKVAttention(Legacy) as one call (traced into, the op's
    argument checks met a Proxy); the GraphModule computes what the network does."""
    net = nn.Sequential(nn.Conv1d(4, 12, 1), QKVAttention(2), nn.Conv1d(4, 6, 1), QKVAttentionLegacy(1))
    graph = torch.fx.symbolic_trace(net)
    assert sum(n.op == "call_function" and "attention" in n.name for n in graph.graph.nodes) == 2
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(graph(x), net(x), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("edit", ["qkv", "out"])
def test_kernel_path_refuses_tensors_edited_in_place_before_backward(edit):
    """The custom op saves qkv and its output (as SDPA saves its output) with their versions:
    either edited in place before the backward is torch's "modified by an inplace operation"
    error, never a gradient of the edited values."""
    leaf = torch.randn(2, 3 * 2 * 4, 5, device=DEVICE, requires_grad=True)
    qkv = leaf * 1
    out = attention(qkv, 2)
    (qkv if edit == "qkv" else out).add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_modules_script_and_trace():
    """torch.jit.script of a network holding QKVAttention(Legacy) failed ("Don't support
    conversion in JoinedStr": TorchScript compiled the op's checks); scripted it runs SDPA, a
    trace records no custom op where the kernels run (it would be unknown without fastdiff,
    in libtorch), and both forms compute what the network does at another shape. The trace
    warns of nothing (the check of qkv's channels gave a TracerWarning)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(4, 12, 1), QKVAttention(2), nn.Conv1d(4, 6, 1), QKVAttentionLegacy(1)
    ).eval()
    # the trace's check reruns the network eagerly, where the interpreter refuses the kernels
    traced = torch.jit.trace(net, torch.randn(2, 4, 5), check_trace=not triton_interpret())
    assert "fastdiff::" not in str(traced.inlined_graph)
    x = torch.randn(3, 4, 7)
    for module in (torch.jit.script(net), traced):
        torch.testing.assert_close(module(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["new", "legacy"])
def test_double_backward_on_the_sdpa_path(order, monkeypatch):
    """fp32 on the CPU runs SDPA, whose fused backward has no derivative: a gradient penalty
    raised "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"; it now differentiates like guided-diffusion's einsums. A retained graph still
    takes a second plain backward."""
    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    qkv = torch.randn(2, 3 * 2 * 4, 7, requires_grad=True)
    ref = qkv.detach().requires_grad_()
    grads = []
    for fn, t in ((attention, qkv), (attention_reference, ref)):
        (g,) = torch.autograd.grad(fn(t, 2, order).square().sum(), t, create_graph=True)
        grads += [g, *torch.autograd.grad(g.square().sum(), t)]
    torch.testing.assert_close(grads[:2], grads[2:], rtol=1e-4, atol=1e-5)
    loss = attention(qkv, 2, order).square().sum()
    first = torch.autograd.grad(loss, qkv, retain_graph=True)
    torch.testing.assert_close(torch.autograd.grad(loss, qkv), first, rtol=0, atol=0)
    torch.testing.assert_close(first[0], grads[0].detach(), rtol=1e-4, atol=1e-5)


@needs_kernel
def test_torch_func_grad_eager_and_compiled():
    """torch.func.grad (the compile engine's classifier gradient, one graph) cannot see a custom
    op's autograd (pytorch/pytorch#168393): inside it the op runs on plain PyTorch."""
    qkv = torch.randn(2, 3 * 2 * 16, 16, device=DEVICE)

    def loss(t):
        return attention(t, 2, "legacy").square().sum()

    want, got = func_grad_and_autograd(loss, qkv)
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_autocast_gives_every_path_the_same_dtype(monkeypatch):
    """Under autocast an fp32 qkv computes in the autocast dtype on every path, as SDPA and the
    reference's matmuls do; the kernel's custom op has no autocast rule and computed in fp32."""
    qkv = torch.randn(2, 3 * 2 * 8, 9, device=DEVICE, requires_grad=True)
    got = {}
    for mode in ("reference", "auto", "triton"):
        monkeypatch.setenv("FASTDIFF_OPS", mode)
        with torch.autocast(qkv.device.type, dtype=torch.bfloat16):
            out = attention(qkv, 2)
        (grad,) = torch.autograd.grad(out.float().square().sum(), qkv)
        assert out.dtype == torch.bfloat16 and grad.dtype == torch.float32, mode
        got[mode] = out.float()
    for mode in ("auto", "triton"):
        torch.testing.assert_close(got[mode], got["reference"], rtol=2e-2, atol=2e-2)


@needs_kernel
def test_compiled_op_reaches_the_kernel():
    """While torch.compile traces, attention outside a torch.func transform is the kernel's custom
    op (the compile engine's UNet) and inside torch.func.grad SDPA (its classifier gradient)."""
    qkv = torch.randn(2, 3 * 2 * 16, 16, device=DEVICE)

    def step(t):
        return attention(t, 2), torch.func.grad(lambda u: attention(u, 2, "legacy").square().sum())(t)

    (out, g), targets = compiled_call_targets(step, qkv)
    assert [t for t in targets if t.startswith("fastdiff.")] == ["fastdiff.attention.default"]
    assert any("scaled_dot_product_attention" in t for t in targets)
    want_out, want_g = step(qkv)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["dual", "jvp"])
@pytest.mark.parametrize("ops_mode", ["triton", "auto"])
def test_forward_mode_ad(monkeypatch, how, ops_mode):
    """Forward-mode AD (dual tensors, torch.func.jvp) gets the reference's tangent: through the
    kernel's custom op the tangent was silently dropped, and SDPA's fused CPU kernels raise."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setenv("FASTDIFF_OPS", ops_mode)
    x = torch.randn(2, 3 * 2 * 8, 7, device=DEVICE)
    tx = torch.randn_like(x)

    def tangent(op):
        if how == "jvp":
            return torch.func.jvp(lambda t: op(t, 2, "legacy"), (x,), (tx,))[1]
        with fwAD.dual_level():
            return fwAD.unpack_dual(op(fwAD.make_dual(x, tx), 2, "legacy")).tangent

    got = tangent(attention)
    assert got is not None
    torch.testing.assert_close(got, tangent(attention_reference), rtol=1e-5, atol=1e-5)


def test_backward_reference_matches_autograd():
    x = torch.randn(1, 3 * 3 * 8, 11, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(1, 3 * 8, 11, dtype=torch.float64)
    out, lse = forward_reference(x.detach(), 3, "legacy")
    attention_reference(x, 3, "legacy").backward(dout)
    torch.testing.assert_close(backward_reference(dout, x.detach(), out, lse, 3, "legacy"), x.grad)


def test_opcheck():
    x = torch.randn(1, 3 * 2 * 16, 9, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (x, 2, "new"))


def test_compile_traces_through():
    x = torch.randn(1, 3 * 2 * 16, 9, device=DEVICE)
    fn = torch.compile(lambda t: attention(t, 2, "legacy") * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), attention(x, 2, "legacy") * 2)


def test_reference_path_without_kernel(monkeypatch):
    """FASTDIFF_OPS=reference gives guided-diffusion's numbers exactly, its gradient too: autograd
    through the original's einsums (the custom op's closed-form backward, which the kernels'
    tests check, rounded otherwise: a guided sample then differed from the original's by 4e-6)."""
    monkeypatch.setenv("FASTDIFF_OPS", "reference")
    x = torch.randn(2, 3 * 4 * 8, 10, requires_grad=True)
    dout = torch.randn(2, 4 * 8, 10)
    for order in ("new", "legacy"):
        assert not attn_function._kernel_for(x, 4)
        got = attention(x, 4, order)
        want = _guided_diffusion_qkv(x, 4, order)
        assert torch.equal(got, want)
        assert torch.equal(*(torch.autograd.grad(out, x, dout)[0] for out in (got, want)))


def _guided_diffusion_qkv(qkv, n_heads, order):
    """guided-diffusion's QKVAttention / QKVAttentionLegacy forward, written out independently."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if order == "legacy":
        q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    else:
        q, k, v = qkv.chunk(3, dim=1)
        weight = torch.einsum(
            "bct,bcs->bts",
            (q * scale).view(bs * n_heads, ch, length),
            (k * scale).view(bs * n_heads, ch, length),
        )
        v = v.reshape(bs * n_heads, ch, length)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("order", ["new", "legacy"])
def test_reference_is_guided_diffusion(order):
    x = torch.randn(2, 3 * 2 * 8, 6).half()
    torch.testing.assert_close(
        attention_reference(x, 2, order), _guided_diffusion_qkv(x, 2, order), atol=0, rtol=0
    )


@pytest.mark.parametrize("cls,order", [(QKVAttention, "new"), (QKVAttentionLegacy, "legacy")])
def test_modules(cls, order):
    m = cls(4)
    assert m.n_heads == 4 and not list(m.parameters()) and not m.state_dict()
    x = torch.randn(1, 3 * 4 * 16, 12, device=DEVICE)
    torch.testing.assert_close(m(x), _guided_diffusion_qkv(x, 4, order), atol=2e-6, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        attention(torch.randn(1, 6, 4), 1, "old")
    with pytest.raises(ValueError, match="qkv must be"):
        attention(torch.randn(1, 7, 4), 1)
    # one clear error each, where the original fails on a ZeroDivisionError or deep in einsum/SDPA
    with pytest.raises(ValueError, match="num_heads must be at least 1, got 0"):
        QKVAttention(0)(torch.randn(1, 6, 4))
    with pytest.raises(ValueError, match="floating-point tensor, got torch.int64"):
        QKVAttentionLegacy(1)(torch.ones(1, 6, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="qkv must be"):  # also what torch's layers raise
        QKVAttention(1)(torch.randn(1, 6, 4, 1))
    # a non-tensor or a non-integer head count: one TypeError naming it, not an AttributeError
    # from qkv.dim() or a reshape's TypeError
    for qkv, heads, message in (
        (torch.randn(1, 12, 4).numpy(), 2, "qkv must be a torch.Tensor, got ndarray"),
        (torch.randn(1, 12, 4), 2.0, "num_heads must be an int, got 2.0"),
        (torch.randn(1, 12, 4), None, "num_heads must be an int, got None"),
    ):
        with pytest.raises(TypeError, match=f"attention: {message}"):
            attention(qkv, heads)


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize("order", ["new", "legacy"])
@pytest.mark.parametrize(
    "shape",
    [(2, 4, 64, 1024), (1, 2, 128, 4096), (2, 2, 192, 1024), (1, 1, 256, 1024), (3, 3, 160, 257)],
    ids=lambda s: "B{}H{}d{}T{}".format(*s),
)
def test_kernel_gpu_large(shape, order, dtype):
    _check_fwd_bwd(*shape, order, dtype, device="cuda")


def test_both_ops_take_kernels_for_one_list_of_dtypes():
    """attention and ada_group_norm each kept a copy of the kernels' dtypes; a dtype added to one
    would have left the other falling back without a word."""
    from fastdiff.ops import _backend
    from fastdiff.ops.ada_group_norm import function as group_norm
    from fastdiff.ops.attention import function as attention

    assert group_norm.KERNEL_DTYPES is attention.KERNEL_DTYPES is _backend.KERNEL_DTYPES
    assert not hasattr(group_norm, "_KERNEL_DTYPES") and not hasattr(attention, "_KERNEL_DTYPES")
