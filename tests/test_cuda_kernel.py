"""The CUDA C++ ada_group_norm kernels (csrc/) and their Python layer.

On a CPU machine: the torch-free sources compile with nvcc, setup.py stays pure Python, the
layer reports itself unavailable and the backend choice is cached. On a GPU: forward/backward
against a float64 PyTorch reference for every dtype/layout, with outputs poisoned beforehand.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops import autotuning
from fastdiff.ops.ada_group_norm import cuda_kernel as ck

REPO = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


# ---------------------------------------------------------------------------------------------
# CPU: build plumbing


@pytest.mark.slow  # CI's first stage (.ci/check_cuda_compile.sh) compiles them too
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_kernel_sources_compile_without_torch(tmp_path):
    """The .cu must build with plain nvcc (no torch headers), warnings as errors.

    PTX only, to stay quick; .ci/check_cuda_compile.sh (the slow test below) runs ptxas too.
    """
    flags = shlex.split((REPO / "csrc" / "nvcc_flags.txt").read_text(), comments=True)
    cmd = [
        NVCC,
        "-std=c++20",  # torch 2.13's, which the real builds get from torch
        *flags,
        "-c",
        str(REPO / "csrc" / "ada_group_norm.cu"),
        "-o",
        str(tmp_path / "k.o"),
        "-I",
        str(REPO / "csrc"),
        "-gencode",
        "arch=compute_80,code=compute_80",
        "-Xcompiler",
        "-Wall,-Wextra,-Werror",
        "-Werror",
        "all-warnings",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_ci_compile_script():
    script = REPO / ".ci" / "check_cuda_compile.sh"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout


def _run_setup(tmp_path, build_cuda: str):
    """``python setup.py --name`` with torch made unimportable (a sitecustomize import hook)."""
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import sys

        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, _NoTorch())
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FASTDIFF_BUILD_CUDA": build_cuda}
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_setup_is_pure_python_by_default(tmp_path):
    res = _run_setup(tmp_path, "0")
    assert res.returncode == 0, res.stderr
    assert "fastdiff" in res.stdout
    # The hook is effective: asking for the extension does need torch.
    blocked = _run_setup(tmp_path, "1")
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_without_cuda():
    assert ck.available() is False


def test_build_failure_warns_and_returns_none(monkeypatch):
    """A broken toolchain must cost one warning, never an exception at import or dispatch."""
    import torch.utils.cpp_extension as cpp_extension

    from fastdiff.ops import _cuda_build

    def boom(**kwargs):
        assert kwargs["name"] == "fastdiff_cuda" and len(kwargs["sources"]) == 2
        raise RuntimeError("nvcc exploded\nlong log ...")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("FASTDIFF_CUDA_JIT", raising=False)  # a JIT build is asked for
    monkeypatch.setattr(cpp_extension, "load", boom)
    monkeypatch.setitem(sys.modules, "fastdiff._C", None)  # no prebuilt module
    _cuda_build.load_extension.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the CUDA extension failed \\(nvcc exploded\\)"):
            assert _cuda_build.load_extension() is None
    finally:
        _cuda_build.load_extension.cache_clear()


def test_jit_build_can_be_switched_off(monkeypatch):
    """FASTDIFF_CUDA_JIT=0 (run_gpu.py's later stages after a failed build stage): no build is
    tried again, so a broken or slow toolchain costs its minutes once per run, not once per stage."""
    import torch.utils.cpp_extension as cpp_extension

    from fastdiff.ops import _cuda_build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("JIT build attempted"))
    monkeypatch.setitem(sys.modules, "fastdiff._C", None)  # no prebuilt module
    monkeypatch.setenv("FASTDIFF_CUDA_JIT", "0")
    _cuda_build.load_extension.cache_clear()
    try:
        assert _cuda_build.load_extension() is None
    finally:
        _cuda_build.load_extension.cache_clear()


@pytest.fixture
def fresh_choices(monkeypatch, tmp_path):
    """Empty in-memory choice cache, persisted to a temp file."""
    path = tmp_path / "backend_choice.json"
    monkeypatch.setenv("FASTDIFF_BACKEND_CACHE", str(path))
    monkeypatch.delenv("FASTDIFF_GN_BACKEND", raising=False)
    ck._CHOICES.clear()
    yield path
    ck._CHOICES.clear()


def test_preferred_measures_once_and_persists(monkeypatch, fresh_choices):
    calls = []
    monkeypatch.setattr(ck, "available", lambda: True)
    monkeypatch.setattr(ck, "_measure", lambda *a: calls.append(a) or True)
    x = torch.randn(2, 64, 4, 4)
    assert ck.preferred(x, 32) is False  # outside autotuning: never measured, Triton
    assert not calls
    with autotuning():
        assert ck.preferred(x, 32) is True
        assert ck.preferred(x, 32) is True
        assert len(calls) == 1
        ck.preferred(x.to(memory_format=torch.channels_last), 32)
        assert len(calls) == 2  # the memory format is part of the key
    assert ck.preferred(x, 32) is True  # the recorded choice holds outside the block
    saved = json.loads(fresh_choices.read_text())["ada_group_norm"]
    assert len(saved) == 2 and set(saved.values()) == {"cuda"}
    # A new process (simulated) reads the file instead of measuring again.
    ck._CHOICES.clear()
    assert ck.preferred(x, 32) is True
    assert len(calls) == 2


def test_preferred_env_forces(monkeypatch, fresh_choices):
    monkeypatch.setattr(ck, "_measure", lambda *a: pytest.fail("must not measure"))
    monkeypatch.setattr(ck, "available", lambda: True)
    x = torch.randn(1, 32, 2, 2)
    monkeypatch.setenv("FASTDIFF_GN_BACKEND", "triton")
    assert ck.preferred(x, 8) is False
    monkeypatch.setenv("FASTDIFF_GN_BACKEND", "cuda")
    assert ck.preferred(x, 8) is True


def test_unknown_activation_rejected():
    with pytest.raises(ValueError, match="activation"):
        ck._silu("gelu")


# ---------------------------------------------------------------------------------------------
# GPU: numerics against float64

gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and ck.available()), reason="needs CUDA and the built extension"
)
TOL = {torch.float32: (2e-5, 2e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (3e-2, 1e-1)}


def _reference(x, g, weight, bias, scale, shift, eps, activation):
    """float64 y plus mean/rstd; inputs are leaves so autograd gives the reference grads."""
    n, c = x.shape[:2]
    xg = x.reshape(n, g, -1)
    mean = xg.mean(-1)
    var = xg.var(-1, unbiased=False)
    h = ((xg - mean[..., None]) / torch.sqrt(var[..., None] + eps)).reshape(x.shape)
    ch = (1, c) + (1,) * (x.dim() - 2)
    nc = (n, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        h = h * weight.reshape(ch)
    if bias is not None:
        h = h + bias.reshape(ch)
    if scale is not None:
        h = h * (1 + scale.reshape(nc))
    if shift is not None:
        h = h + shift.reshape(nc)
    y = F.silu(h) if activation == "silu" else h
    return y, mean, 1 / torch.sqrt(var + eps)


def _err(a, b):
    """Max abs error relative to the reference's magnitude (at least 1)."""
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1)).item()


