"""The sample-quality numbers of ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``),
re-derived in numpy/torch so they need no TensorFlow.

- FID / sFID: Frechet distance of Gaussians fitted to features (``mu``: mean, ``sigma``: the
  unbiased covariance, as ``np.cov``). The trace of the matrix square root comes from the
  eigenvalues of a symmetric matrix similar to ``sigma_1 sigma_2``, which equals
  ``trace(sqrtm(sigma_1 sigma_2))`` for covariances and needs no scipy; tiny negative eigenvalues
  from rounding count as zero (the original keeps the real part of sqrtm).
- Inception Score: ``exp(E_x KL(p(y|x) || p(y)))`` per split of 5000 samples, averaged over splits.
- Improved precision / recall (Kynkaanniemi et al.): a sample is on the reference manifold when it
  lies within the k-th (k=3) nearest-neighbour distance of some reference feature, and vice versa.
  Distances are squared Euclidean over blocks of 10,000 x 10,000 features; like the original they
  are rounded to float16 (float32 for a block whose float16 values overflow), which decides ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

IS_SPLIT_SIZE = 5000


class EvaluationError(ValueError):
    """Bad evaluation input (shapes that do not match, too few samples); the CLI prints one line."""


@dataclass(frozen=True)
class FeatureStats:
    """A Gaussian fitted to features: what FID compares (and what reference npz files precompute)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features) -> FeatureStats:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise EvaluationError(f"statistics need at least 2 feature vectors, got shape {x.shape}")
        return cls(x.mean(0), np.cov(x, rowvar=False))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))."""
    mu_a, mu_b = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s_a, s_b = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu_a.shape != mu_b.shape or s_a.shape != s_b.shape or s_a.shape != mu_a.shape * 2:
        raise EvaluationError(
            f"statistics of different feature sizes: mu {mu_a.shape} vs {mu_b.shape}, "
            f"sigma {s_a.shape} vs {s_b.shape}"
        )
    # eig(S_a S_b) = eig(R^T S_b R) for any S_a = R R^T, and R^T S_b R is symmetric PSD. R is the
    # Cholesky factor (5x cheaper than an eigendecomposition) unless S_a is singular (fewer
    # samples than features), then the symmetric square root.
    sym_a = (s_a + s_a.T) / 2
    try:
        root_a = np.linalg.cholesky(sym_a)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sym_a)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a.T @ s_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits of exp(mean KL(p(y|x) || mean p(y))); probabilities from the
    softmax of ``logits`` (the original's logits are pool features times the fc weight, no bias)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim != 2 or not len(z):
        raise EvaluationError(f"inception score needs N x classes logits, got shape {tuple(z.shape)}")
    log_p = torch.log_softmax(z, dim=1)
    scores = []
    for i in range(0, len(z), split_size):
        part = log_p[i : i + split_size]
        log_marginal = torch.logsumexp(part, 0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


@dataclass(frozen=True)
class ManifoldConfig:
    """How precision/recall estimate manifolds; the defaults are the original evaluator's."""

    k: int = 3
    row_batch_size: int = 10000
    col_batch_size: int = 10000
    distances: Literal["float16", "float32"] = "float16"
    device: str = "cpu"


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float64)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor, config: ManifoldConfig) -> torch.Tensor:
    """Squared Euclidean distances |u|^2 - 2 u.v + |v|^2 (clamped at 0), float32.

    "float16" rounds inputs and each intermediate result to float16 as the original's GPU graph
    does (products accumulate exactly here, in float64), falling back to float32 for the whole
    block when a float16 value overflows."""

    def block(dtype: torch.dtype) -> torch.Tensor:
        a, b = _round(u, dtype), _round(v, dtype)
        na, nb = _round(_round(a * a, dtype).sum(1), dtype), _round(_round(b * b, dtype).sum(1), dtype)
        ab2 = 2 * _round(a @ b.T, dtype)
        return _round(_round(na[:, None] - ab2, dtype) + nb[None, :], dtype).clamp(min=0).float()

    if config.distances == "float16":
        d = block(torch.float16)
        if torch.isfinite(d).all():
            return d
    return block(torch.float32)


def _as_features(x, config: ManifoldConfig) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=config.device).to(torch.float64)


def manifold_radii(features, config: ManifoldConfig = ManifoldConfig()) -> torch.Tensor:
    """Each feature's distance to its k-th nearest neighbour (itself counted at distance ~0)."""
    x = _as_features(features, config)
    if len(x) <= config.k:
        raise EvaluationError(f"precision/recall need more than k={config.k} samples per set, got {len(x)}")
    radii = []
    for r in range(0, len(x), config.row_batch_size):
        rows = x[r : r + config.row_batch_size]
        # Each column block's k+1 smallest only (the row's k+1-th smallest is among them): the
        # whole row block by every feature, 2 GB for 50,000 samples (and again to join it), is
        # never held.
        nearest = []
        for c in range(0, len(x), config.col_batch_size):
            d = pairwise_distances(rows, x[c : c + config.col_batch_size], config)
            nearest.append(d.topk(min(config.k + 1, d.shape[1]), dim=1, largest=False).values)
        radii.append(torch.cat(nearest, dim=1).kthvalue(config.k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_features, sample_features, config: ManifoldConfig = ManifoldConfig()):
    """-> (precision, recall): the fraction of samples inside the reference manifold, and of
    reference features inside the samples' manifold."""
    ref, smp = _as_features(ref_features, config), _as_features(sample_features, config)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise EvaluationError(f"feature shapes do not match: {tuple(ref.shape)} vs {tuple(smp.shape)}")
    r_ref, r_smp = manifold_radii(ref, config), manifold_radii(smp, config)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=ref.device)
    rows, cols = config.row_batch_size, config.col_batch_size
    for i in range(0, len(ref), rows):
        for j in range(0, len(smp), cols):
            d = pairwise_distances(ref[i : i + rows], smp[j : j + cols], config)
            ref_in[i : i + len(d)] |= (d <= r_smp[None, j : j + d.shape[1]]).any(1)
            smp_in[j : j + d.shape[1]] |= (d <= r_ref[i : i + len(d), None]).any(0)
    return float(smp_in.double().mean()), float(ref_in.double().mean())
