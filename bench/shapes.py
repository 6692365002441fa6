"""Benchmark shapes: the ADM ImageNet presets on CUDA, tiny look-alikes on the CPU.

The GroupNorm shapes are one (C, H, W) per U-Net level (``model_channels * mult`` at
``image_size / 2**level``), deduplicated across the three presets; the attention shapes are the
blocks at resolutions 32, 16 and 8 with each preset's head configuration and qkv order.
``FASTDIFF_BENCH_SIZE=tiny|full`` overrides the choice made from ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

GROUPS = 32
EPS = 1e-5
MEMORY_LIMIT_BYTES = 8e9  # skip a combination whose fwd+bwd tensors exceed this

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Preset:
    name: str
    image_size: int
    model_channels: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    num_heads: int  # used when num_head_channels == -1
    num_head_channels: int
    order: str  # qkv layout: "new" (use_new_attention_order=True) or "legacy"

    def levels(self):
        """(level, channels, resolution) for every U-Net level."""
        for level, mult in enumerate(self.channel_mult):
            yield level, self.model_channels * mult, self.image_size // 2**level

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels if self.num_head_channels > 0 else self.num_heads


# guided-diffusion's released ImageNet flags (README "Model flags").
PRESETS = (
    Preset("im64", 64, 192, (1, 2, 3, 4), (32, 16, 8), 4, 64, "new"),
    Preset("im128", 128, 256, (1, 1, 2, 3, 4), (32, 16, 8), 4, -1, "legacy"),
    Preset("im256", 256, 256, (1, 1, 2, 2, 4, 4), (32, 16, 8), 4, 64, "legacy"),
)


@dataclass(frozen=True)
class GNCase:
    channels: int
    height: int
    width: int
    batch: int
    dtype: torch.dtype
    models: tuple[str, ...] = field(default=(), compare=False)
    groups: int = GROUPS

    @property
    def numel(self) -> int:
        return self.batch * self.channels * self.height * self.width

    def io_bytes(self, mode: str) -> int:
        """Minimum traffic: every tensor read once and written once.

        fwd reads x, writes y; bwd reads dy and x, writes dx; the [N, C] / [C] side tensors and
        the fp32 [N, G] statistics are counted too (they are small); dx writes no parameter grads.
        """
        elem = torch.finfo(self.dtype).bits // 8
        big = self.numel * elem
        side = 2 * self.batch * self.channels * elem + 2 * self.channels * 4  # scale, shift, weight, bias
        stats = 2 * self.batch * self.groups * 4
        fwd = 2 * big + side
        bwd = 3 * big + 2 * side + stats
        return {"fwd": fwd, "bwd": bwd, "dx": bwd - side, "fwdbwd": fwd + bwd}[mode]

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}-b{self.batch}-{DTYPE_NAMES[self.dtype]}"


@dataclass(frozen=True)
class AttnCase:
    channels: int
    heads: int
    resolution: int
    batch: int
    dtype: torch.dtype
    order: str
    models: tuple[str, ...] = field(default=(), compare=False)

    @property
    def length(self) -> int:
        return self.resolution**2

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    def io_bytes(self, mode: str) -> int:
        """fwd reads qkv and writes out; bwd reads qkv, out, dout and writes dqkv."""
        elem = torch.finfo(self.dtype).bits // 8
        one = self.batch * self.channels * self.length * elem
        fwd = 4 * one
        bwd = 8 * one
        return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]

    def flops(self, mode: str) -> int:
        """2 matmuls forward (4*B*H*T^2*d), 5 backward (the FlashAttention convention)."""
        fwd = 4 * self.batch * self.heads * self.length**2 * self.head_dim
        return {"fwd": fwd, "bwd": 5 * fwd // 2, "fwdbwd": 7 * fwd // 2}[mode]

    def __str__(self) -> str:
        return (
            f"{self.channels}c-{self.heads}h-T{self.length}-{self.order}-b{self.batch}-"
            f"{DTYPE_NAMES[self.dtype]}"
        )


@dataclass(frozen=True)
class UpCase:
    """ADM's upsampler at one level: x [B, C, H, H] -> nearest 2x -> 3x3 conv C -> C."""

    channels: int
    resolution: int  # of the input; the output is twice that
    batch: int
    dtype: torch.dtype
    models: tuple[str, ...] = field(default=(), compare=False)

    def io_bytes(self, mode: str) -> int:
        """fwd reads x and writes y (4x x's size); the backward reads dy and writes dx; the
        3x3 weight is counted once per pass."""
        elem = torch.finfo(self.dtype).bits // 8
        x = self.batch * self.channels * self.resolution**2 * elem
        w = 9 * self.channels**2 * elem
        fwd = 5 * x + w
        bwd = 5 * x + 2 * w + x  # dy, x (for dweight) -> dx, dweight
        return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]

    def flops(self, mode: str) -> int:
        """The layer's FLOPs as guided-diffusion computes it (a 3x3 conv at the output size);
        the same count for every implementation, so the fold's fewer multiply-adds show as speed."""
        fwd = 2 * self.batch * self.channels**2 * 9 * (2 * self.resolution) ** 2
        return {"fwd": fwd, "bwd": 2 * fwd, "fwdbwd": 3 * fwd}[mode]

    def __str__(self) -> str:
        return f"{self.channels}x{self.resolution}x{self.resolution}-b{self.batch}-{DTYPE_NAMES[self.dtype]}"


