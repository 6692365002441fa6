"""fastdiff.ops.patch on a network that is not fastdiff's: a hand-written guided-diffusion-style
model (GroupNorm32, GN+SiLU Sequentials, a scale-shift ResBlock, both attention orders)."""

from __future__ import annotations

import copy
import importlib
import logging
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops.ada_group_norm import module as fast_ada
from fastdiff.ops.ada_group_norm.module import GroupNorm, GroupNormSiLU
from fastdiff.ops.attention import module as fast_attention
from fastdiff.ops.patch import patch

patch_module = importlib.import_module("fastdiff.ops.patch")  # the package exports patch() under that name


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion's: fp32 statistics, output cast back to the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QKVAttention(nn.Module):
    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        q = (q * scale).reshape(bs * self.n_heads, ch, length)
        k = (k * scale).reshape(bs * self.n_heads, ch, length)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k).float(), dim=-1).type(q.dtype)
        return torch.einsum("bts,bcs->bct", w, v.reshape(bs * self.n_heads, ch, length)).reshape(
            bs, -1, length
        )


class QKVAttentionLegacy(nn.Module):
    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1).type(q.dtype)
        return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads, new_order):
        super().__init__()
        self.norm = GroupNorm32(4, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = (QKVAttention if new_order else QKVAttentionLegacy)(num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class ResBlock(nn.Module):
    """guided-diffusion's shape: with use_scale_shift_norm, forward slices out_layers."""

    def __init__(self, channels, emb_channels, use_scale_shift_norm):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(4, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * channels if use_scale_shift_norm else channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(4, channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[..., None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return x + h


class Net(nn.Module):
    def __init__(self, ch=64, emb=16):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.res = nn.ModuleList([ResBlock(ch, emb, False), ResBlock(ch, emb, True)])
        self.attn = nn.ModuleList([AttentionBlock(ch, 2, True), AttentionBlock(ch, 2, False)])
        self.plain = nn.GroupNorm(4, ch, affine=False)
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))

    def forward(self, x, emb):
        h = self.conv_in(x)
        for res, attn in zip(self.res, self.attn):
            h = attn(res(h, emb))
        return self.out(self.plain(h))


def _inputs():
    return torch.randn(1, 3, 8, 8), torch.randn(1, 16)


def test_patch_keeps_outputs_grads_and_state_dict():
    model = Net()
    patched = copy.deepcopy(model)
    assert patch(patched) is patched
    assert list(patched.state_dict()) == list(model.state_dict())
    for (k, a), b in zip(model.state_dict().items(), patched.state_dict().values()):
        assert torch.equal(a, b), k

    x, emb = _inputs()
    ref, out = model(x, emb), patched(x, emb)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-3, rtol=1e-3, msg=name)


def test_patch_swaps_the_right_modules():
    model = patch(Net())
    res0, res1 = model.res
    assert type(res0.in_layers[0]) is GroupNormSiLU and isinstance(res0.in_layers[1], nn.Identity)
    assert type(res0.out_layers[0]) is GroupNormSiLU and isinstance(res0.out_layers[1], nn.Identity)
    # the scale-shift ResBlock applies out_layers[0] alone: norm only, SiLU kept after it
    assert type(res1.out_layers[0]) is GroupNorm and isinstance(res1.out_layers[1], nn.SiLU)
    assert type(res1.in_layers[0]) is GroupNormSiLU
    assert type(model.attn[0].norm) is GroupNorm
    assert type(model.attn[0].attention) is fast_attention.QKVAttention
    assert type(model.attn[1].attention) is fast_attention.QKVAttentionLegacy
    assert model.attn[1].attention.n_heads == 2
    assert type(model.plain) is GroupNorm and model.plain.weight is None
    assert type(model.out[0]) is GroupNormSiLU
    # shared Parameters: optimizers built before patching keep working
    before = Net()
    weight = before.out[0].weight
    assert patch(before).out[0].weight is weight


class _NormThenResidual(nn.Sequential):
    """A Sequential subclass whose forward reuses the norm's output: SiLU is not the only reader."""

    def forward(self, x):
        h = self[0](x)
        return self[1](h) + h


def test_patch_fuses_only_in_sequentials_running_their_own_forward():
    torch.manual_seed(0)
    block = _NormThenResidual(nn.GroupNorm(4, 8), nn.SiLU())
    patched = patch(copy.deepcopy(block))
    assert type(patched[0]) is GroupNorm and isinstance(patched[1], nn.SiLU)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(patched(x), block(x))


class _Positive(nn.Module):
    def forward(self, w):
        return w.abs()


def test_patch_leaves_hooked_and_parametrized_modules_alone():
    """A swapped-out module would take its hooks with it (feature taps, profilers), and a
    parametrized weight is no Parameter to share: those GroupNorms and SiLUs stay as they are."""
    torch.manual_seed(0)
    hooked_norm = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU())
    hooked_silu = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU())
    param_norm = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU())
    torch.nn.utils.parametrize.register_parametrization(param_norm[0], "weight", _Positive())
    seen = []
    hooked_norm[0].register_forward_hook(lambda *a: seen.append("norm"))
    hooked_silu[1].register_forward_hook(lambda *a: seen.append("silu"))
    model = nn.Sequential(hooked_norm, hooked_silu, param_norm)
    ref = copy.deepcopy(model)
    patch(model)
    assert type(hooked_norm[0]) is nn.GroupNorm and type(hooked_silu[0]) is GroupNorm
    assert isinstance(hooked_silu[1], nn.SiLU) and isinstance(param_norm[1], nn.SiLU)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(model(x), ref(x))
    assert seen.count("norm") == seen.count("silu") == 2


