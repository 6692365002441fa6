"""One typed, frozen config per ADM network kind; the networks are built from them.

guided-diffusion describes a network with loose command-line flags; fastdiff converts those at
its edges only (``flags.py``: presets, ``--flags``, checkpoint metadata, compat) and passes these
configs everywhere else. Each config checks itself when it is made, so a network that cannot be
built (a width GroupNorm cannot split, heads that do not divide the channels, an image size its
levels cannot halve) is a ConfigError naming the setting before any weights are allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastdiff.config import ConfigError, check_types, unknown_choice

# guided-diffusion's channel multipliers by image size (create_model / sr_create_model).
UNET_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),  # not in guided-diffusion: for 32x32 datasets such as MNIST
}
SUPERRES_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
GROUPS = 32  # ADM's GroupNorm splits every width into 32 groups


def _fitting(size: int, levels: tuple[float, ...]) -> str:
    """The first of ``levels`` that ``size`` can halve between (all a channel_mult fix keeps), as
    a flag value: a size error's fix is "pass channel_mult VALUE", which ``configs_from_flags``
    words as the CLI takes it."""
    halvings = (size & -size).bit_length() - 1  # the factors of 2 in size
    return ",".join(f"{m:g}" for m in levels[: halvings + 1])


@dataclass(frozen=True, kw_only=True)
class NetConfig:
    """The torso every ADM network shares (guided-diffusion's UNet constructor arguments).

    ``attention_resolutions`` are resolutions in pixels, as the flags give them (the networks
    use the downsample factors, :attr:`attention_ds`); an empty ``channel_mult`` takes
    guided-diffusion's choice for the image size (:attr:`levels`), so a copy at another size
    (``dataclasses.replace``) takes that size's choice.
    """

    kind: ClassVar[str]
    has_up_path: ClassVar[bool] = True  # the UNet's output_blocks, attending with heads_upsample
    _channel_mult_table: ClassVar[dict[int, tuple]] = UNET_CHANNEL_MULT

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    channel_mult: tuple[float, ...] = ()
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_fp16: bool = False
    use_checkpoint: bool = False
    conv_resample: bool = True
    dims: int = 2

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("image_size", "in_channels", "model_channels", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ConfigError(f"num_res_blocks must be at least 0, got {self.num_res_blocks}")
        for name in ("num_head_channels", "num_heads_upsample"):
            value = getattr(self, name)
            if value != -1 and value < 1:
                raise ConfigError(f"{name} must be -1 (unset) or at least 1, got {value}")
        if not 0 <= self.dropout <= 1:  # nn.Dropout's range, which the original takes
            raise ConfigError(f"dropout must be in [0, 1], got {self.dropout}")
        if self.dims not in (1, 2, 3):
            raise ConfigError(f"dims must be 1, 2 or 3, got {self.dims}")
        if any(r < 1 for r in self.attention_resolutions):
            raise ConfigError(f"attention_resolutions {self.attention_resolutions} must be positive")
        if not self.channel_mult and self.image_size not in self._channel_mult_table:
            sizes = ", ".join(map(str, sorted(self._channel_mult_table)))
            raise ConfigError(
                f"unsupported image size {self.image_size} without a channel_mult (the defaults are"
                f" for {sizes}): pass channel_mult {_fitting(self.image_size, (1, 2, 2, 2))}"
            )
        if any(m <= 0 for m in self.channel_mult):
            raise ConfigError(f"channel_mult {self.channel_mult} must be positive")
        halvings = len(self.levels) - 1  # each level after the first halves the resolution
        if self.image_size % 2**halvings:
            raise ConfigError(
                f"image_size {self.image_size} must be divisible by {2**halvings} (channel_mult has"
                f" {halvings + 1} levels; each after the first halves the image): pass channel_mult"
                f" {_fitting(self.image_size, self.levels)}"
            )
        widths, down = self.widths, self.down_widths
        if self.has_up_path or self.num_res_blocks:
            if any(w % GROUPS for w in widths):
                raise ConfigError(
                    f"every level's width (channel_mult x {self.model_channels} = {widths}) must be a"
                    f" multiple of {GROUPS} (GroupNorm)"
                )
        elif down[0] % GROUPS:
            raise ConfigError(
                f"the first level's width (channel_mult x {self.model_channels} = {down[0]}; with"
                f" num_res_blocks 0 every block has it) must be a multiple of {GROUPS} (GroupNorm)"
            )
        for level, width in enumerate(widths):
            if 2**level not in self.attention_ds:
                continue
            heads: dict[int, set[int]] = {}  # width -> the head counts attending at it
            if self.num_res_blocks:  # the down path attends after each res block
                heads.setdefault(down[level], set()).add(self.num_heads)
            if self.has_up_path:
                heads.setdefault(width, set()).add(self.heads_upsample)
            for w, counts in heads.items():
                self._check_heads(w, counts, level)
        self._check_heads(down[-1], {self.num_heads}, len(widths) - 1)  # the middle block always attends

    def _check_heads(self, width: int, heads: set[int], level: int) -> None:
        """The attention heads of resolution level ``level`` (0: full size), ``width`` channels."""
        if self.num_head_channels != -1:
            if width % self.num_head_channels:
                raise ConfigError(
                    f"width {width} is not divisible by num_head_channels {self.num_head_channels}"
                )
            return
        for n in sorted(heads):
            if width % n:
                raise ConfigError(f"width {width} is not divisible into {n} attention heads")

    @property
    def levels(self) -> tuple[float, ...]:
        """The channel multiplier of each resolution level (``channel_mult`` or the size's)."""
        return self.channel_mult or self._channel_mult_table[self.image_size]

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels at each resolution level."""
        return tuple(int(m * self.model_channels) for m in self.levels)

    @property
    def down_widths(self) -> tuple[int, ...]:
        """Channels of the down path at each level (the middle block's: the last): the level's width
        after its res blocks; with none, the input conv's width throughout (downsampling keeps it)."""
        return self.widths if self.num_res_blocks else self.widths[:1] * len(self.widths)

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """Downsample factors (``image_size // resolution``) of the attention levels."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    @property
    def heads_upsample(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample


@dataclass(frozen=True, kw_only=True)
class UNetConfig(NetConfig):
    """The ADM denoiser. ``num_classes`` None is unconditional; a classifier-free-guidance model
    counts its null label among the classes. ``learn_sigma`` doubles the output channels."""

    kind: ClassVar[str] = "diffusion"

    num_classes: int | None = None
    learn_sigma: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {self.num_classes}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


@dataclass(frozen=True, kw_only=True)
class SuperResConfig(UNetConfig):
    """ADM-U: a UNet at ``image_size`` (guided-diffusion's ``large_size``) conditioned on
    ``small_size`` images."""

    kind: ClassVar[str] = "superres"
    _channel_mult_table: ClassVar[dict[int, tuple]] = SUPERRES_CHANNEL_MULT

    image_size: int = 256
    small_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.small_size <= self.image_size:
            raise ConfigError(f"small_size must be in [1, {self.image_size}], got {self.small_size}")


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig(NetConfig):
    """ADM's noisy-image classifier: the UNet's down half and a pooling head with
    ``num_classes`` logits (guided-diffusion's classifier flags, 64-channel heads)."""

    kind: ClassVar[str] = "classifier"
    has_up_path: ClassVar[bool] = False  # the down half only: num_heads_upsample builds nothing

    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 1
    num_head_channels: int = 64
    resblock_updown: bool = True
    num_classes: int = 1000
    pool: str = "attention"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.pool not in POOLS:
            raise ConfigError(unknown_choice("pool", self.pool, POOLS))
        if self.pool == "attention" and self.num_head_channels == -1:
            raise ConfigError("pool 'attention' needs num_head_channels")

    def _check_heads(self, width: int, heads: set[int], level: int) -> None:
        """No flag sets a classifier's head width (guided-diffusion's 64): name the ones that set
        the width it must divide, at the level that attends (the last: the middle block and the
        pool attend there whatever attention_resolutions says, at the first level's width when
        there are no res blocks)."""
        try:
            super()._check_heads(width, heads, level)
        except ConfigError as e:
            size = self.image_size // 2**level
            fix = (
                f"raise model_channels or the {'last' if self.num_res_blocks else 'first'} channel_mult"
                if level == len(self.levels) - 1
                else f"raise model_channels or channel_mult's value at {size}x{size}, or leave {size}"
                " out of attention_resolutions"
            )
            width_note = (  # heads counted by num_heads (compat's EncoderUNetModel) have no width
                f" (the classifier's attention heads are {self.num_head_channels} channels, as"
                " guided-diffusion's)"
                if self.num_head_channels != -1
                else ""
            )
            raise ConfigError(f"{e}{width_note}: {fix}") from None