def bench_size() -> str:
    size = os.environ.get("FASTDIFF_BENCH_SIZE", "").strip().lower()
    if size in ("tiny", "full"):
        return size
    if size:
        raise ValueError(f"FASTDIFF_BENCH_SIZE must be 'tiny' or 'full', not {size!r}")
    return "full" if torch.cuda.is_available() else "tiny"


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Run order when the time budget is short (lower first; the GPU run is cut at its deadline):
# the targets (guided DDIM-25 at ImageNet-256 against the original, the UNet's MFU there)
# first, then the fused kernels' fp16 rows, and torch.compile's cold compiles (minutes each) late.
TARGET_ROWS = {("gd", "loop"), ("graph", "loop"), ("graph-loop", "loop"), ("gd", "unet"), ("eager", "unet")}


def priority(case: GNCase | AttnCase | UpCase) -> int:
    """An op row's place: fp16 batch 8, then (after the compiled baseline of the targets) fp16
    batch 64, the upsampler (a conv, whatever its path) and fp16 batch 1, then the other dtypes."""
    if isinstance(case, UpCase):
        return 4
    if case.dtype == torch.float16:
        return {8: 1, 64: 3}.get(case.batch, 4)
    return 6 if case.batch == 8 else 8


def sampling_priority(name: str, impl: str, mode: str) -> int:
    """A sampling row's place on the same scale as ``priority``."""
    if name == "imagenet256" and (impl, mode) in TARGET_ROWS:
        return 0
    if name == "imagenet256" and (impl, mode) == ("gd-compile", "loop"):
        return 2  # the 1.5x target's baseline
    return 7 if "compile" in impl else 5


def gn_cases(size: str | None = None) -> list[GNCase]:
    size = size or bench_size()
    if size == "tiny":
        return [GNCase(32, 4, 4, 2, torch.float32, ("tiny",)), GNCase(64, 8, 8, 2, torch.float16, ("tiny",))]
    shapes: dict[tuple[int, int], list[str]] = {}
    for preset in PRESETS:
        for level, ch, res in preset.levels():
            shapes.setdefault((ch, res), []).append(f"{preset.name}-L{level}")
    cases = []
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for b in (1, 8, 64):
            for (ch, res), models in shapes.items():
                case = GNCase(ch, res, res, b, dt, tuple(models))
                if case.io_bytes("fwdbwd") <= MEMORY_LIMIT_BYTES:
                    cases.append(case)
    return cases


def attn_cases(size: str | None = None) -> list[AttnCase]:
    size = size or bench_size()
    if size == "tiny":
        return [
            AttnCase(64, 2, 4, 2, torch.float16, "new", ("tiny",)),
            AttnCase(64, 2, 4, 2, torch.bfloat16, "legacy", ("tiny",)),
        ]
    blocks: dict[tuple[int, int, int, str], list[str]] = {}
    for preset in PRESETS:
        for level, ch, res in preset.levels():
            if res in preset.attention_resolutions:
                key = (ch, preset.heads(ch), res, preset.order)
                blocks.setdefault(key, []).append(f"{preset.name}-L{level}")
    cases = []
    for dt in (torch.float16, torch.bfloat16):
        for b in (1, 8, 64):
            for (ch, heads, res, order), models in blocks.items():
                case = AttnCase(ch, heads, res, b, dt, order, tuple(models))
                # the einsum baseline materialises B*H*T^2 weights (input dtype and fp32)
                elem = torch.finfo(dt).bits // 8
                weights = 2 * b * heads * res**4 * (elem + 4)
                if case.io_bytes("fwdbwd") + weights <= MEMORY_LIMIT_BYTES:
                    cases.append(case)
    return cases


def up_cases(size: str | None = None) -> list[UpCase]:
    """Every level that upsamples into the one above (an up ResBlock with resblock_updown, as all
    three presets use), deduplicated; fp16 at batch 8 only (the issue's ImageNet-256 target), the
    dtype the released sampling commands run: each row builds its own torch.compile baseline."""
    size = size or bench_size()
    if size == "tiny":
        return [UpCase(32, 4, 2, torch.bfloat16, ("tiny",)), UpCase(64, 8, 2, torch.float16, ("tiny",))]
    shapes: dict[tuple[int, int], list[str]] = {}
    for preset in PRESETS:
        for level, ch, res in preset.levels():
            if level > 0:
                shapes.setdefault((ch, res), []).append(f"{preset.name}-L{level}")
    return [UpCase(ch, res, 8, torch.float16, tuple(models)) for (ch, res), models in shapes.items()]
