"""Memorisation check: each sample's nearest training images, in a feature space and in pixels,
judged against how close *held-out* images come to the training set.

A held-out image was never trained on, so its distance to the nearest training image is what
"new but similar" looks like. A sample closer to some training image than all but a ``quantile``
of the held-out images are is flagged as a possible copy; if the model does not copy, about
``quantile`` of the samples are flagged by chance, so the flagged fraction is read against it.
Pixel distances are RMS over pixels in [0, 1]; feature distances are Euclidean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .metrics import EvaluationError


@dataclass(frozen=True)
class NearestConfig:
    """How many neighbours to keep and where the flagging threshold sits."""

    k: int = 3
    quantile: float = 0.01
    batch_size: int = 1024
    device: str = "cpu"

    def __post_init__(self):
        if not 0 < self.quantile < 1:
            raise EvaluationError(f"quantile must be between 0 and 1, got {self.quantile}")
        if self.k < 1:
            raise EvaluationError(f"k must be at least 1, got {self.k}")


def nearest(
    query: np.ndarray, bank: np.ndarray, k: int, config: NearestConfig, rows=np.asarray
) -> tuple[np.ndarray, np.ndarray]:
    """-> (indices N x k, Euclidean distances N x k) of the k nearest rows of ``bank``, in float64.

    ``rows`` maps images to the vectors compared (:func:`pixels`), one query batch at a time: the
    queries' float64 vectors, 8 bytes a pixel, are never held whole. The neighbours are found
    with the expanded form (a matrix product); their distances are then taken directly, so an
    exact copy is at distance 0, not at the expansion's rounding noise."""
    b = torch.as_tensor(rows(bank), dtype=torch.float64, device=config.device)
    nb = (b * b).sum(1)
    k = min(k, len(b))
    idx, dist = [], []
    for i in range(0, len(query), config.batch_size):
        q = torch.as_tensor(rows(query[i : i + config.batch_size]), dtype=torch.float64, device=config.device)
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ b.T + nb
        j = d2.topk(k, dim=1, largest=False).indices
        exact = torch.stack([(q - b[j[:, c]]).norm(dim=1) for c in range(k)], dim=1)
        exact, order = exact.sort(dim=1, stable=True)
        idx.append(j.gather(1, order).cpu().numpy())
        dist.append(exact.cpu().numpy())
    return np.concatenate(idx), np.concatenate(dist)


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> N x (HWC) in [0, 1] / sqrt(HWC), so Euclidean distance = RMS pixel distance."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    return flat / 255.0 / np.sqrt(flat.shape[1])


def training_copies(heldout: np.ndarray, train: np.ndarray, config: NearestConfig) -> np.ndarray:
    """Which held-out images (uint8 NHWC) are training images pixel for pixel: they were trained
    on, and at distance 0 they would pull the threshold to 0, below every copy."""
    _, dist = nearest(heldout, train, 1, config, rows=pixels)
    return dist[:, 0] == 0


@dataclass
class SpaceResult:
    """One space (features or pixels): neighbours of samples and of held-out images."""

    sample_index: np.ndarray  # N x k training indices
    sample_distance: np.ndarray  # N x k
    heldout_distance: np.ndarray  # M (nearest only)
    threshold: float

    @property
    def flagged(self) -> np.ndarray:
        return self.sample_distance[:, 0] < self.threshold

    def summary(self) -> dict:
        q = [1, 5, 25, 50, 75, 95]
        return {
            "threshold": self.threshold,
            "flagged": int(self.flagged.sum()),
            "sample_to_train_percentiles": dict(
                zip(map(str, q), np.percentile(self.sample_distance[:, 0], q))
            ),
            "heldout_to_train_percentiles": dict(zip(map(str, q), np.percentile(self.heldout_distance, q))),
        }


def check_space(
    samples: np.ndarray, train: np.ndarray, heldout: np.ndarray, config: NearestConfig, rows=np.asarray
) -> SpaceResult:
    """Samples' and held-out images' neighbours in ``train``, compared as ``rows`` (see nearest)."""
    idx, dist = nearest(samples, train, config.k, config, rows)
    _, held = nearest(heldout, train, 1, config, rows)
    return SpaceResult(idx, dist, held[:, 0], float(np.quantile(held[:, 0], config.quantile)))


@dataclass
class MemorisationReport:
    features: SpaceResult
    pixels: SpaceResult
    feature_network: str
    quantile: float

    @property
    def flagged(self) -> np.ndarray:
        """Samples closer to a training image than held-out images come, in either space."""
        return self.features.flagged | self.pixels.flagged

    def suspicion_order(self) -> np.ndarray:
        """Samples by how much closer than the held-out median they sit to a training image
        (the smaller of the two spaces' ratios), most suspicious first."""
        ratio = np.minimum(
            self.features.sample_distance[:, 0] / max(np.median(self.features.heldout_distance), 1e-12),
            self.pixels.sample_distance[:, 0] / max(np.median(self.pixels.heldout_distance), 1e-12),
        )
        return np.argsort(ratio, kind="stable")

    def to_dict(self) -> dict:
        flagged = np.flatnonzero(self.flagged)
        return {
            "feature_network": self.feature_network,
            "num_samples": len(self.flagged),
            "num_heldout": len(self.features.heldout_distance),
            "quantile": self.quantile,
            "flagged_fraction": float(self.flagged.mean()),
            "expected_by_chance": self.quantile,
            "features": self.features.summary(),
            "pixels": self.pixels.summary(),
            "flagged": [
                {
                    "sample": int(i),
                    "feature_distance": float(self.features.sample_distance[i, 0]),
                    "feature_train_index": int(self.features.sample_index[i, 0]),
                    "pixel_distance": float(self.pixels.sample_distance[i, 0]),
                    "pixel_train_index": int(self.pixels.sample_index[i, 0]),
                }
                for i in flagged
            ],
        }


def neighbour_rows(
    report: MemorisationReport, samples: np.ndarray, train: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """Images for a grid: per sample in ``order``, the sample, its k feature neighbours, then its
    k pixel neighbours (uint8 NHWC, 1 + 2k per row)."""
    rows = []
    for i in order:
        rows.append(samples[i])
        rows.extend(train[j] for j in report.features.sample_index[i])
        rows.extend(train[j] for j in report.pixels.sample_index[i])
    return np.stack(rows)
