"""AdaGN + SiLU (ResBlock ``out_layers`` with use_scale_shift_norm) at the ADM shapes.

fastdiff's fused op against guided-diffusion's eager chain and torch.compile of that chain, in
forward (no_grad), backward, backward by x alone (dx: the classifier's input gradient under
guidance, weights and scale/shift frozen) and forward+backward, with the same fp32 weight/bias
(GroupNorm32 parameters stay fp32 under use_fp16) and scale/shift in the activation dtype.
"""

from __future__ import annotations

import pytest
import torch

from bench import baselines, shapes, timing

IMPLS = ("fastdiff", "eager", "compile")
MODES = ("fwd", "bwd", "dx", "fwdbwd")


def _fastdiff_path(x: torch.Tensor, num_groups: int) -> str:
    """Which implementation fastdiff dispatches AdaGN + SiLU to (a private hook; best effort)."""
    try:
        from fastdiff.ops.ada_group_norm.function import _pick_kernel

        kernel = _pick_kernel(x, num_groups, True, "silu")
        return "reference" if kernel is None else kernel.__name__.rsplit(".", 1)[-1]
    except Exception:  # noqa: BLE001
        from fastdiff.ops._backend import use_triton

        return "triton" if use_triton(x) else "reference"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", shapes.gn_cases(), ids=str)
def test_ada_group_norm(benchmark, device, case, mode, impl):
    fastdiff = ("fastdiff.ops.ada_group_norm", "ada_group_norm")
    fn = timing.implementation(impl, device, fastdiff, baselines.gn_eager)

    # made on the device: a host randn of the batch-64 tensors takes seconds
    def make(*shape, dtype, grad=mode in ("bwd", "fwdbwd")):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    x = make(case.batch, case.channels, case.height, case.width, dtype=case.dtype, grad=mode != "fwd")
    weight = make(case.channels, dtype=torch.float32)
    bias = make(case.channels, dtype=torch.float32)
    scale = make(case.batch, case.channels, dtype=case.dtype)
    shift = make(case.batch, case.channels, dtype=case.dtype)
    grads = (x,) if mode == "dx" else (x, weight, bias, scale, shift)

    def call():
        return fn(x, case.groups, weight, bias, scale, shift, shapes.EPS)

    benchmark.group = f"ada_group_norm {case} {mode}"
    info = {
        "op": "ada_group_norm",
        "impl": impl,
        "case": str(case),
        "channels": case.channels,
        "height": case.height,
        "width": case.width,
        "batch": case.batch,
        "groups": case.groups,
        "dtype": shapes.DTYPE_NAMES[case.dtype],
        "models": list(case.models),
        "size": shapes.bench_size(),
    }
    if impl == "fastdiff":
        timing.tune(call, grads, mode)
        info["fastdiff_path"] = _fastdiff_path(x, case.groups)
    timing.bench(
        benchmark,
        call,
        mode=mode,
        inputs=grads,
        device=device,
        info=info,
        nbytes=case.io_bytes(mode),
    )