@pytest.mark.parametrize("scale_shift", [True, False])
def test_patch_upsample_alone_on_up_resblock(scale_shift, upsample_calls):
    """patch(group_norm=False) on a BigGAN up ResBlock: a scale-shift block's out norm is not the
    fused AdaGN, so its own _forward stays (adm_resblock_forward would pass it scale and shift)."""
    torch.manual_seed(0)
    block = GDResBlock(32, 16, 32, use_scale_shift_norm=scale_shift, up=True)
    patched = patch(copy.deepcopy(block), group_norm=False)
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    torch.testing.assert_close(patched(x, emb), block(x, emb), atol=1e-5, rtol=1e-5)
    assert len(upsample_calls) == (0 if scale_shift else 1)


def test_patch_is_idempotent_and_selective():
    model = patch(Net())
    modules = [type(m) for m in model.modules()]
    patch(model)
    assert [type(m) for m in model.modules()] == modules

    only_attn = patch(Net(), group_norm=False)
    assert type(only_attn.out[0]) is nn.GroupNorm and type(only_attn.attn[0].norm) is GroupNorm32
    assert type(only_attn.attn[0].attention) is fast_attention.QKVAttention
    only_gn = patch(Net(), attention=False)
    assert type(only_gn.attn[0].attention) is QKVAttention and type(only_gn.out[0]) is GroupNormSiLU


def test_patch_logs_what_it_replaced(caplog):
    """patch() said nothing of what it swapped (nor that it swapped nothing): each replacement is
    a DEBUG line naming the module, the counts one INFO line; a second patch replaces nothing."""
    model = Net()
    with caplog.at_level(logging.DEBUG, logger="fastdiff.ops.patch"):
        patch(model)
    lines = [r.getMessage() for r in caplog.records]
    assert "patch(Net): out.0: GroupNorm -> GroupNormSiLU (with the SiLU after it, now an Identity)" in lines
    assert "patch(Net): attn.1.attention: QKVAttentionLegacy -> fastdiff's" in lines
    assert "patch(Net): plain: GroupNorm -> GroupNorm" in lines
    assert lines[-1] == "patch(Net): 4 GroupNormSiLU, 4 GroupNorm, 1 QKVAttention, 1 QKVAttentionLegacy"
    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fastdiff's layers are there: no warning
        with caplog.at_level(logging.INFO, logger="fastdiff.ops.patch"):
            patch(model)
    assert [r.getMessage() for r in caplog.records] == ["patch(Net): nothing replaced"]


@pytest.mark.parametrize("model", [nn.GroupNorm(2, 4), nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))])
def test_patch_warns_when_it_finds_nothing_to_replace(model):
    """A bare layer (patch swaps children) or a network without GroupNorms was returned as it was,
    silently."""
    with pytest.warns(UserWarning, match=r"patch: nothing to replace in (GroupNorm|Sequential) \("):
        assert patch(model) is model


