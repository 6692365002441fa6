"""ADM's upsampler (nearest 2x + 3x3 conv; the up ResBlock's first conv) at the ADM shapes.

fastdiff's ``upsample_conv`` (one stride-2 transposed conv with the folded 4x4 kernel, or the
reference where a measurement chose it) against guided-diffusion's interpolate-then-conv and
torch.compile of it, in forward (sampling) and forward+backward (training).
"""

from __future__ import annotations

import pytest
import torch

from bench import baselines, shapes, timing

IMPLS = ("fastdiff", "eager", "compile")
MODES = ("fwd", "fwdbwd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", shapes.up_cases(), ids=str)
def test_upsample_conv(benchmark, device, case, mode, impl):
    fastdiff = ("fastdiff.ops.upsample_conv", "upsample_conv")
    fn = timing.implementation(impl, device, fastdiff, baselines.upsample_eager)
    grad = mode != "fwd"
    c, r = case.channels, case.resolution
    x = torch.randn(case.batch, c, r, r, device=device, dtype=case.dtype)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)  # what the Sampler's inference form uses
    weight = torch.randn(c, c, 3, 3, device=device, dtype=case.dtype) / (3 * c**0.5)
    bias = torch.randn(c, device=device, dtype=case.dtype)
    inputs = tuple(t.requires_grad_(grad) for t in (x, weight, bias))

    def call():
        return fn(x, weight, bias)

    benchmark.group = f"upsample_conv {case} {mode}"
    info = {
        "op": "upsample_conv",
        "impl": impl,
        "case": str(case),
        "channels": case.channels,
        "resolution": case.resolution,
        "batch": case.batch,
        "dtype": shapes.DTYPE_NAMES[case.dtype],
        "models": list(case.models),
        "size": shapes.bench_size(),
    }
    if impl == "fastdiff":
        timing.tune(call, inputs, mode)
        from fastdiff.ops.upsample_conv import function

        info["fastdiff_path"] = "fold" if function._use_fold(x, weight, bias) else "reference"
    timing.bench(
        benchmark,
        call,
        mode=mode,
        inputs=inputs,
        device=device,
        info=info,
        nbytes=case.io_bytes(mode),
        flops=case.flops(mode),
        matmul_dtype=case.dtype,
    )
