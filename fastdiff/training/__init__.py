"""Training: ADM's diffusion and noisy-classifier trainers, data, checkpoints, DDP, evaluation."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import DataError, ImageFolderDataset, ShardedSampler, get_mnist, load_dataset, load_npz
from .resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from .trainer import (
    EMA,
    MNIST_FLAGS,
    ClassifierTrainer,
    DiffusionTrainer,
    LossScaler,
    TrainConfig,
    parse_ema_rates,
    resolve_classifier_flags,
    resolve_flags,
)


def _register_mnist_preset() -> None:
    """The ``mnist`` preset (the bundled model's flags), once per process."""
    from fastdiff.models.presets import (
        PRESETS,
        Preset,
        diffusion_defaults,
        model_defaults,
        parse_flags,
        register_preset,
    )

    if "mnist" not in PRESETS:
        flags = {**model_defaults(), **diffusion_defaults(), **parse_flags(MNIST_FLAGS)}
        register_preset(
            Preset("mnist", "diffusion", flags, "class-conditional MNIST 32x32 (CFG null label 10)")
        )


_register_mnist_preset()

__all__ = [
    "EMA",
    "MNIST_FLAGS",
    "ClassifierTrainer",
    "DataError",
    "DiffusionTrainer",
    "ImageFolderDataset",
    "LossScaler",
    "LossSecondMomentResampler",
    "ShardedSampler",
    "TrainConfig",
    "UniformSampler",
    "create_named_schedule_sampler",
    "get_mnist",
    "latest_checkpoint",
    "load_checkpoint",
    "load_dataset",
    "load_npz",
    "parse_ema_rates",
    "resolve_classifier_flags",
    "resolve_flags",
    "save_checkpoint",
]