def test_patch_refuses_what_is_no_module_and_flags_that_are_no_bools():
    """One TypeError naming the argument: patch(None) (a builder that returned nothing) was an
    AttributeError from named_children, and group_norm="False" silently patched the norms."""
    for bad in (None, [nn.GroupNorm(2, 4)]):
        with pytest.raises(TypeError, match="patch: model must be an nn.Module, got "):
            patch(bad)
    model = Net()
    with pytest.raises(TypeError, match="patch: group_norm must be True or False, got 'False'"):
        patch(model, group_norm="False")
    assert type(model.out[0]) is nn.GroupNorm  # refused before any swap


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_patched_group_norm32_keeps_dtype(dtype):
    """GroupNorm32 computes in fp32 and returns the input dtype; the replacement must too."""
    seq = nn.Sequential(GroupNorm32(4, 32), nn.SiLU())
    with torch.no_grad():
        seq[0].weight.normal_()
        seq[0].bias.normal_()
    x = torch.randn(2, 32, 5, 5).to(dtype)
    ref = seq(x)
    out = patch(seq)(x)
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out, ref, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


@pytest.fixture
def upsample_calls(monkeypatch) -> list:
    """One entry per upsample_conv that the patched forwards run (the op itself still runs)."""
    calls = []
    fused_upsample = patch_module.upsample_conv
    monkeypatch.setattr(patch_module, "upsample_conv", lambda *a: calls.append(1) or fused_upsample(*a))
    return calls


class GDUpsample(nn.Module):
    """guided-diffusion's Upsample as its code is laid out (2-D): nearest 2x, then its conv."""

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.channels, self.use_conv, self.dims = channels, use_conv, dims
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


GDUpsample.__name__ = "Upsample"


class GDResBlock(nn.Module):
    """guided-diffusion's ResBlock as its code is laid out: forward calls _forward (under its
    checkpoint helper), in_layers / h_upd / x_upd for BigGAN up/down, scale-shift out norm."""

    def __init__(self, channels, emb_channels, out_channels, use_scale_shift_norm=True, down=False, up=False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = down or up
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        if up:
            self.h_upd, self.x_upd = GDUpsample(channels, False), GDUpsample(channels, False)
        else:
            self.h_upd = nn.AvgPool2d(2) if down else nn.Identity()
            self.x_upd = nn.AvgPool2d(2) if down else nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x, emb):
        return self._forward(x, emb)

    def _forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


GDResBlock.__name__ = "ResBlock"  # patch() recognises guided-diffusion's class by name and layout


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(down=True),
        dict(use_scale_shift_norm=False),
        dict(up=True),
        dict(up=True, use_scale_shift_norm=False),
    ],
)
def test_patch_fuses_guided_diffusion_resblock(kw, upsample_calls):
    torch.manual_seed(0)
    block = GDResBlock(32, 16, 64, **kw)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    patched = patch(copy.deepcopy(block))
    assert list(patched.state_dict()) == list(block.state_dict())
    if block.use_scale_shift_norm:
        # the norm, the scale-shift and the SiLU are one AdaGN op; the SiLU's slot keeps the index
        assert type(patched.out_layers[0]) is fast_ada.AdaGroupNormSiLU
        assert isinstance(patched.out_layers[1], nn.Identity)
    else:
        assert type(patched.out_layers[0]) is GroupNormSiLU
    assert type(patched.in_layers[0]) is GroupNormSiLU
    x, emb = torch.randn(2, 32, 8, 8, requires_grad=True), torch.randn(2, 16)
    ref, out = block(x, emb), patched(x, emb)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    (gx,) = torch.autograd.grad(patched(x, emb).square().sum(), x)
    # fp32 rounding of gradients up to ~1e3 (the up block's 16x16 output): tolerance on that scale
    torch.testing.assert_close(gx, gx_ref, atol=max(1e-4, 1e-6 * gx_ref.abs().max().item()), rtol=1e-4)
    assert len(upsample_calls) == (2 if kw.get("up") else 0)  # one upsample_conv in each of the two forwards
    assert [type(m) for m in patch(patched).modules()] == [type(m) for m in patched.modules()]  # idempotent
    unfolded = patch(copy.deepcopy(block), upsample=False)
    torch.testing.assert_close(unfolded(x, emb), ref, atol=1e-5, rtol=1e-5)
    assert len(upsample_calls) == (2 if kw.get("up") else 0)


