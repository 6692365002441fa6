"""The small MNIST CNN that scores MNIST samples offline: ``fastdiff evaluate``'s feature network
for 1-channel 28/32-px images (fastdiff/assets/mnist) and the trainer's sample-quality check.
Trained by ``fastdiff.training.evaluate.train_mnist_cnn``."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn


class MnistCNN(nn.Module):
    """Three conv stages and a 128-d feature layer: small enough to train on 2 CPU cores in a minute."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.feature_dim, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_mnist_cnn(path: str | os.PathLike, device: str = "cpu") -> MnistCNN:
    cnn = MnistCNN()
    cnn.load_state_dict(load_file(str(path)))
    return cnn.to(device).eval()
