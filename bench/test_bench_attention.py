"""QKV self-attention (AttentionBlock's core) at the ADM attention resolutions 32, 16 and 8.

fastdiff's fused op against guided-diffusion's einsum attention, torch.compile of it, and
PyTorch SDPA including the permutes/copies between the ``[B, 3*H*d, T]`` layout and SDPA's.
"""

from __future__ import annotations

import pytest
import torch

from bench import baselines, shapes, timing

IMPLS = ("fastdiff", "eager", "compile", "sdpa")
MODES = ("fwd", "bwd", "fwdbwd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", shapes.attn_cases(), ids=str)
def test_attention(benchmark, device, case, mode, impl):
    fastdiff = ("fastdiff.ops.attention", "attention")
    eager, sdpa = baselines.attention_eager, baselines.attention_sdpa
    fn = timing.implementation(impl, device, fastdiff, eager, sdpa=sdpa)
    qkv = torch.randn(case.batch, 3 * case.channels, case.length, device=device, dtype=case.dtype)
    qkv.requires_grad_(mode != "fwd")

    def call():
        return fn(qkv, case.heads, case.order)

    benchmark.group = f"attention {case} {mode}"
    info = {
        "op": "attention",
        "impl": impl,
        "case": str(case),
        "channels": case.channels,
        "heads": case.heads,
        "head_dim": case.head_dim,
        "length": case.length,
        "resolution": case.resolution,
        "order": case.order,
        "batch": case.batch,
        "dtype": shapes.DTYPE_NAMES[case.dtype],
        "models": list(case.models),
        "size": shapes.bench_size(),
    }
    if impl == "fastdiff":
        timing.tune(call, (qkv,), mode)
        from fastdiff.ops._backend import use_triton

        info["fastdiff_path"] = "triton" if use_triton(qkv) else "reference"
    timing.bench(
        benchmark,
        call,
        mode=mode,
        inputs=(qkv,),
        device=device,
        info=info,
        nbytes=case.io_bytes(mode),
        flops=case.flops(mode),
        matmul_dtype=case.dtype,
    )