class IDDPMResBlock(GDResBlock):
    """improved-diffusion's ResBlock: guided-diffusion's without BigGAN up/down (no updown,
    h_upd or x_upd)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.updown, self.h_upd, self.x_upd

    def _forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            return self.skip_connection(x) + self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        return self.skip_connection(x) + self.out_layers(h + emb_out)


IDDPMResBlock.__name__ = "ResBlock"


@pytest.mark.parametrize("scale_shift", [True, False])
def test_patch_fuses_improved_diffusion_resblock(scale_shift):
    """improved-diffusion's scale-shift ResBlock (no updown attributes) kept its out norm, scale,
    shift and SiLU apart: patch named the block guided-diffusion's only by all seven attributes."""
    torch.manual_seed(0)
    block = IDDPMResBlock(32, 16, 64, use_scale_shift_norm=scale_shift)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    patched = patch(copy.deepcopy(block))
    assert list(patched.state_dict()) == list(block.state_dict())
    fused = fast_ada.AdaGroupNormSiLU if scale_shift else GroupNormSiLU
    assert type(patched.out_layers[0]) is fused and isinstance(patched.out_layers[1], nn.Identity)
    x, emb = torch.randn(2, 32, 8, 8, requires_grad=True), torch.randn(2, 16)
    ref, out = block(x, emb), patched(x, emb)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)


def test_patch_fuses_guided_diffusion_upsample(upsample_calls):
    """guided-diffusion's Upsample with a conv runs one upsample_conv; upsample=False leaves it."""
    torch.manual_seed(0)
    net = nn.Sequential(GDUpsample(8, True), GDUpsample(8, False))
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(patch(copy.deepcopy(net), upsample=False)(x), ref)
        assert not upsample_calls
        patched = patch(copy.deepcopy(net))
        torch.testing.assert_close(patched(x), ref, atol=1e-5, rtol=1e-5)
    assert len(upsample_calls) == 1
    assert list(patched.state_dict()) == list(net.state_dict())


def test_patched_model_keeps_eval_mode_and_pickles(upsample_calls):
    """The modules patch() puts in keep the model's eval mode, and a patched model round-trips
    through pickle (``torch.save(model)``) with its fused forwards bound to the loaded copy."""
    torch.manual_seed(0)
    net = nn.ModuleList([Net(ch=32), GDResBlock(32, 16, 32, up=True), GDUpsample(32, True)]).eval()
    patched = patch(copy.deepcopy(net))
    assert not any(m.training for m in patched.modules())
    loaded = pickle.loads(pickle.dumps(patched))
    assert loaded[1]._forward.args[0] is loaded[1] and loaded[2].forward.args[0] is loaded[2]
    img, x, emb = torch.randn(1, 3, 8, 8), torch.randn(1, 32, 4, 4), torch.randn(1, 16)
    with torch.no_grad():
        for got in (patched, loaded):
            torch.testing.assert_close(got[0](img, emb), net[0](img, emb), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1](x, emb), net[1](x, emb), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[2](x), net[2](x), atol=1e-5, rtol=1e-5)
    assert len(upsample_calls) == 4  # the up block's and the Upsample's, in each of the two


@pytest.mark.parametrize("scale_shift", [True, False])
@pytest.mark.parametrize("resblock_updown", [True, False])
def test_patch_real_guided_diffusion_unet(monkeypatch, upsample_calls, resblock_updown, scale_shift):
    """With FASTDIFF_GUIDED_DIFFUSION pointing at a guided-diffusion checkout: its own UNet,
    patched, gives its unpatched output (every ResBlock on the fused AdaGN, its upsampler, an
    up ResBlock or an Upsample with a conv, one upsample_conv)."""
    import os
    import sys

    root = os.environ.get("FASTDIFF_GUIDED_DIFFUSION")
    if not root:
        pytest.skip("set FASTDIFF_GUIDED_DIFFUSION to a guided-diffusion checkout")
    monkeypatch.syspath_prepend(root)
    unet_module = pytest.importorskip("guided_diffusion.unet")
    torch.manual_seed(0)
    model = unet_module.UNetModel(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_classes=4,
        num_head_channels=32,
        use_scale_shift_norm=scale_shift,
        resblock_updown=resblock_updown,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = model(x, t, y)
        assert not upsample_calls
        patched = patch(copy.deepcopy(model))
        out = patched(x, t, y)
    assert len(upsample_calls) == 1
    fused = [m for m in patched.modules() if type(m) is fast_ada.AdaGroupNormSiLU]
    resblocks = sum(type(m).__name__ == "ResBlock" for m in model.modules())
    assert len(fused) == (resblocks if scale_shift else 0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    again = patch(copy.deepcopy(patched))  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), out)
        unfolded = patch(copy.deepcopy(model), upsample=False)(x, t, y)
    assert len(upsample_calls) == 2  # upsample=False: the upsampler as it was, whatever else is fused
    torch.testing.assert_close(unfolded, ref, atol=1e-5, rtol=1e-4)
    sys.modules.pop("guided_diffusion.unet", None)


