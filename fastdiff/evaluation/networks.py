"""Feature networks for the metrics: the FID Inception-v3 (weights from a file) and the bundled
MNIST CNN (offline, for the 1-channel 28/32-px samples the bundled model makes).

Each turns uint8 NHWC images into :class:`Activations`: ``pool`` (FID, IS's input, precision and
recall), ``spatial`` (sFID) and ``logits`` (Inception Score).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastdiff.config import error_line
from fastdiff.models.checkpoint import ASSETS

from .inception import FIDInceptionV3
from .metrics import EvaluationError
from .mnist_cnn import load_mnist_cnn
from .npz import ImageBatch, from_array

BUNDLED_CNN = ASSETS / "mnist" / "cnn.safetensors"
INCEPTION_FILES = (
    "pt_inception-2015-12-05-6726825d.pth (pytorch-fid: "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth)"
    " or torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
)


@dataclass
class Activations:
    """Per-image features, float32: pool N x D, spatial N x S, logits N x classes."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


class FeatureNetwork(nn.Module):
    """A network the metrics read features from; subclasses say which images they take."""

    name: str = ""

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`EvaluationError` for images (N, H, W, C) this network cannot score."""

    def activations(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 N x H x W x C -> (pool, spatial, logits)."""
        raise NotImplementedError


class InceptionFeatures(FeatureNetwork):
    """ADM's evaluator network; 1-channel images are repeated to RGB."""

    def __init__(self, net: FIDInceptionV3, source: str = "random weights"):
        super().__init__()
        self.net = net
        self.name = f"inception-v3-fid ({source})"

    def check_images(self, shape):
        if shape[3] not in (1, 3):
            raise EvaluationError(f"Inception features need 1 or 3 channels, got {shape[3]}")

    def activations(self, images):
        x = images.permute(0, 3, 1, 2).float()
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


class MnistFeatures(FeatureNetwork):
    """The bundled MNIST CNN: 128-d penultimate features, its 10 logits, and for sFID the first
    7 channels of its second conv stage (8x8 after pooling, 448 values in NHWC order)."""

    SPATIAL_LAYERS = 6  # conv, relu, pool, conv, relu, pool

    def __init__(self, cnn: nn.Module, source: str):
        super().__init__()
        self.cnn = cnn.eval()
        self.name = f"mnist-cnn ({source})"

    def check_images(self, shape):
        if shape[3] != 1 or shape[1] != shape[2] or shape[1] not in (28, 32):
            raise EvaluationError(
                "the MNIST CNN scores 1-channel 28x28 or 32x32 images, "
                f"got {shape[1]}x{shape[2]}x{shape[3]}; use --features inception for other images"
            )

    def activations(self, images):
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-1] == 28:
            x = nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # as the training data was padded
        mid = self.cnn.features[: self.SPATIAL_LAYERS](x)
        pool = self.cnn.features[self.SPATIAL_LAYERS :](mid)
        spatial = mid[:, :7].permute(0, 2, 3, 1).flatten(1)
        return pool, spatial, self.cnn.head(pool)


def _read_state_dict(path: Path) -> dict:
    from fastdiff.models.checkpoint import CheckpointError, load_state_dict

    try:
        return load_state_dict(path)
    except CheckpointError as e:
        raise EvaluationError(error_line(e)) from None


def load_inception(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The FID Inception from pytorch-fid's or torch-fidelity's weight file (.pth or .safetensors)."""
    if path is None:
        raise EvaluationError(
            f"these images need the FID Inception weights: get {INCEPTION_FILES}, pass --inception PATH"
        )
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"Inception weights not found at {path}: get {INCEPTION_FILES}")
    sd = {k: v for k, v in _read_state_dict(path).items() if not k.endswith("num_batches_tracked")}
    fc = sd.get("fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[1] != 2048:
        raise EvaluationError(
            f"{path} is not an Inception-v3 state dict (no 2048-input fc.weight); get {INCEPTION_FILES}"
        )
    net = FIDInceptionV3(num_logits=fc.shape[0])
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(sd))
    wrong = sorted(k for k in expected if k in sd and sd[k].shape != expected[k])
    if missing or wrong:
        what = f"missing {missing[0]}" if missing else f"{wrong[0]} has shape {tuple(sd[wrong[0]].shape)}"
        raise EvaluationError(f"{path} does not fit the FID Inception-v3 ({what}); get {INCEPTION_FILES}")
    net.load_state_dict(sd, strict=False)  # extra keys (AuxLogits in ImageNet files) are unused
    return InceptionFeatures(net.to(device).eval(), source=path.name)


def load_mnist_features(
    path: str | os.PathLike = BUNDLED_CNN, device: str | torch.device = "cpu"
) -> MnistFeatures:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"MNIST CNN weights not found at {path}")
    return MnistFeatures(load_mnist_cnn(path, device), source=path.name)


@torch.no_grad()
def compute_activations(
    net: FeatureNetwork,
    images: ImageBatch | np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
    batches: range | None = None,
) -> Activations:
    """Features of uint8 NHWC images, ``batch_size`` at a time; ``progress(n)`` after each batch.

    ``batches`` (of ``num_batches(images, batch_size)``) computes those batches only: one rank's
    share, cut on the batch boundaries one process uses, so the features are the same."""
    if isinstance(images, np.ndarray):
        images = from_array(images, "images")
    net.check_images(images.shape)
    batches = batches if batches is not None else range(num_batches(images, batch_size))
    count = images_in(images, batch_size, batches)
    # Each batch's features go into arrays of every image's (joining per-batch parts held them
    # twice: 2 GB of Inception features for 50,000 samples).
    whole: list[np.ndarray] = []
    at = 0
    with _full_fp32():
        for i, batch in enumerate(images.batches(batch_size)):
            if i not in batches:
                if i >= batches.stop:
                    break
                continue
            feats = [
                t.float().cpu().numpy() for t in net.activations(torch.from_numpy(np.array(batch)).to(device))
            ]
            whole = whole or [np.empty((count, *f.shape[1:]), np.float32) for f in feats]
            for out, f in zip(whole, feats):
                out[at : at + len(f)] = f
            at += len(batch)
            if progress is not None:
                progress(len(batch))
    return Activations(*whole)


@torch.no_grad()
def feature_sizes(net: FeatureNetwork, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(pool, spatial) feature sizes for images of ``image_shape`` (H, W, C), from one blank image:
    what precomputed statistics are checked against before the features are computed."""
    blank = torch.zeros((1, *image_shape), dtype=torch.uint8, device=next(net.parameters()).device)
    pool, spatial, _ = net.activations(blank)
    return pool.shape[1], spatial.shape[1]


def num_batches(images: ImageBatch, batch_size: int) -> int:
    return -(-len(images) // batch_size)


def images_in(images: ImageBatch, batch_size: int, batches: range) -> int:
    """How many images the batches ``batches`` (consecutive, of ``batch_size``) hold."""
    return min(len(images), batches.stop * batch_size) - batches.start * batch_size


@contextlib.contextmanager
def _full_fp32():
    """No TF32 in convolutions and matmuls while features are computed (cuDNN uses it by
    default on Ampere+, a 1e-3 relative error the FID would carry)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
