"""ADM networks (Dhariwal & Nichol 2021) with guided-diffusion's module layout.

Attribute names and nesting follow guided-diffusion exactly so its released checkpoints load with
``strict=True``; the forward math matches it to float32 rounding. Every GroupNorm, AdaGN,
attention and upsampler (nearest 2x + 3x3 conv) runs on ``fastdiff.ops`` (fused kernels where they
run, PyTorch's fastest exact path elsewhere); a SiLU fused into the norm before it leaves
``nn.Identity`` in its Sequential slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops import AdaGroupNormSiLU, QKVAttention, QKVAttentionLegacy, avg_pool2x
from fastdiff.ops._backend import force_reference, traced
from fastdiff.ops.patch import adm_resblock_forward, adm_upsample_forward, has_hooks, outside_autocast

from .config import ClassifierConfig, NetConfig, SuperResConfig, UNetConfig
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

CHANNELS_LAST_MIN_BATCH = 16  # the smallest batch whose CPU inference runs channels_last


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
        return adm_upsample_forward(self, x)


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
        if type(self.op) is not nn.AvgPool2d or has_hooks(self.op):
            return self.op(x)
        return avg_pool2x(x)  # the pool's numbers, faster on an NCHW CPU tensor


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding, by AdaGN (scale/shift) or by addition.

    With ``up``/``down`` it is BigGAN's resampling block: resample after the first norm+SiLU,
    and resample the skip path the same way (no learned resampling).
    """

    # Checkpointing replays the forward's dropout masks; compat's networks draw new ones, as the
    # original's (``compat.unet.recompute_as_the_original``).
    preserve_rng_state = True

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
            AdaGroupNormSiLU(32, self.out_channels, keep_dtype=True)
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
        return maybe_checkpoint(
            self._forward, x, emb, enabled=self.use_checkpoint, preserve_rng_state=self.preserve_rng_state
        )

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
        h = _pointwise(self.proj_out, self.attention(_pointwise(self.qkv, self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


def _pointwise(conv: nn.Conv1d, h: torch.Tensor) -> torch.Tensor:
    """The 1x1 ``conv(h)``; on a channels-last h ([B, C, T] with C innermost: a channels-last
    torso's view) as a matmul over [B, T, C], whose output is channels-last too, where the conv
    would copy h to NCHW first. A conv with hooks is called as it is."""
    if h.stride(1) != 1 or h.is_contiguous() or has_hooks(conv):
        return conv(h)
    return F.linear(h.mT, conv.weight[:, :, 0], conv.bias).mT


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


def _make_time_embed(model_channels: int) -> nn.Sequential:
    emb_dim = model_channels * 4
    return nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def _build_down_half(model: nn.Module, c: NetConfig, in_channels: int) -> tuple[list[int], int, int, int]:
    """Create ``model.input_blocks`` and ``model.middle_block``.

    Returns (channels after each input block, final channels, final downsample factor, summed
    channels of all blocks - the spatial pools' feature size).
    """
    ch = c.widths[0]
    model.input_blocks = nn.ModuleList(
        [TimestepEmbedSequential(conv_nd(c.dims, in_channels, ch, 3, padding=1))]
    )
    chans = [ch]
    ds = 1
    for level, width in enumerate(c.widths):
        for _ in range(c.num_res_blocks):
            layers: list[nn.Module] = [_resblock(c, ch, width)]
            ch = width
            if ds in c.attention_ds:
                layers.append(_attention(c, ch, c.num_heads))
            model.input_blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(c.widths) - 1:
            down = (
                _resblock(c, ch, ch, down=True)
                if c.resblock_updown
                else Downsample(ch, c.conv_resample, c.dims, ch)
            )
            model.input_blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    model.middle_block = TimestepEmbedSequential(
        _resblock(c, ch), _attention(c, ch, c.num_heads), _resblock(c, ch)
    )
    return chans, ch, ds, sum(chans) + ch


def _resblock(c: NetConfig, ch: int, out_ch: int | None = None, **updown) -> ResBlock:
    return ResBlock(
        ch,
        c.model_channels * 4,
        c.dropout,
        out_channels=out_ch,
        dims=c.dims,
        use_checkpoint=c.use_checkpoint,
        use_scale_shift_norm=c.use_scale_shift_norm,
        **updown,
    )


def _attention(c: NetConfig, ch: int, num_heads: int) -> AttentionBlock:
    return AttentionBlock(
        ch,
        num_heads=num_heads,
        num_head_channels=c.num_head_channels,
        use_checkpoint=c.use_checkpoint,
        use_new_attention_order=c.use_new_attention_order,
    )


class _ADMNet(nn.Module):
    """What the UNet and the classifier share: the config, the timestep MLP and the fp16-torso
    switch. The original's configuration attributes stay readable (``model.image_size``...)."""

    input_blocks: nn.ModuleList

    def __init__(self, config: NetConfig, out_channels: int):
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.in_channels = config.in_channels
        self.model_channels = config.model_channels
        self.out_channels = out_channels
        self.num_res_blocks = config.num_res_blocks
        self.attention_resolutions = config.attention_ds
        self.dropout = config.dropout
        self.channel_mult = config.levels
        self.conv_resample = config.conv_resample
        self.use_checkpoint = config.use_checkpoint
        self.num_heads = config.num_heads
        self.num_head_channels = config.num_head_channels
        self.num_heads_upsample = config.heads_upsample
        self.time_embed = _make_time_embed(config.model_channels)

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

    @staticmethod
    def batch_timesteps(x, timesteps) -> torch.Tensor:
        """timesteps as a tensor [N], one per image. One timestep [1] serves the whole batch, as
        it broadcasts in guided-diffusion; a Python int, a 0-d tensor or a list failed deep in the
        timestep embedding, and another count was said about y."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a tensor [N, C, H, W], got {type(x).__name__}")
        if torch.jit.is_tracing() and isinstance(timesteps, torch.Tensor):
            return timesteps  # a traced size's test warns (TracerWarning), as in the ops
        if isinstance(timesteps, torch.Tensor) and timesteps.shape == (1,):
            return timesteps.expand(x.shape[0])
        if not (isinstance(timesteps, torch.Tensor) and timesteps.shape == (x.shape[0],)):
            got = list(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
            raise ValueError(f"timesteps must be a tensor [N]=[{x.shape[0]}] or [1], got {got}")
        return timesteps

    def _time_emb(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(emb.to(self.time_embed[0].weight.dtype))


class UNetModel(_ADMNet):
    """The ADM denoiser: a UNet with timestep (and optional class) embedding and attention.

    ``use_fp16`` keeps the torso's convs in fp16 (guided-diffusion's fp16 mode); the modern
    alternative is an fp32 model under ``torch.autocast``, which computes the same parts in low
    precision (the embeddings and the output head stay fp32 either way).
    """

    def __init__(self, config: UNetConfig, in_channels: int | None = None):
        """``in_channels`` of the first conv when it differs from the image's (the upsampler)."""
        super().__init__(config, config.out_channels)
        c = config
        self.num_classes = c.num_classes
        emb_dim = c.model_channels * 4
        if c.num_classes is not None:
            # Built around an empty weight, then initialised as nn.Embedding does (same RNG draw),
            # except on the meta device: there normal_ would import torch._dynamo (~4 s of start-up).
            self.label_emb = nn.Embedding(c.num_classes, emb_dim, _weight=torch.empty(c.num_classes, emb_dim))
            if not self.label_emb.weight.is_meta:
                nn.init.normal_(self.label_emb.weight)

        chans, ch, ds, _ = _build_down_half(self, c, in_channels or c.in_channels)
        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(c.widths))):
            for i in range(c.num_res_blocks + 1):
                layers: list[nn.Module] = [_resblock(c, ch + chans.pop(), width)]
                ch = width
                if ds in c.attention_ds:
                    layers.append(_attention(c, ch, c.heads_upsample))
                if level and i == c.num_res_blocks:
                    layers.append(
                        _resblock(c, ch, ch, up=True)
                        if c.resblock_updown
                        else Upsample(ch, c.conv_resample, dims=c.dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, silu=True),
            nn.Identity(),
            zero_module(conv_nd(c.dims, c.widths[0], c.out_channels, 3, padding=1)),
        )
        if c.use_fp16:
            self.convert_to_fp16()

    def _torso(self) -> tuple[nn.Module, ...]:
        return self.input_blocks, self.middle_block, self.output_blocks

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning vector: time embedding plus the class embedding when conditional."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self._time_emb(timesteps)
        if y is not None:
            if not torch.jit.is_tracing() and y.shape != (timesteps.shape[0],):
                raise ValueError(f"y must have shape [N]={list(timesteps.shape)}, got {list(y.shape)}")
            emb = emb + self.label_emb(y)
        return emb

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        timesteps = self.batch_timesteps(x, timesteps)
        with outside_autocast(x):  # under autocast only the torso computes in low precision
            emb = self.embed(timesteps, y)
        hs = []
        h = x.to(self.dtype)
        channels_last = _channels_last_torso(x)
        for module in self.input_blocks:
            h = module(h, emb)
            if channels_last:  # a copy after the first block alone: the convs keep the layout
                h = h.contiguous(memory_format=torch.channels_last)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        with outside_autocast(x):
            out = self.out(h.to(x.dtype))
        return out.contiguous() if channels_last else out