def test_patch_leaves_a_group_norm_subclass_with_its_own_forward():
    """Its forward may compute more than the norm (here a residual): replacing it would drop that.
    A subclass that only renames nn.GroupNorm, and guided-diffusion's GroupNorm32, are replaced."""

    class NormPlusInput(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) + x

    class Renamed(nn.GroupNorm):
        pass

    net = nn.Sequential(NormPlusInput(2, 4), nn.SiLU(), Renamed(2, 4), GroupNorm32(2, 4))
    x = torch.randn(2, 4, 3, 3)
    expected = net(x)
    patch_module.patch(net)
    assert type(net[0]) is NormPlusInput and type(net[1]) is nn.SiLU
    assert type(net[2]) is fast_ada.GroupNorm and type(net[3]) is fast_ada.GroupNorm
    torch.testing.assert_close(net(x), expected)


def test_patch_does_not_fold_upsamplers_whose_conv_or_upsample_has_hooks(upsample_calls):
    """upsample_conv reads the conv's weight without calling the conv: its hooks (a feature tap,
    torch.nn.utils.weight_norm's pre-hook, which computes the weight) and the BigGAN block's
    h_upd hooks would not run. Those stay unfolded, hooks added after patching included."""
    torch.manual_seed(0)
    up = GDUpsample(8, True)
    up.conv.register_forward_hook(lambda m, i, out: out * 1.5)
    block = GDResBlock(32, 16, 32, use_scale_shift_norm=False, up=True)
    block.h_upd.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    late = GDUpsample(8, True)
    patched = [patch(copy.deepcopy(m)) for m in (up, block, late)]
    patched[2].conv.register_forward_hook(lambda m, i, out: out * 1.5)
    late.conv.register_forward_hook(lambda m, i, out: out * 1.5)
    x, h, emb = torch.randn(2, 8, 3, 4), torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(patched[0](x), up(x))
        torch.testing.assert_close(patched[1](h, emb), block(h, emb), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(patched[2](x), late(x))
    assert not upsample_calls


def test_patch_pairs_a_group_norm_with_the_next_slot_of_its_sequential():
    """A module held in two slots of one Sequential (here a shared 1x1 conv between the norm and
    the SiLU) is one entry of named_children(): the SiLU is not the next thing run after the norm."""
    torch.manual_seed(0)
    shared = nn.Conv2d(8, 8, 1)
    net = nn.Sequential(shared, nn.GroupNorm(2, 8), shared, nn.SiLU())
    x = torch.randn(2, 8, 3, 3)
    expected = net(x)
    patch(net)
    assert type(net[1]) is GroupNorm and type(net[3]) is nn.SiLU
    torch.testing.assert_close(net(x), expected)
    scripted = nn.Sequential(torch.jit.script(nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU())))
    expected = scripted(x)
    torch.testing.assert_close(patch(scripted)(x), expected)  # a ScriptModule is left as it is


def test_patch_keeps_each_norms_autocast_dtype():
    """Under a GPU autocast nn.GroupNorm returns fp32 and GroupNorm32 the input's dtype: the
    replacement of each keeps its rule (``keep_dtype``), and so do fastdiff's own networks."""
    from fastdiff.models.nn import normalization

    net = nn.Sequential(
        nn.GroupNorm(2, 4), nn.SiLU(), GroupNorm32(2, 4), nn.Conv2d(4, 4, 1), GroupNorm32(2, 4)
    )
    patch(net)
    assert [type(m) for m in net] == [GroupNormSiLU, nn.Identity, GroupNorm, nn.Conv2d, GroupNorm]
    assert [net[0].keep_dtype, net[2].keep_dtype, net[4].keep_dtype] == [False, True, True]
    block = patch(GDResBlock(32, 16, 32))
    assert block.out_layers[0].keep_dtype and normalization(32).keep_dtype


