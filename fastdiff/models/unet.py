"""ADM networks (Dhariwal & Nichol 2021) with guided-diffusion's module layout.

Attribute names and nesting follow guided-diffusion exactly so its released checkpoints load with
``strict=True``; the forward math matches it to float32 rounding. Every GroupNorm, AdaGN and
attention runs on ``fastdiff.ops`` (fused kernels where they run, PyTorch's fastest exact path
elsewhere); a SiLU fused into the norm before it leaves ``nn.Identity`` in its Sequential slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops import AdaGroupNormSiLU, QKVAttention, QKVAttentionLegacy
from fastdiff.ops.patch import adm_resblock_forward

from .nn import (
    avg_pool_nd,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    maybe_checkpoint,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """Marker for modules whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A Sequential that hands the embedding only to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling (inner two dims for 3D), optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or by average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding, by AdaGN (scale/shift) or by addition.

    With ``up``/``down`` it is BigGAN's resampling block: resample after the first norm+SiLU,
    and resample the skip path the same way (no learned resampling).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels, silu=True),
            nn.Identity(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        # With scale-shift, GN * (1 + scale) + shift and the SiLU are one fused op.
        out_norm = (
            AdaGroupNormSiLU(32, self.out_channels)
            if use_scale_shift_norm
            else normalization(self.out_channels, silu=True)
        )
        self.out_layers = nn.Sequential(
            out_norm,
            nn.Identity(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return adm_resblock_forward(self, x, emb)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions with a residual connection."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"channels {channels} not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends to all positions (with learned
    positional embedding) and is projected to the output."""

    def __init__(
        self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None
    ):
        super().__init__()
        init = torch.empty(embed_dim, spacial_dim**2 + 1)
        if not init.is_meta:  # random ops and arithmetic on meta import torch._dynamo (seconds)
            init = torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        self.positional_embedding = nn.Parameter(init)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


def _build_down_half(
    model: nn.Module,
    *,
    in_channels: int,
    model_channels: int,
    num_res_blocks: int,
    attention_resolutions: Iterable[int],
    dropout: float,
    channel_mult: Sequence[float],
    conv_resample: bool,
    dims: int,
    use_checkpoint: bool,
    num_heads: int,
    num_head_channels: int,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_new_attention_order: bool,
) -> tuple[list[int], int, int, int]:
    """Create ``model.input_blocks`` and ``model.middle_block``.

    Returns (channels after each input block, final channels, final downsample factor, summed
    channels of all blocks - the spatial pools' feature size).
    """
    emb_dim = model_channels * 4
    attention_resolutions = tuple(attention_resolutions)

    def resblock(ch: int, out_ch: int | None = None, **kw) -> ResBlock:
        return ResBlock(
            ch,
            emb_dim,
            dropout,
            out_channels=out_ch,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            **kw,
        )

    def attention(ch: int) -> AttentionBlock:
        return AttentionBlock(
            ch,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_checkpoint=use_checkpoint,
            use_new_attention_order=use_new_attention_order,
        )

    ch = int(channel_mult[0] * model_channels)
    model.input_blocks = nn.ModuleList(
        [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
    )
    chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [resblock(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attention(ch))
            model.input_blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(channel_mult) - 1:
            down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
            model.input_blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    model.middle_block = TimestepEmbedSequential(resblock(ch), attention(ch), resblock(ch))
    return chans, ch, ds, sum(chans) + ch


def _make_time_embed(model_channels: int) -> nn.Sequential:
    emb_dim = model_channels * 4
    return nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


class _ADMNet(nn.Module):
    """What the UNet and the classifier share: the timestep MLP and the fp16-torso switch."""

    input_blocks: nn.ModuleList

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        use_checkpoint: bool,
        num_heads: int,
        num_head_channels: int,
        num_heads_upsample: int,
    ):
        """Record the configuration (as the original's attributes) and build the timestep MLP."""
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.time_embed = _make_time_embed(model_channels)

    def _torso(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torso computes in: that of its convs (fp16 after convert_to_fp16)."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> None:
        """Cast the torso's convs to fp16 (guided-diffusion's fp16 mode); norms, embeddings and
        the output head stay fp32."""
        for m in self._torso():
            m.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        for m in self._torso():
            m.apply(convert_module_to_f32)

    def _time_emb(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(emb.to(self.time_embed[0].weight.dtype))


class UNetModel(_ADMNet):
    """The ADM denoiser: a UNet with timestep (and optional class) embedding and attention.

    ``attention_resolutions`` are downsample factors (``image_size // res``), as the original.
    ``use_fp16`` keeps the torso's convs in fp16 (guided-diffusion's fp16 mode); the modern
    alternative is an fp32 model under ``torch.autocast``.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
        )
        self.num_classes = num_classes

        emb_dim = model_channels * 4
        if num_classes is not None:
            # Built around an empty weight, then initialised as nn.Embedding does (same RNG draw),
            # except on the meta device: there normal_ would import torch._dynamo (~4 s of start-up).
            self.label_emb = nn.Embedding(num_classes, emb_dim, _weight=torch.empty(num_classes, emb_dim))
            if not self.label_emb.weight.is_meta:
                nn.init.normal_(self.label_emb.weight)

        chans, ch, ds, _ = _build_down_half(
            self,
            in_channels=in_channels,
            model_channels=model_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=self.attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers: list[nn.Module] = [
                    ResBlock(
                        ch + chans.pop(),
                        emb_dim,
                        dropout,
                        out_channels=out_ch,
                        dims=dims,
                        use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm,
                    )
                ]
                ch = out_ch
                if ds in self.attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            num_heads=self.num_heads_upsample,
                            num_head_channels=num_head_channels,
                            use_checkpoint=use_checkpoint,
                            use_new_attention_order=use_new_attention_order,
                        )
                    )
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(
                            ch,
                            emb_dim,
                            dropout,
                            out_channels=ch,
                            dims=dims,
                            use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm,
                            up=True,
                        )
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch, silu=True),
            nn.Identity(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )
        if use_fp16:
            self.convert_to_fp16()

    def _torso(self) -> tuple[nn.Module, ...]:
        return self.input_blocks, self.middle_block, self.output_blocks

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning vector: time embedding plus the class embedding when conditional."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self._time_emb(timesteps)
        if y is not None:
            if y.shape != (timesteps.shape[0],):
                raise ValueError(f"y must have shape [N]={list(timesteps.shape)}, got {list(y.shape)}")
            emb = emb + self.label_emb(y)
        return emb

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.embed(timesteps, y)
        hs = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


class SuperResModel(UNetModel):
    """ADM-U: a UNet conditioned on a low-resolution image, upsampled bilinearly and concatenated
    to the noisy input (so the first conv sees ``2 * in_channels`` channels)."""

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, low_res: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, y)


class EncoderUNetModel(_ADMNet):
    """The half UNet used as ADM's noisy-image classifier, with a choice of pooling head.

    ``num_classes`` is the number of logits (``out_channels``); there is no class input.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
        )
        self.num_classes = out_channels

        _, ch, ds, feature_size = _build_down_half(
            self,
            in_channels=in_channels,
            model_channels=model_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=self.attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        self.pool = pool
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch, silu=True),
                nn.Identity(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            self.out = nn.Sequential(
                normalization(ch, silu=True),
                nn.Identity(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, out_channels),
            )
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                normalization(2048, silu=True),
                nn.Identity(),
                nn.Linear(2048, out_channels),
            )
        else:
            raise ValueError(f"unknown pool {pool!r}; choose adaptive, attention, spatial or spatial_v2")
        if use_fp16:
            self.convert_to_fp16()

    def _torso(self) -> tuple[nn.Module, ...]:
        return self.input_blocks, self.middle_block

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self._time_emb(timesteps)
        spatial = self.pool.startswith("spatial")
        pooled = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                pooled.append(h.to(x.dtype).mean(dim=tuple(range(2, h.dim()))))
        h = self.middle_block(h, emb)
        if spatial:
            pooled.append(h.to(x.dtype).mean(dim=tuple(range(2, h.dim()))))
            return self.out(torch.cat(pooled, dim=-1))
        return self.out(h.to(x.dtype))
