"""Score a sample batch against a reference batch, as ``evaluator.py ref.npz samples.npz`` does:
features of both, the reference's precomputed statistics where it has them, then IS, FID, sFID,
precision and recall."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .metrics import (
    IS_SPLIT_SIZE,
    EvaluationError,
    FeatureStats,
    ManifoldConfig,
    frechet_distance,
    inception_score,
    precision_recall,
)
from .networks import Activations, FeatureNetwork, MnistFeatures, compute_activations
from .npz import ImageBatch


@dataclass(frozen=True)
class EvaluationConfig:
    """Batch sizes and device; the defaults are the original evaluator's."""

    batch_size: int = 64
    is_split_size: int = IS_SPLIT_SIZE
    manifold: ManifoldConfig = ManifoldConfig()
    device: str = "cpu"


@dataclass
class Scores:
    """The numbers, plus what they were measured with; ``to_dict`` is what ``--json`` writes."""

    fid: float
    sfid: float
    inception_score: float
    precision: float
    recall: float
    feature_network: str
    num_samples: int
    num_reference: int
    class_match: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["class_match"] is None:
            del d["class_match"]
        return d


def min_samples(config: EvaluationConfig) -> int:
    """Fewest images per set: the k-NN manifold needs k neighbours besides each image itself."""
    return config.manifold.k + 1


def check_same_images(ref: ImageBatch, samples: ImageBatch) -> None:
    """The two sets hold images of one size: checked first, before a feature network is chosen
    (and its weights asked for)."""
    if ref.image_shape != samples.image_shape:
        (h, w, c), (sh, sw, sc) = ref.image_shape, samples.image_shape
        raise EvaluationError(
            f"the reference holds {h}x{w}x{c} images but the samples are {sh}x{sw}x{sc}; "
            "use the reference batch of the samples' resolution"
        )


def check_pair(ref: ImageBatch, samples: ImageBatch, net: FeatureNetwork, config: EvaluationConfig) -> None:
    """Everything that can be refused before any feature is computed."""
    check_same_images(ref, samples)
    for batch in (ref, samples):
        net.check_images(batch.shape)
        if len(batch) < min_samples(config):
            raise EvaluationError(
                f"{batch.source} holds {len(batch)} images; precision/recall need at least "
                f"{min_samples(config)} (and FID wants thousands: the paper scores 50,000 samples)"
            )


def _stats(acts: Activations) -> tuple[FeatureStats, FeatureStats]:
    return FeatureStats.of(acts.pool), FeatureStats.of(acts.spatial)


def evaluate(
    ref: ImageBatch,
    samples: ImageBatch,
    net: FeatureNetwork,
    config: EvaluationConfig = EvaluationConfig(),
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    activations: Callable[[ImageBatch, str], Activations | None] | None = None,
) -> Scores | None:
    """``progress(what, total)`` returns the per-batch callback for one feature pass.

    ``activations(batch, what)``, when given, computes a set's features instead (the CLI's, split
    over torchrun's ranks); where it returns None (a rank that handed its share to rank 0),
    nothing is scored and evaluate returns None.
    """
    check_pair(ref, samples, net, config)
    device = torch.device(config.device)
    net.to(device).eval()

    def acts(batch: ImageBatch, what: str) -> Activations | None:
        if activations is not None:
            return activations(batch, what)
        cb = progress(what, len(batch)) if progress else None
        return compute_activations(net, batch, config.batch_size, device, cb)

    ref_acts, smp_acts = acts(ref, "reference"), acts(samples, "samples")
    if ref_acts is None or smp_acts is None:
        return None
    warnings = []
    ref_stats = ref.stats
    if ref_stats is not None and ref_stats[0].mu.shape != (ref_acts.pool.shape[1],):
        raise EvaluationError(
            f"{ref.source} has precomputed statistics of {ref_stats[0].mu.shape[0]} features but "
            f"{net.name} gives {ref_acts.pool.shape[1]}; they are Inception statistics: "
            "use --features inception"
        )
    ref_stats = ref_stats or _stats(ref_acts)
    smp_stats = _stats(smp_acts)
    dim = smp_acts.pool.shape[1]
    if len(samples) <= dim:
        warnings.append(
            f"{len(samples)} samples for {dim} features: the covariance is singular and FID is biased "
            f"upward; use more than {dim} (the paper uses 50,000)"
        )
    precision, recall = precision_recall(
        ref_acts.pool, smp_acts.pool, dataclasses.replace(config.manifold, device=str(device))
    )
    class_match = None
    if isinstance(net, MnistFeatures) and samples.labels is not None:
        class_match = float(np.mean(smp_acts.logits.argmax(1) == samples.labels))
    return Scores(
        fid=frechet_distance(smp_stats[0], ref_stats[0]),
        sfid=frechet_distance(smp_stats[1], ref_stats[1]),
        inception_score=inception_score(smp_acts.logits, config.is_split_size),
        precision=precision,
        recall=recall,
        feature_network=net.name,
        num_samples=len(samples),
        num_reference=len(ref),
        class_match=class_match,
        warnings=warnings,
    )
