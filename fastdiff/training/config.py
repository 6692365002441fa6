"""What a training run is: its typed settings and the network config fitted to the data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastdiff.config import ConfigError
from fastdiff.diffusion.config import DiffusionConfig
from fastdiff.models.config import ClassifierConfig, NetConfig, UNetConfig
from fastdiff.models.flags import flags_of

from .data import DataError

PRECISIONS = ("fp32", "bf16", "fp16")


def parse_ema_rates(text) -> tuple[float, ...]:
    """ "0.9999,0.999" -> (0.9999, 0.999); empty -> no EMA."""
    parts = text if isinstance(text, (tuple, list)) else [r for r in str(text).split(",") if r.strip()]
    try:
        rates = tuple(float(r) for r in parts)
    except ValueError as e:
        raise ConfigError(f"EMA rates must be numbers like 0.9999,0.999, got {text!r}") from e
    for r in rates:
        if not 0 < r < 1:
            raise ConfigError(f"EMA rate {r} is not in (0, 1)")
    return rates


def check_cfg_dropout(cfg_dropout: float, class_cond: bool) -> None:
    """Classifier-free guidance's label dropout: a probability below 1, for a class-conditional model."""
    if not 0 <= cfg_dropout < 1:
        raise ConfigError(f"--cfg-dropout must be in [0, 1), got {cfg_dropout}")
    if cfg_dropout > 0 and not class_cond:
        raise ConfigError("--cfg-dropout needs a class-conditional model (class_cond True)")


def fit_unet(net: UNetConfig, dataset, cfg_dropout: float = 0.0) -> UNetConfig:
    """Fit a diffusion UNet to the data: size, channels, class count (+1 null class for CFG)."""
    check_cfg_dropout(cfg_dropout, net.num_classes is not None)
    num_classes = None
    if net.num_classes is not None:
        if not dataset.num_classes:
            raise DataError(
                "class_cond True needs labelled data (class subfolders, class_ prefixes or arr_1)"
            )
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
        raise DataError(
            "classifier training needs labelled data (class subfolders, class_ prefixes or arr_1)"
        )
    if dataset.num_classes < 2:
        raise DataError("classifier training needs at least 2 classes; the data has 1")
    return dataclasses.replace(
        net,
        image_size=dataset.image_size,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        use_fp16=False,
    )


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

    def record(self) -> dict[str, Any]:
        """The checkpoint's form: the settings, with the network and process as guided-diffusion
        flags (as every fastdiff checkpoint has stored them)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del values["net"], values["process"]
        return {"flags": flags_of(self.net, self.process), **values}
