"""What a training run is: its typed settings and the network config fitted to the data."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fastdiff import distributed
from fastdiff.choices import PRECISIONS
from fastdiff.config import ConfigError, check_types
from fastdiff.diffusion import SAMPLERS
from fastdiff.diffusion.config import DiffusionConfig
from fastdiff.diffusion.schedule import get_named_beta_schedule, space_timesteps
from fastdiff.models.config import ClassifierConfig, NetConfig, UNetConfig
from fastdiff.models.flags import flags_of

from .data import IMAGE_EXTENSIONS, DataError


def parse_ema_rates(text, option: str = "--ema") -> tuple[float, ...]:
    """ "0.9999,0.999" -> (0.9999, 0.999); empty -> no EMA. ``option`` is the name the caller's
    user gave the rates (compat's ``ema_rate``), as configs_from_flags's ``spelled``, so an
    error names what they typed."""
    parts = text if isinstance(text, (tuple, list)) else [r for r in str(text).split(",") if r.strip()]
    try:
        rates = tuple(float(r) for r in parts)
    except ValueError as e:
        raise ConfigError(
            f"{option}: EMA rates must be numbers like 0.9999,0.999, got {text!r}", usage=True
        ) from e
    for r in rates:
        if not 0 < r < 1:
            raise ConfigError(f"{option}: EMA rate {r} is not in (0, 1); give rates like 0.9999", usage=True)
    if len(set(rates)) < len(rates):
        raise ConfigError(f"{option}: EMA rates {text!r} name a rate twice", usage=True)
    return rates


def micro_batch(batch_size: int, microbatch: int, world: int) -> int:
    """Examples per forward pass: --microbatch where it splits a process' batch, else that batch."""
    local = batch_size // world
    return microbatch if 0 < microbatch < local else local


def check_batch(batch_size: int, microbatch: int, world: int) -> None:
    """The batch must split evenly over the processes and each process' share into micro-batches:
    checked with the config (torchrun's WORLD_SIZE is known before the process group), so before
    any data is read, and by TrainLoop for a process group set up without torchrun."""
    if batch_size % world:
        raise ConfigError(
            f"--batch-size {batch_size} is not divisible by the {world} processes;"
            f" pass a multiple of {world}",
            usage=True,
        )
    local = batch_size // world
    if local % micro_batch(batch_size, microbatch, world):
        per = f" per process ({world} processes)" if world > 1 else ""
        raise ConfigError(
            f"--microbatch {microbatch} does not divide the batch of {local}{per}; pass a divisor"
            f" of {local}, or 0 for none",
            usage=True,
        )


def check_cfg_dropout(cfg_dropout: float, class_cond: bool) -> None:
    """Classifier-free guidance's label dropout: a probability below 1, for a class-conditional model."""
    if not 0 <= cfg_dropout < 1:
        raise ConfigError(f"--cfg-dropout must be in [0, 1), got {cfg_dropout}", usage=True)
    if cfg_dropout > 0 and not class_cond:
        raise ConfigError(
            '--cfg-dropout needs a class-conditional model: add "--class_cond True" to --flags '
            "(unconditional is the default, as in guided-diffusion, even for labelled data)"
        )


def check_sample_steps(steps: int, diffusion_steps: int) -> None:
    """The preview grids' DDIM schedule must exist (``fastdiff sample --steps`` checks the same)."""
    if not 2 <= steps <= diffusion_steps:
        raise ConfigError(
            f"--sample-steps must be between 2 and diffusion_steps ({diffusion_steps}), got {steps}"
        )
    try:
        space_timesteps(diffusion_steps, SAMPLERS["ddim"].respacing(steps))
    except ValueError as e:
        raise ConfigError(f"--sample-steps {steps} with diffusion_steps {diffusion_steps}: {e}") from None


def _unlabelled(what: str, dataset) -> DataError:
    why = f"; {dataset.why_unlabelled}" if dataset.why_unlabelled else ""
    return DataError(f"{what} needs labelled data (class subfolders, class_ prefixes or arr_1){why}")


def _check_class_folders(dataset) -> None:
    """Where a folder's classes become a network's: a class folder without images (a failed
    download, images of an extension not read) would be no class, and every class after it would
    take the id before its own, in the weights for good; one line before any work instead."""
    empty = getattr(dataset, "empty_classes", ())
    if empty:
        raise DataError(
            f"class folder {dataset.root / empty[0]}{_more(empty)} holds no images"
            f" ({', '.join(IMAGE_EXTENSIONS)}): every class folder is a class; add its images or move it"
            " out of the data folder"
        )
    unread = getattr(dataset, "unread_classes", ())
    if unread:
        raise DataError(
            f"every image of class {unread[0]}{_more(unread)} is unreadable or corrupt (--skip-bad-images"
            " skipped them): it would be no class, the classes after it taking its id; fix them or take"
            " the class out"
        )


def _more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def fit_unet(net: UNetConfig, dataset, cfg_dropout: float = 0.0) -> UNetConfig:
    """Fit a diffusion UNet to the data: size, channels, class count (+1 row for CFG's null label)."""
    check_cfg_dropout(cfg_dropout, net.num_classes is not None)
    num_classes = None
    if net.num_classes is not None:
        if not dataset.num_classes:
            raise _unlabelled("class_cond True", dataset)
        _check_class_folders(dataset)
        num_classes = dataset.num_classes + (1 if cfg_dropout > 0 else 0)
    return dataclasses.replace(
        net,
        image_size=dataset.image_size,
        in_channels=dataset.channels,
        use_fp16=False,
        num_classes=num_classes,
    )


def fit_classifier(net: ClassifierConfig, dataset) -> ClassifierConfig:
    """Fit a classifier to the data: size, channels and one logit per class."""
    if not dataset.num_classes:
        raise _unlabelled("classifier training", dataset)
    _check_class_folders(dataset)
    if dataset.num_classes < 2:
        raise DataError("classifier training needs at least 2 classes; the data has 1")
    return dataclasses.replace(
        net,
        image_size=dataset.image_size,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        use_fp16=False,
    )


# The settings' lowest values (0 turns save_every, sample_every, eval_every and keep_last off).
_AT_LEAST = {
    "batch_size": 1,
    "microbatch": 0,
    "warmup_steps": 0,
    "lr_anneal_steps": 0,
    "max_steps": 1,
    "save_every": 0,
    "sample_every": 0,
    "num_samples": 1,
    "eval_every": 0,
    "log_every": 1,
    "seed": 0,
    "num_workers": 0,
    "keep_last": 0,
}


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; stored in every checkpoint (:meth:`record`)."""

    net: NetConfig
    process: DiffusionConfig
    out: str = "runs/train"
    batch_size: int = 16
    microbatch: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_anneal_steps: int = 0
    grad_clip: float = 1.0
    ema: tuple[float, ...] = (0.9999,)
    ema_warmup: bool = False
    precision: str = "fp32"
    schedule_sampler: str = "uniform"
    cfg_dropout: float = 0.0
    random_flip: bool = False
    max_steps: int = 1000
    save_every: int = 1000
    sample_every: int = 0
    sample_steps: int = 25
    num_samples: int = 16
    eval_every: int = 0
    log_every: int = 100
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    resume: bool = False
    progress: bool = True
    keep_last: int = 0

    def __post_init__(self) -> None:
        """Refuse what cannot work, naming the option: the CLI builds the config before it reads
        any data, so a typo costs nothing (torch would take a negative warm-up or clip silently)."""
        check_types(self)
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if value < low:
                need = "must not be negative" if low == 0 else f"must be at least {low}"
                raise ConfigError(f"--{name.replace('_', '-')} {need}, got {value}", usage=True)
        if self.seed >= 2**63:  # torch takes at most 2**64 - 1, and the data order seeds seed + epoch
            raise ConfigError(f"--seed must be >= 0 and < 2**63, got {self.seed}", usage=True)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}", usage=True)
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a number >= 0, got {value}", usage=True
                )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        parse_ema_rates(self.ema)
        check_batch(self.batch_size, self.microbatch, distributed.launched_world_size())
        check_cfg_dropout(
            self.cfg_dropout, isinstance(self.net, UNetConfig) and self.net.num_classes is not None
        )
        if self.sample_every:
            check_sample_steps(self.sample_steps, self.process.steps)
        if isinstance(self.net, UNetConfig):
            betas = get_named_beta_schedule(self.process.noise_schedule, self.process.steps)
            if betas.max() >= 1:  # the linear schedule's 20 steps: a last beta of 1 (sampling skips it)
                raise ConfigError(
                    f"the {self.process.noise_schedule} noise_schedule with diffusion_steps"
                    f" {self.process.steps} ends at alpha_bar 0, where the training loss is infinite;"
                    " train with more steps (sampling may respace them to fewer)"
                )

    def record(self) -> dict[str, Any]:
        """The checkpoint's form: the settings, with the network and process as guided-diffusion
        flags (as every fastdiff checkpoint has stored them). Not the invocation's own options:
        the folder's path (stale once it moves; two folders' runs were other bytes), --resume (a
        resumed run's checkpoints were not an uninterrupted one's) and the progress bar."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del values["net"], values["process"], values["out"], values["resume"], values["progress"]
        return {"flags": flags_of(self.net, self.process), **values}
