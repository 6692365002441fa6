"""The benchmarks' baselines compute what they stand for: a wrong layout in a baseline would time
other work than the original's and make every ratio against it meaningless."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bench import baselines
from fastdiff.ops.attention.reference import attention_reference


@pytest.fixture
def stub_xformers(monkeypatch):
    """xformers has no CPU kernels: a stand-in with its documented ``[B, T, H, d]`` contract, so
    what is tested is the baseline's own layout handling."""

    def memory_efficient_attention(q, k, v):
        assert q.dim() == 4 and q.stride(-1) == 1
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


@pytest.mark.parametrize("order", ["new", "legacy"])
@pytest.mark.parametrize("impl", ["eager", "sdpa", "xformers"])
def test_attention_baselines_match_the_reference(stub_xformers, impl, order):
    gen = torch.Generator().manual_seed(0)
    heads, ch, length = 3, 8, 37  # odd T, heads not a power of two
    qkv = torch.randn(2, 3 * heads * ch, length, generator=gen, dtype=torch.float64)
    fn = getattr(baselines, f"attention_{impl}")
    torch.testing.assert_close(fn(qkv, heads, order), attention_reference(qkv, heads, order))


@pytest.mark.parametrize("new_order", [False, True])
def test_gd_attention_swap_keeps_the_network(stub_xformers, new_order):
    """The sampling bench's gd-sdpa / gd-xformers networks compute the gd network's outputs."""
    from bench.test_bench_sampling import _with_attention
    from fastdiff.models import UNetConfig, build_network

    torch.manual_seed(0)
    config = UNetConfig(
        image_size=8,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        use_new_attention_order=new_order,
    )
    net = build_network(config).double()
    with torch.no_grad():
        for p in net.parameters():  # no zero-initialised projections: attention must count
            p.copy_(torch.randn_like(p) * 0.1)
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([3, 700])
    calls = []

    def counted(fn):
        return lambda *args: calls.append(fn) or fn(*args)

    with torch.no_grad():
        want = net(x, t)
        for fn in (baselines.attention_sdpa, baselines.attention_xformers):
            torch.testing.assert_close(_with_attention(net, counted(fn))(x, t), want)
    assert calls.count(baselines.attention_sdpa) == calls.count(baselines.attention_xformers) > 0
