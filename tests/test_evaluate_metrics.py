"""The evaluation metrics against the original evaluator's numpy/scipy formulas on random features.

The numpy references below are written from guided-diffusion's ``evaluations/evaluator.py``
(scipy ``sqrtm`` FID, per-split IS, k-NN radii and manifold membership). With
FASTDIFF_GUIDED_DIFFUSION pointing at a guided-diffusion checkout, the original's own functions
run too (TensorFlow stubbed out: the distance block is replaced by numpy).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff.evaluation.metrics import (
    EvaluationError,
    FeatureStats,
    ManifoldConfig,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)

REL = 1e-6


def features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    mix = np.random.default_rng(12345).standard_normal((d, d)) / np.sqrt(d)  # one distribution
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ mix * scale + shift).astype(np.float32)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = a.mean(0, dtype=np.float64), b.mean(0, dtype=np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_is(logits: np.ndarray, split_size: int = 5000) -> float:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def numpy_distances(u: np.ndarray, v: np.ndarray, half: bool) -> np.ndarray:
    """The original's distance block: norm_u - 2 u v^T + norm_v, max 0; each op rounded to fp16."""
    r = (lambda x: x.astype(np.float16).astype(np.float64)) if half else (lambda x: x.astype(np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        u, v = r(u.astype(np.float64)), r(v.astype(np.float64))
        nu, nv = r(r(u * u).sum(1)), r(r(v * v).sum(1))
        d = np.maximum(r(r(nu[:, None] - 2 * r(u @ v.T)) + nv[None, :]), 0)
    if half and not np.isfinite(d).all():
        return numpy_distances(u, v, False)
    return d.astype(np.float32)


def numpy_pr(ref: np.ndarray, smp: np.ndarray, half: bool, k: int = 3, batch: int = 10000):
    def radii(x):
        out = np.zeros(len(x), np.float32)
        for b in range(0, len(x), batch):
            d = np.concatenate([numpy_distances(x[b : b + batch], x[c : c + batch], half)
                                for c in range(0, len(x), batch)], 1)  # fmt: skip
            out[b : b + batch] = np.partition(d, k, axis=1)[:, k]
        return out

    r1, r2 = radii(ref), radii(smp)
    ref_in, smp_in = np.zeros(len(ref), bool), np.zeros(len(smp), bool)
    for i in range(0, len(ref), batch):
        for j in range(0, len(smp), batch):
            d = numpy_distances(ref[i : i + batch], smp[j : j + batch], half)
            ref_in[i : i + batch] |= (d <= r2[None, j : j + batch]).any(1)
            smp_in[j : j + batch] |= (d <= r1[i : i + batch, None]).any(0)
    return smp_in.mean(), ref_in.mean()


@pytest.mark.parametrize("n,d", [(600, 64), (1500, 2023 // 7), (200, 300)])  # the last: singular covariances
def test_fid_matches_scipy_sqrtm(n, d):
    a, b = features(n, d, 0), features(n + 37, d, 1, shift=0.1, scale=1.2)
    ours = frechet_distance(FeatureStats.of(a), FeatureStats.of(b))
    assert ours == pytest.approx(scipy_fid(a, b), rel=REL)


def test_fid_of_identical_sets_is_zero_and_precomputed_stats_agree():
    a = features(500, 32, 0)
    assert abs(frechet_distance(FeatureStats.of(a), FeatureStats.of(a))) < 1e-8
    stats = FeatureStats(mu=a.mean(0), sigma=np.cov(a, rowvar=False).astype(np.float32))
    b = features(500, 32, 1, shift=0.3)
    assert frechet_distance(stats, FeatureStats.of(b)) == pytest.approx(scipy_fid(a, b), rel=1e-5)


def test_fid_refuses_mismatched_sizes():
    with pytest.raises(EvaluationError, match="different feature sizes"):
        frechet_distance(FeatureStats.of(features(10, 4, 0)), FeatureStats.of(features(10, 5, 0)))


@pytest.mark.parametrize("n", [700, 5003])  # one split, two uneven splits
def test_inception_score_matches_numpy(n):
    logits = np.random.default_rng(n).standard_normal((n, 1008)).astype(np.float32) * 3
    assert inception_score(logits) == pytest.approx(numpy_is(logits), rel=REL)
    assert inception_score(logits, split_size=100) == pytest.approx(numpy_is(logits, 100), rel=REL)


def brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int = 3):
    """The definition, in float64 with no batching."""

    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), 1)[:, k]
    r_smp = np.sort(d2(smp, smp), 1)[:, k]
    d = d2(ref, smp)
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_smp[None, :]).any(1).mean()


@pytest.mark.parametrize("half", [True, False])
def test_precision_recall_match_the_original_block_algorithm(half):
    ref, smp = features(700, 48, 0), features(500, 48, 1, shift=0.1, scale=0.9)
    cfg = ManifoldConfig(distances="float16" if half else "float32", row_batch_size=256, col_batch_size=300)
    ours = precision_recall(ref, smp, cfg)
    expected = numpy_pr(ref, smp, half, batch=10000)
    assert ours == pytest.approx(expected, rel=REL)
    assert 0.2 < ours[0] < 1 and 0.2 < ours[1] < 1
    if not half:
        assert ours == pytest.approx(brute_force_pr(ref, smp), abs=2 / len(smp))


def test_float16_overflow_falls_back_to_float32():
    ref, smp = features(100, 16, 0, scale=200.0), features(80, 16, 1, scale=200.0)
    assert precision_recall(ref, smp) == pytest.approx(numpy_pr(ref, smp, half=True), rel=REL)
    assert precision_recall(ref, smp) == precision_recall(ref, smp, ManifoldConfig(distances="float32"))


def test_radii_keep_each_column_blocks_nearest_only():
    """manifold_radii keeps each column block's k+1 nearest, not the row block by every feature
    (10000 x 50,000 float32 and its joined copy: 4 GB at the evaluation's 50,000 samples); the
    radii are the same, a last block narrower than k+1 included (103 = 4 x 25 + 3)."""
    x = features(103, 8, 0)
    whole = manifold_radii(x, ManifoldConfig(row_batch_size=40, col_batch_size=1000))
    assert torch.equal(manifold_radii(x, ManifoldConfig(row_batch_size=40, col_batch_size=25)), whole)


def test_radii_need_more_than_k_samples():
    with pytest.raises(EvaluationError, match="more than k=3"):
        manifold_radii(features(3, 4, 0))


def _load_original():
    root = os.environ.get("FASTDIFF_GUIDED_DIFFUSION")
    if not root:
        pytest.skip("set FASTDIFF_GUIDED_DIFFUSION to a guided-diffusion checkout to run its evaluator")
    pytest.importorskip("scipy")
    tf = types.ModuleType("tensorflow")
    tf.compat = types.SimpleNamespace(v1=types.SimpleNamespace())
    stubs = {"tensorflow": tf, "tensorflow.compat": tf.compat, "tensorflow.compat.v1": tf.compat.v1}
    stubs.update({m: types.ModuleType(m) for m in ("requests",) if importlib.util.find_spec(m) is None})
    saved = {m: sys.modules.get(m) for m in stubs}
    sys.modules.update(stubs)
    try:
        path = Path(root) / "evaluations" / "evaluator.py"
        spec = importlib.util.spec_from_file_location("gd_evaluator", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m)
            else:
                sys.modules[m] = old
    mod.linalg = types.SimpleNamespace(sqrtm=_sqrtm)
    return mod


def _sqrtm(a: np.ndarray, disp: bool = True):
    """scipy.linalg.sqrtm as the original evaluator calls it: SciPy 1.18 removed ``disp``, whose
    False returned the root with an error estimate (which the original drops)."""
    from scipy import linalg

    root = linalg.sqrtm(a)
    return root if disp else (root, None)


def test_against_the_original_evaluator_functions(monkeypatch):
    ev = _load_original()
    # the original's np.bool, gone from numpy 1.24 to 1.26: numpy 2's own np.bool, which numpy 2.2's
    # assert_allclose calls on arrays (the builtin bool there raised "truth value ... ambiguous")
    monkeypatch.setattr(np, "bool", np.bool_, raising=False)

    class NumpyDistances:
        def pairwise_distances(self, u, v):
            return numpy_distances(u, v, half=True)

        def less_thans(self, b1, r1, b2, r2):
            d = numpy_distances(b1, b2, half=True)[..., None]
            return (d <= r2).any(1), (d <= r1[:, None]).any(0)

    est = object.__new__(ev.ManifoldEstimator)
    est.distance_block, est.row_batch_size, est.col_batch_size = NumpyDistances(), 10000, 10000
    est.nhood_sizes, est.num_nhoods, est.clamp_to_percentile, est.eps = (3,), 1, None, 1e-5
    ref, smp = features(900, 64, 0), features(700, 64, 1, shift=0.1)
    r1, r2 = est.manifold_radii(ref), est.manifold_radii(smp)
    pr = est.evaluate_pr(ref, r1, smp, r2)
    assert precision_recall(ref, smp) == pytest.approx((pr[0][0], pr[1][0]), rel=REL)
    np.testing.assert_allclose(manifold_radii(ref).numpy(), r1[:, 0], rtol=REL)

    a, b = features(3000, 128, 2), features(2500, 128, 3, scale=1.1)
    orig = ev.FIDStatistics(a.mean(0), np.cov(a, rowvar=False)).frechet_distance(
        ev.FIDStatistics(b.mean(0), np.cov(b, rowvar=False))
    )
    assert frechet_distance(FeatureStats.of(a), FeatureStats.of(b)) == pytest.approx(orig, rel=REL)

    logits = np.random.default_rng(0).standard_normal((6000, 1008)).astype(np.float32)

    class Softmax:
        def run(self, _node, feed_dict):
            (x,) = feed_dict.values()
            e = np.exp(x - x.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

    evaluator = object.__new__(ev.Evaluator)
    evaluator.sess, evaluator.softmax, evaluator.softmax_input, evaluator.softmax_batch_size = (
        Softmax(),
        None,
        None,
        512,
    )
    assert inception_score(logits) == pytest.approx(evaluator.compute_inception_score(logits), rel=1e-5)
