"""Training: ADM's diffusion and noisy-classifier trainers, data, checkpoints, DDP, evaluation."""

from .checkpoint import (
    foreign_entries,
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    weights_files,
)
from .config import (
    PRECISIONS,
    ConfigError,
    TrainConfig,
    fit_classifier,
    fit_unet,
    parse_ema_rates,
)
from .data import (
    DataError,
    ImageFolderDataset,
    ShardedSampler,
    get_mnist,
    load_dataset,
    load_npz,
    match_classes,
)
from .ema import EMA
from .loop import TrainingError, TrainLoop, check_resume_settings
from .resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from .trainer import ClassifierTrainer, DiffusionTrainer

__all__ = [
    "EMA",
    "ClassifierTrainer",
    "ConfigError",
    "DataError",
    "DiffusionTrainer",
    "ImageFolderDataset",
    "LossSecondMomentResampler",
    "PRECISIONS",
    "ShardedSampler",
    "TrainConfig",
    "TrainLoop",
    "TrainingError",
    "UniformSampler",
    "check_resume_settings",
    "create_named_schedule_sampler",
    "fit_classifier",
    "fit_unet",
    "foreign_entries",
    "get_mnist",
    "latest_checkpoint",
    "load_checkpoint",
    "load_dataset",
    "load_npz",
    "match_classes",
    "parse_ema_rates",
    "resumable_checkpoint",
    "save_checkpoint",
    "weights_files",
]
