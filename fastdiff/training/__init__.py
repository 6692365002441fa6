"""Training: ADM's diffusion and noisy-classifier trainers, data, checkpoints, DDP, evaluation."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import DataError, ImageFolderDataset, ShardedSampler, get_mnist, load_dataset, load_npz
from .resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from .trainer import (
    EMA,
    ClassifierTrainer,
    DiffusionTrainer,
    LossScaler,
    TrainConfig,
    TrainingError,
    parse_ema_rates,
    resolve_classifier_flags,
    resolve_flags,
)

__all__ = [
    "EMA",
    "ClassifierTrainer",
    "DataError",
    "DiffusionTrainer",
    "ImageFolderDataset",
    "LossScaler",
    "LossSecondMomentResampler",
    "ShardedSampler",
    "TrainConfig",
    "TrainingError",
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
