"""Score a sample batch against a reference batch, as ``evaluator.py ref.npz samples.npz`` does:
features of both, a file's precomputed statistics where it has them (the sample file's too), then
IS, FID, sFID, precision and recall."""

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
from .networks import Activations, FeatureNetwork, MnistFeatures, compute_activations, feature_sizes
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


def check_sets(ref: ImageBatch, samples: ImageBatch, config: EvaluationConfig) -> None:
    """The two sets hold enough images of one size: checked first, before a feature network is
    chosen (and its weights asked for)."""
    if ref.image_shape != samples.image_shape:
        (h, w, c), (sh, sw, sc) = ref.image_shape, samples.image_shape
        raise EvaluationError(
            f"the reference holds {h}x{w}x{c} images but the samples are {sh}x{sw}x{sc}; "
            "use the reference batch of the samples' resolution"
        )
    for batch in (ref, samples):
        if len(batch) < min_samples(config):
            raise EvaluationError(
                f"{batch.source} holds {len(batch)} images; precision/recall need at least "
                f"{min_samples(config)} (and FID wants thousands: the paper scores 50,000 samples)"
            )


def check_pair(ref: ImageBatch, samples: ImageBatch, net: FeatureNetwork, config: EvaluationConfig) -> None:
    """Everything that can be refused before any feature is computed."""
    check_sets(ref, samples, config)
    for batch in (ref, samples):
        net.check_images(batch.shape)
    with_stats = [batch for batch in (ref, samples) if batch.stats is not None]
    if with_stats:
        sizes = feature_sizes(net, ref.image_shape)
        for batch in with_stats:
            got = tuple(s.mu.shape[0] for s in batch.stats)
            if got != sizes:
                raise EvaluationError(
                    f"{batch.source} has precomputed statistics of {got[0]} (mu) and {got[1]} (mu_s) "
                    f"features but {net.name} gives {sizes[0]} and {sizes[1]}; use the --features they "
                    "were computed with (2048 and 2023: inception)"
                )


def _stats(batch: ImageBatch, acts: Activations) -> tuple[FeatureStats, FeatureStats]:
    """A file's precomputed statistics where it has them (ADM's evaluator reads them from the
    sample file as from the reference), else those of its features."""
    return batch.stats or (FeatureStats.of(acts.pool), FeatureStats.of(acts.spatial))


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
    device = torch.device(config.device)
    net.to(device).eval()  # before check_pair's probe, which training-mode batch norm would learn from
    check_pair(ref, samples, net, config)

    def acts(batch: ImageBatch, what: str) -> Activations | None:
        if activations is not None:
            return activations(batch, what)
        cb = progress(what, len(batch)) if progress else None
        return compute_activations(net, batch, config.batch_size, device, cb)

    ref_acts, smp_acts = acts(ref, "reference"), acts(samples, "samples")
    if ref_acts is None or smp_acts is None:
        return None
    warnings = []
    dim = smp_acts.pool.shape[1]
    for batch, what in ((ref, "reference images"), (samples, "samples")):
        if batch.stats is None and len(batch) <= dim:
            warnings.append(
                f"{len(batch)} {what} for {dim} features: the covariance is singular and FID is biased "
                f"upward; use more than {dim} (the paper uses 50,000)"
            )
    if samples.stats is not None:
        warnings.append(f"{samples.source} has precomputed statistics: FID and sFID use them, not its images")
    ref_stats, smp_stats = _stats(ref, ref_acts), _stats(samples, smp_acts)
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
