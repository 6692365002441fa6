"""The feature pass of ``fastdiff evaluate`` and ``fastdiff nearest`` over torchrun's ranks: the
batches cut where one process cuts them, so the gathered features, and the scores, are one
process's."""

from __future__ import annotations

import numpy as np

from fastdiff import distributed
from fastdiff.evaluation.metrics import EvaluationError
from fastdiff.evaluation.networks import Activations, compute_activations, images_in, num_batches
from fastdiff.runs import ranks
from fastdiff.runs.errors import RunError


def features_over_ranks(net, batch_size: int, device, progress):
    """``activations(batch, what)`` (fastdiff.evaluation.scores.evaluate takes it): each rank its block
    of batches, gathered in order on rank 0; None on the other ranks. A user error on any rank is
    every rank's RunError. ``progress(what, images)`` gives the callback a rank's pass reports to.
    """

    def features(batch, what: str) -> Activations | None:
        mine = ranks.share(range(num_batches(batch, batch_size)))
        done = None
        with ranks.agreed(f"computing the {what} features"):
            if len(mine):
                images = images_in(batch, batch_size, mine)
                try:
                    done = compute_activations(net, batch, batch_size, device, progress(what, images), mine)
                except EvaluationError as e:
                    raise RunError(str(e)) from None
        parts = [p for p in distributed.gather_objects(done) or [] if p is not None]
        if not distributed.is_main():
            return None
        if len(parts) == 1:
            return parts[0]
        return Activations(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("pool", "spatial", "logits"))
        )

    return features