def _channels_last_torso(x: torch.Tensor) -> bool:
    """Whether the torso runs channels_last: in an inference pass over 2-D images on the CPU from
    a batch of ``CHANNELS_LAST_MIN_BATCH``, where oneDNN runs NHWC convolutions without reordering
    each input and output (the bundled model's 3x3 convs 1.1-1.7x faster at one thread on an AVX2
    machine, torch 2.13) and the ops take their channels-last paths. Smaller batches run NCHW:
    torch runs a batch of one's small convs on its native kernels, slower on channels_last, and
    the channels-last norm costs more there (74 against 27 us at [1, 64, 8, 8]). A UNet forward,
    ms of CPU at one thread (AMD EPYC, AVX-512; medians of 15 interleaved rounds under a load of
    3-4), channels_last throughout against NCHW: the bundled model at batch 1 25.5 / 22.4, 2
    47.0 / 42.3, 4 66.4 / 63.6, 8 116.8 / 112.2, 16 204.7 / 217.6; 64 px, random weights, the
    imagenet64 preset at batch 1 2786 / 2361 and 4 8927 / 8501, an upsampler of ADM-U's widths
    2182 / 1773 and 6521 / 6390. Not where autograd records (the native GroupNorm's backward is
    slow on channels_last), on other devices, nor in traced or compiled runs, whose graphs keep
    the layout they were written with."""
    inference = not torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4
    speed = not (traced() or force_reference())  # FASTDIFF_OPS=reference: the original's NCHW
    return inference and speed and x.shape[0] >= CHANNELS_LAST_MIN_BATCH