def _check(
    shape,
    dtype,
    channels_last,
    groups,
    adaptive,
    activation="silu",
    affine=True,
    splits=0,
    misalign=False,
    eps=1e-5,
    dev="cuda",
):
    n, c = shape[:2]
    numel = torch.Size(shape).numel()
    if misalign:  # contiguous but off the 16-byte boundary: the scalar (non-vector) path
        x = torch.empty(numel + 1, device=dev, dtype=dtype)[1:].view(shape)
        x.copy_(torch.randn(shape) * 2 + 0.5)
    else:
        x = (torch.randn(shape, device=dev) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, device=dev).to(dtype)
    weight = torch.randn(c, device=dev) if affine else None
    bias = torch.randn(c, device=dev) if affine else None
    scale = torch.randn(n, c, device=dev) * 0.5 if adaptive else None
    shift = torch.randn(n, c, device=dev) if adaptive else None

    ext = ck.load_extension()
    silu = activation == "silu"
    y, mean, rstd = ext.ada_group_norm_forward(
        x, groups, weight, bias, scale, shift, eps, silu, splits=splits, poison=True
    )
    grads = ext.ada_group_norm_backward(
        dy, x, groups, weight, bias, scale, shift, mean, rstd, silu, splits=splits, poison=True
    )

    inputs = (x, weight, bias, scale, shift)
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ry, rmean, rrstd = _reference(leaves[0], groups, *leaves[1:], eps, activation)
    rgrads = torch.autograd.grad(ry, [t for t in leaves if t is not None], dy.double())
    rgrads = iter(rgrads)
    rgrads = [None if t is None else next(rgrads) for t in leaves]

    fwd_tol, bwd_tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last) and grads[0].is_contiguous(
            memory_format=torch.channels_last
        )
    assert torch.isfinite(y).all() and all(g is None or torch.isfinite(g).all() for g in grads)
    assert _err(mean, rmean) < 1e-5 and _err(rstd, rrstd) < 1e-4
    assert _err(y, ry) < fwd_tol
    for name, g, rg in zip(("dx", "dweight", "dbias", "dscale", "dshift"), grads, rgrads):
        assert (g is None) == (rg is None), name
        if g is not None:
            assert g.shape == rg.shape, name
            assert _err(g, rg) < bwd_tol, f"{name}: {_err(g, rg)}"


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel-layer output starts as NaN, so an unwritten element fails the comparison."""
    monkeypatch.setenv("FASTDIFF_OPS_POISON", "1")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("hw", [(7, 7), (1, 1), (8, 8)], ids=["7x7", "1x1", "8x8"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "scale_shift"])
def test_matches_reference(dtype, channels_last, hw, adaptive):
    _check((2, 96, *hw), dtype, channels_last, 32, adaptive)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "case",
    [
        dict(shape=(3, 64, 16, 16), groups=32, activation=None),
        dict(shape=(2, 64, 16, 16), groups=32, affine=False),
        dict(shape=(2, 36, 5, 9), groups=12),  # C not a multiple of the vector width (NHWC scalar path)
        dict(shape=(2, 64, 33, 31), groups=16, splits=3),  # forced split, ragged chunks
        dict(shape=(2, 64, 16, 16), groups=32, splits=7, misalign=True),
        dict(shape=(2, 128, 40), groups=32),  # [N, C, L]
        dict(shape=(4, 32), groups=8),  # [N, C]
        dict(shape=(2, 32, 4, 4), groups=32, adaptive=True),  # one channel per group
    ],
    ids=["no_act", "no_affine", "odd_c", "split3", "misaligned", "ncl", "nc", "cg1"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_edge_cases(dtype, case, channels_last):
    case = dict(case)
    if channels_last and len(case["shape"]) != 4:
        pytest.skip("channels_last needs 4-D")
    case.setdefault("adaptive", True)
    _check(case.pop("shape"), dtype, channels_last, case.pop("groups"), **case)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_split_path_large_spatial(dtype, channels_last):
    """256 channels at 256x256, batch 1: few groups, so the reduction is split across blocks."""
    _check((1, 256, 256, 256), dtype, channels_last, 32, adaptive=True)


@pytest.mark.gpu
@gpu
def test_out_buffer_is_fully_written():
    ext = ck.load_extension()
    x = torch.randn(2, 96, 7, 7, device="cuda", dtype=torch.float16)
    out = torch.full_like(x, float("nan"))
    y, _, _ = ext.ada_group_norm_forward(x, 32, None, None, None, None, 1e-5, True, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(out).all()


@pytest.mark.gpu
@gpu
def test_layer_api_and_large_mean(poisoned):
    """Kernel-layer signatures; statistics stay accurate when |mean| >> std."""
    x = (torch.randn(2, 64, 8, 8, device="cuda") * 0.01 + 300.0).contiguous()
    w, b = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    y, mean, rstd = ck.forward(x, 32, w, b, None, None, 1e-5, None)
    ry, rmean, rrstd = _reference(x.double(), 32, w.double(), b.double(), None, None, 1e-5, None)
    assert _err(y, ry) < 5e-3 and _err(mean, rmean) < 1e-6 and (rstd / rrstd - 1).abs().max() < 1e-3
    grads = ck.backward(torch.ones_like(x), x, 32, w, b, None, None, mean, rstd, None)
    assert len(grads) == 5 and grads[3] is None and grads[4] is None
    assert torch.isfinite(grads[0]).all()


@pytest.mark.gpu
@gpu
def test_preferred_caches_measured_choice(monkeypatch, fresh_choices):
    calls = []
    measure = ck._measure
    monkeypatch.setattr(ck, "_measure", lambda *a: calls.append(1) or measure(*a))
    x = torch.randn(2, 128, 16, 16, device="cuda", dtype=torch.float16)
    with autotuning():
        first = ck.preferred(x, 32)
    assert ck.preferred(x, 32) is first and len(calls) == 1
