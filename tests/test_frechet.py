"""Frechet distance against scipy, statistics files, and precision/recall with known answers."""

import numpy as np
import pytest
import scipy.linalg

from dgae_jax.metrics.frechet import (FeatureStats, frechet_distance, load_stats, precision_recall,
                                  save_stats)


def scipy_frechet(a: FeatureStats, b: FeatureStats) -> float:
    """The pytorch-fid formula with scipy.linalg.sqrtm."""
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def random_stats(rng, d, rank=None, shift=0.0):
    factor = rng.normal(size=(d, rank or d))
    return FeatureStats(rng.normal(size=d) + shift, factor @ factor.T / d, 1000)


@pytest.mark.parametrize("d,rank", [(8, None), (64, None), (64, 60), (128, 100)])
def test_frechet_matches_scipy(d, rank):
    rng = np.random.default_rng(d + (rank or 0))
    a, b = random_stats(rng, d, rank), random_stats(rng, d, rank, shift=0.5)
    np.testing.assert_allclose(frechet_distance(a, b), scipy_frechet(a, b), rtol=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_of_gaussians_in_closed_form():
    """For diagonal covariances: |dmu|^2 + sum (s_a - s_b)^2 with s the standard deviations."""
    a = FeatureStats(np.array([0.0, 1.0]), np.diag([4.0, 1.0]), 10)
    b = FeatureStats(np.array([3.0, 1.0]), np.diag([1.0, 9.0]), 10)
    assert frechet_distance(a, b) == pytest.approx(9 + (2 - 1) ** 2 + (1 - 3) ** 2)


def test_stats_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(50, 6))
    stats = FeatureStats.from_features(features)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False))
    spatial = FeatureStats.from_features(features[:, :3])
    save_stats(tmp_path / "s.npz", {"pool": stats, "spatial": spatial})
    loaded = load_stats(tmp_path / "s.npz")
    assert loaded["pool"].count == 50 and np.array_equal(loaded["pool"].mu, stats.mu)
    assert np.array_equal(loaded["spatial"].sigma, spatial.sigma)
    save_stats(tmp_path / "pool_only.npz", {"pool": stats})
    assert set(load_stats(tmp_path / "pool_only.npz")) == {"pool"}
    np.savez(tmp_path / "bad.npz", mu=stats.mu)
    with pytest.raises(ValueError, match="missing"):
        load_stats(tmp_path / "bad.npz")


def test_precision_recall_known_answers():
    """Real = 0..99 on a line; fake = 0..49. Fake radii (3rd neighbour) are 2 inside and 3 at
    the two ends, so real points 0..52 are covered: recall 53/100, precision 1."""
    real = np.arange(100, dtype=np.float32)[:, None]
    fake = np.arange(50, dtype=np.float32)[:, None]
    assert precision_recall(real, fake, k=3, block=16) == pytest.approx((1.0, 0.53))
    assert precision_recall(real, real + 1000, k=3) == (0.0, 0.0)
    assert precision_recall(real, real, k=3, block=7) == (1.0, 1.0)