def test_patch_leaves_a_silu_subclass_with_its_own_forward():
    class Swish(nn.SiLU):
        def forward(self, x):
            return x * torch.sigmoid(2 * x)

    torch.manual_seed(0)
    net = nn.Sequential(nn.GroupNorm(2, 4), Swish())
    x = torch.randn(2, 4, 3, 3)
    expected = net(x)
    patch(net)
    assert type(net[0]) is GroupNorm and type(net[1]) is Swish
    torch.testing.assert_close(net(x), expected)


def test_patch_leaves_group_norms_with_state_or_forward_of_their_own():
    """A GroupNorm subclass with a buffer of its own would lose it from the state_dict; one with
    its own forward as a scale-shift ResBlock's out norm is no norm to fuse into the AdaGN."""

    class CountingNorm(nn.GroupNorm):
        def __init__(self, *args):
            super().__init__(*args)
            self.register_buffer("calls", torch.zeros(()))

    class NormPlusInput(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) + x

    torch.manual_seed(0)
    seq = nn.Sequential(CountingNorm(2, 4), nn.SiLU())
    keys = list(seq.state_dict())
    assert list(patch(seq).state_dict()) == keys and type(seq[0]) is CountingNorm
    block = GDResBlock(32, 16, 32)
    block.out_layers[0] = NormPlusInput(32, 32)
    patched = patch(copy.deepcopy(block))
    assert type(patched.out_layers[0]) is NormPlusInput
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(patched(x, emb), block(x, emb), atol=1e-5, rtol=1e-5)


def test_patch_leaves_hooked_attention():
    torch.manual_seed(0)
    block = AttentionBlock(8, 2, True)
    seen = []
    block.attention.register_forward_hook(lambda m, i, out: seen.append(1) or out * 1.5)
    qkv = torch.randn(2, 8, 3, 3)
    expected = block(qkv)
    patch(block)
    assert type(block.attention) is QKVAttention
    torch.testing.assert_close(block(qkv), expected)
    assert len(seen) == 2


def test_patch_leaves_modules_with_state_dict_hooks():
    """A load_state_dict pre-hook on a norm (an old checkpoint's key renamed as it loads) went
    with the norm patch swapped out: the patched model no longer loaded that checkpoint."""

    def renamed(module, state_dict, prefix, *args):
        if prefix + "gamma" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "gamma")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.SiLU(), nn.GroupNorm(2, 8))
    net[1].register_load_state_dict_pre_hook(renamed)
    net[3].register_state_dict_post_hook(lambda *args: None)
    old = {k.replace("1.weight", "1.gamma"): v for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning, match="nothing to replace"):
        patch(net)
    assert [type(m) for m in net] == [nn.Conv2d, nn.GroupNorm, nn.SiLU, nn.GroupNorm]
    net.load_state_dict(old)


class _HeadsInBatchAttention(nn.Module):
    """improved-diffusion's QKVAttention: no n_heads (nothing of its own), one head over a batch
    its caller folded the heads into; q and k scaled by d**-1/4 each, the softmax in fp32."""

    def forward(self, qkv):
        d = qkv.shape[1] // 3
        q, k, v = qkv.split(d, dim=1)
        logits = torch.einsum("nct,ncs->nts", q * d**-0.25, k * d**-0.25)
        return torch.einsum("nts,ncs->nct", logits.float().softmax(-1).to(logits.dtype), v)


_HeadsInBatchAttention.__name__ = "QKVAttention"


class _SettingsAttention(_HeadsInBatchAttention):
    """Another code's QKVAttention: no n_heads, but a setting of its own (here a head count under
    another name): patch cannot tell what it computes."""

    def __init__(self):
        super().__init__()
        self.heads = 2


_SettingsAttention.__name__ = "QKVAttention"