class SuperResModel(UNetModel):
    """ADM-U: a UNet conditioned on a low-resolution image, upsampled bilinearly and concatenated
    to the noisy input (so the first conv sees ``2 * in_channels`` channels)."""

    def __init__(self, config: SuperResConfig):
        super().__init__(config, in_channels=2 * config.in_channels)
        self.in_channels = 2 * config.in_channels  # as the original records it

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, low_res: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, y)


class EncoderUNetModel(_ADMNet):
    """The half UNet used as ADM's noisy-image classifier, with a choice of pooling head.

    ``num_classes`` is the number of logits (``out_channels``); there is no class input.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__(config, config.num_classes)
        c = config
        self.num_classes = c.num_classes
        _, ch, ds, feature_size = _build_down_half(self, c, c.in_channels)
        self.pool = c.pool
        if c.pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch, silu=True),
                nn.Identity(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(c.dims, ch, c.num_classes, 1)),
                nn.Flatten(),
            )
        elif c.pool == "attention":
            self.out = nn.Sequential(
                normalization(ch, silu=True),
                nn.Identity(),
                AttentionPool2d(c.image_size // ds, ch, c.num_head_channels, c.num_classes),
            )
        elif c.pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, c.num_classes),
            )
        else:  # "spatial_v2"
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                normalization(2048, silu=True),
                nn.Identity(),
                nn.Linear(2048, c.num_classes),
            )
        if c.use_fp16:
            self.convert_to_fp16()

    def _torso(self) -> tuple[nn.Module, ...]:
        return self.input_blocks, self.middle_block

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        timesteps = self.batch_timesteps(x, timesteps)
        with outside_autocast(x):  # under autocast only the torso computes in low precision
            emb = self._time_emb(timesteps)
        spatial = self.pool.startswith("spatial")
        pooled = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                pooled.append(h.to(x.dtype).mean(dim=tuple(range(2, h.dim()))))
        h = self.middle_block(h, emb)
        with outside_autocast(x):
            if spatial:
                pooled.append(h.to(x.dtype).mean(dim=tuple(range(2, h.dim()))))
                return self.out(torch.cat(pooled, dim=-1))
            return self.out(h.to(x.dtype))
