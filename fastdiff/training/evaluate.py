"""Sample quality for MNIST models, judged by an independent CNN (not the noisy classifier).

The CNN is trained on the same 4,500-digit training split the diffusion model sees and checked
on the 500 held-out digits. ``class_match`` is the fraction of class-conditional samples the
CNN reads as the requested digit; ``frechet_distance`` over the CNN's penultimate features is an
FID-like score (lower is better) that needs no Inception network and works offline.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastdiff.evaluation import metrics
from fastdiff.evaluation.mnist_cnn import MnistCNN
from fastdiff.models.checkpoint import save_weights

from .data import get_mnist


def _as_tensor(images) -> torch.Tensor:
    """Accept [-1, 1] NCHW floats or uint8 NHWC/NHW arrays (as samplers save them)."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != (1, 32, 32):
        raise ValueError(f"expected MNIST images of shape N x 1 x 32 x 32, got {tuple(x.shape)}")
    return x.float()


@torch.no_grad()
def _batched(cnn: MnistCNN, images, fn, batch_size: int = 500) -> torch.Tensor:
    cnn.eval()
    x = _as_tensor(images)
    device = next(cnn.parameters()).device
    return torch.cat([fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations of up to ``max_shift`` pixels (background -1), the only augmentation."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def accuracy(cnn: MnistCNN, images, labels) -> float:
    """Fraction of images the CNN classifies as their label (for samples: the class match)."""
    pred = _batched(cnn, images, lambda b: cnn(b).argmax(-1))
    return float((pred == torch.as_tensor(labels)).float().mean())


def train_mnist_cnn(
    epochs: int = 10,
    seed: int = 0,
    out_path: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> tuple[MnistCNN, float]:
    """Train on the training split; -> (cnn, held-out accuracy). Saves safetensors if ``out_path``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train, val = get_mnist("train"), get_mnist("val")
    x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(train.labels)
    cnn = MnistCNN().to(device)
    opt = torch.optim.Adam(cnn.parameters(), lr=2e-3)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        cnn.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb = _shift(x[idx], gen).to(device)
            loss = F.cross_entropy(cnn(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    acc = accuracy(cnn, val.images, val.labels)
    if out_path is not None:
        save_weights(cnn.state_dict(), out_path, {"val_accuracy": acc, "epochs": epochs, "seed": seed})
    return cnn, acc


def cnn_features(images, cnn: MnistCNN) -> torch.Tensor:
    """Penultimate-layer (128-d) features, float64."""
    return _batched(cnn, images, cnn.features).double()


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """Frechet distance of Gaussians fitted to two feature sets (the FID formula of fastdiff.evaluation)."""
    return metrics.frechet_distance(metrics.FeatureStats.of(feat_a), metrics.FeatureStats.of(feat_b))


def evaluate_samples(images, labels, cnn: MnistCNN, reference: str = "train") -> dict[str, float]:
    """Class match of labelled samples and their Frechet distance to an MNIST split."""
    ref = get_mnist(reference)
    out = {"frechet_distance": frechet_distance(cnn_features(images, cnn), cnn_features(ref.images, cnn))}
    if labels is not None:
        out["class_match"] = accuracy(cnn, images, labels)
    return out