class IDDPMAttentionBlock(nn.Module):
    """improved-diffusion's AttentionBlock: qkv reshaped to [B*H, 3*C/H, T] for its QKVAttention."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(4, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = _HeadsInBatchAttention()
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.attention(qkv.reshape(b * self.num_heads, -1, qkv.shape[2])).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


def test_patch_replaces_improved_diffusion_attention(caplog):
    """improved-diffusion's QKVAttention (no n_heads: its block folds the heads into the batch) was
    kept ("it has no n_heads"): it is fastdiff's attention at one head on that batch."""
    torch.manual_seed(0)
    block = IDDPMAttentionBlock(32, 4)
    x = torch.randn(2, 32, 5, 6, requires_grad=True)
    ref = block(x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    patched = copy.deepcopy(block)
    with caplog.at_level(logging.DEBUG, logger="fastdiff.ops.patch"):
        patch(patched)
    attn = patched.attention
    assert type(attn) is fast_attention.QKVAttentionLegacy and attn.n_heads == 1
    assert list(patched.state_dict()) == list(block.state_dict())
    lines = [r.getMessage() for r in caplog.records]
    replaced = "attention: QKVAttention -> fastdiff's QKVAttentionLegacy, 1 head (heads in the batch)"
    assert f"patch(IDDPMAttentionBlock): {replaced}" in lines
    assert lines[-1] == "patch(IDDPMAttentionBlock): 1 GroupNorm, 1 QKVAttentionLegacy"
    out = patched(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert [type(m) for m in patch(patched).modules()] == [type(m) for m in patched.modules()]  # idempotent


def test_patch_keeps_a_module_compiled_on_its_own_and_says_why(caplog):
    """improved-diffusion's QKVAttention compiled alone (``m.compile()`` puts the compiled call on
    it) was kept as "it has no n_heads"; a compiled GroupNorm or guided-diffusion attention was
    swapped, the compilation and its options dropped. Each stays, as a hooked one does, and the
    report says to patch first; a model compiled whole has its layers swapped (its compiled call
    runs them)."""
    block, whole = IDDPMAttentionBlock(32, 4), IDDPMAttentionBlock(32, 4)
    block.attention.compile()
    block.norm.compile(dynamic=False)
    gd_attn = QKVAttention(2)
    gd_attn.compile()
    net = nn.Sequential(block, gd_attn)
    why = "it is compiled on its own: patch first, then compile"
    with caplog.at_level(logging.INFO, logger="fastdiff.ops.patch"), pytest.warns(UserWarning, match=why):
        patch(net)
    assert type(block.attention) is _HeadsInBatchAttention and type(block.norm) is GroupNorm32
    assert type(gd_attn) is QKVAttention and net[1] is gd_attn
    assert caplog.records[-1].getMessage() == (
        f"patch(Sequential): nothing replaced; kept as they were: 1 GroupNorm32 ({why}), "
        f"2 QKVAttention ({why})"
    )
    whole.compile()
    patch(whole)
    assert type(whole.attention) is fast_attention.QKVAttentionLegacy and type(whole.norm) is GroupNorm


def test_patch_reports_what_it_kept_and_why(caplog):
    """patch() named what it replaced but not the GroupNorms and attention modules it left (hooks,
    a parametrization, state or a forward of their own, no n_heads): a user saw fewer layers
    replaced than their model holds and nothing said which or why."""

    class NormPlusInput(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) + x

    hooked, hooked_attn = nn.GroupNorm(2, 4), QKVAttention(2)
    hooked.register_forward_hook(lambda *a: None)
    hooked_attn.register_forward_hook(lambda *a: None)
    param = nn.GroupNorm(2, 4)
    torch.nn.utils.parametrize.register_parametrization(param, "weight", _Positive())
    net = nn.Sequential(
        nn.GroupNorm(2, 4), hooked, param, NormPlusInput(2, 4), _SettingsAttention(), hooked_attn
    )
    with caplog.at_level(logging.DEBUG, logger="fastdiff.ops.patch"):
        patch(net)
    lines = [r.getMessage() for r in caplog.records]
    assert "patch(Sequential): 1: GroupNorm kept (it has hooks)" in lines
    assert "patch(Sequential): 4: QKVAttention kept (it has no n_heads)" in lines
    assert lines[-1] == (
        "patch(Sequential): 1 GroupNorm; kept as they were: 1 GroupNorm (it has hooks), "
        "1 ParametrizedGroupNorm (it is parametrized), 1 NormPlusInput (its class has a forward of "
        "its own), 1 QKVAttention (it has no n_heads), 1 QKVAttention (it has hooks)"
    )
    caplog.clear()
    with pytest.warns(UserWarning, match=r"; kept as they were: 1 GroupNorm \(it has hooks\)$"):
        patch(nn.Sequential(hooked, nn.SiLU()), attention=False)
    with caplog.at_level(logging.INFO, logger="fastdiff.ops.patch"), pytest.warns(UserWarning):
        patch(nn.Sequential(hooked_attn, nn.GroupNorm(2, 4)), group_norm=False)
    assert [r.getMessage() for r in caplog.records] == [
        "patch(Sequential): nothing replaced; kept as they were: 1 QKVAttention (it has hooks)"
    ]
