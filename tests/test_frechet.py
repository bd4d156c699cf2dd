"""Frechet distance against scipy, statistics files (ours and ADM's), the fid CLI on statistics,
and precision/recall with known answers."""

import json
import subprocess
import sys

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


ADM_KEYS = {"mu", "sigma", "mu_s", "sigma_s"}  # what ADM's Evaluator.read_statistics reads


def adm_style_read(path):
    """What guided-diffusion's `Evaluator.read_statistics` does with a file that has `mu`: the
    four arrays by exact name, no count, nothing converted (written here, not copied)."""
    with np.load(path) as data:
        assert "mu" in data.files
        return ((data["mu"], data["sigma"]), (data["mu_s"], data["sigma_s"]))


def test_stats_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(50, 6))
    stats = FeatureStats.from_features(features)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False))
    spatial = FeatureStats.from_features(features[:, :3])
    save_stats(tmp_path / "s.npz", {"pool": stats, "spatial": spatial})
    with np.load(tmp_path / "s.npz") as data:  # ADM's four keys, plus our two counts
        assert set(data.files) == ADM_KEYS | {"count", "count_s"}
        assert all(data[k].dtype == np.float64 for k in ADM_KEYS)
    (mu, sigma), (mu_s, sigma_s) = adm_style_read(tmp_path / "s.npz")
    assert np.array_equal(mu, stats.mu) and np.array_equal(sigma_s, spatial.sigma)
    loaded = load_stats(tmp_path / "s.npz")
    assert loaded["pool"].count == 50 and loaded["spatial"].count == 50
    assert np.array_equal(loaded["pool"].mu, stats.mu)
    assert np.array_equal(loaded["spatial"].sigma, spatial.sigma)
    save_stats(tmp_path / "pool_only.npz", {"pool": stats})
    assert set(load_stats(tmp_path / "pool_only.npz")) == {"pool"}
    np.savez(tmp_path / "bad.npz", mu=stats.mu)
    with pytest.raises(ValueError, match="missing"):
        load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "half.npz", mu=stats.mu, sigma=stats.sigma, mu_s=spatial.mu)
    with pytest.raises(ValueError, match="together"):
        load_stats(tmp_path / "half.npz")
    np.savez(tmp_path / "shape.npz", mu=stats.mu, sigma=spatial.sigma)
    with pytest.raises(ValueError, match="covariance"):
        load_stats(tmp_path / "shape.npz")


def test_old_spatial_keys_still_load(tmp_path):
    features = np.random.default_rng(1).normal(size=(40, 5))
    np.savez(tmp_path / "old.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False),
             count=40, spatial_mu=features[:, :2].mean(0),
             spatial_sigma=np.cov(features[:, :2], rowvar=False), spatial_count=40)
    loaded = load_stats(tmp_path / "old.npz")
    assert loaded["spatial"].count == 40 and loaded["spatial"].mu.shape == (2,)
    save_stats(tmp_path / "new.npz", loaded)  # rewritten in ADM's layout
    with np.load(tmp_path / "new.npz") as data:
        assert set(data.files) == ADM_KEYS | {"count", "count_s"}


def write_adm_batch(path, rng, n=64, d=16, d_s=12, images=4, shift=0.0):
    """An ADM reference batch: statistics of random features (no count) and uint8 images."""
    pool, spatial = rng.normal(size=(n, d)) + shift, rng.normal(size=(n, d_s)) + shift
    np.savez(path, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0),
             sigma_s=np.cov(spatial, rowvar=False),
             arr_0=rng.integers(0, 256, (images, 8, 8, 3), dtype=np.uint8))
    return FeatureStats.from_features(pool), FeatureStats.from_features(spatial)


def test_adm_reference_batch_loads_with_unknown_count(tmp_path):
    pool, spatial = write_adm_batch(tmp_path / "VIRTUAL.npz", np.random.default_rng(2))
    loaded = load_stats(tmp_path / "VIRTUAL.npz")
    assert set(loaded) == {"pool", "spatial"}
    assert loaded["pool"].count is None and loaded["spatial"].count is None  # not 64, not 4
    np.testing.assert_array_equal(loaded["spatial"].sigma, spatial.sigma)
    save_stats(tmp_path / "again.npz", loaded)  # an unknown count is not written as a number
    with np.load(tmp_path / "again.npz") as data:
        assert set(data.files) == ADM_KEYS


@pytest.fixture
def no_inception(monkeypatch):
    """Fail any attempt to load the FID network: statistics-only comparisons never need it."""
    from dgae_jax.models import inception

    def refuse(*args, **kwargs):
        raise AssertionError("the Inception network was loaded")
    monkeypatch.setattr(inception, "load_weights", refuse)


def test_fid_cli_on_adm_reference_batch_statistics(tmp_path, no_inception):
    from dgae_jax import fid
    rng = np.random.default_rng(3)
    ref_pool, ref_spatial = write_adm_batch(tmp_path / "VIRTUAL.npz", rng)
    ours_pool, ours_spatial = (FeatureStats.from_features(rng.normal(size=(64, d)) + 0.3)
                               for d in (16, 12))
    save_stats(tmp_path / "samples_stats.npz", {"pool": ours_pool, "spatial": ours_spatial})

    same = fid.evaluate(str(tmp_path / "VIRTUAL.npz"), str(tmp_path / "VIRTUAL.npz"),
                        precision_recall=False)  # images on both sides, but P/R off
    assert same["fid"] == pytest.approx(0.0, abs=1e-9)
    assert same["sfid"] == pytest.approx(0.0, abs=1e-9)
    assert "precision" not in same and "pr_images" not in same["a"]
    assert same["a"]["count"] is None and same["a"]["statistics"] == ["pool", "spatial"]

    # B has statistics only: no precision/recall, so the reference images are never embedded
    result = fid.evaluate(str(tmp_path / "VIRTUAL.npz"), str(tmp_path / "samples_stats.npz"))
    assert result["fid"] == pytest.approx(frechet_distance(ref_pool, ours_pool), rel=1e-12)
    assert result["sfid"] == pytest.approx(frechet_distance(ref_spatial, ours_spatial), rel=1e-12)
    assert result["fid"] > 0.1 and "precision" not in result
    assert result["a"]["count"] is None and result["b"]["count"] == 64
    swapped = fid.evaluate(str(tmp_path / "samples_stats.npz"), str(tmp_path / "VIRTUAL.npz"))
    assert swapped["fid"] == pytest.approx(result["fid"], rel=1e-9)

    with pytest.raises(AssertionError, match="Inception network was loaded"):
        fid.evaluate(str(tmp_path / "VIRTUAL.npz"), str(tmp_path / "VIRTUAL.npz"))  # P/R on
    with pytest.raises(ValueError, match="holds statistics"):
        fid.evaluate(str(tmp_path / "VIRTUAL.npz"), save_stats=str(tmp_path / "out.npz"))
    opened = fid.open_input(str(tmp_path / "VIRTUAL.npz"), image_size=32)  # images used as-is
    assert opened.kind == "stats" and len(opened.images) == 4
    assert fid.open_input(str(tmp_path / "samples_stats.npz")).images is None


def test_precision_recall_known_answers():
    """Real = 0..99 on a line; fake = 0..49. Fake radii (3rd neighbour) are 2 inside and 3 at
    the two ends, so real points 0..52 are covered: recall 53/100, precision 1."""
    real = np.arange(100, dtype=np.float32)[:, None]
    fake = np.arange(50, dtype=np.float32)[:, None]
    assert precision_recall(real, fake, k=3, block=16) == pytest.approx((1.0, 0.53))
    assert precision_recall(real, real + 1000, k=3) == (0.0, 0.0)
    assert precision_recall(real, real, k=3, block=7) == (1.0, 1.0)


def test_fid_cli_no_precision_recall_flag(tmp_path):
    """The command line: two reference batches, --noprecision_recall, and a weights path that
    does not exist (so the network must not be loaded); the last line is the JSON result."""
    write_adm_batch(tmp_path / "VIRTUAL.npz", np.random.default_rng(4))
    out = subprocess.run(
        [sys.executable, "-m", "dgae_jax.fid", str(tmp_path / "VIRTUAL.npz"),
         str(tmp_path / "VIRTUAL.npz"), "--noprecision_recall",
         f"--inception_weights={tmp_path / 'absent.npz'}"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fid"] == pytest.approx(0.0, abs=1e-9) and "precision" not in result
    assert result["a"]["count"] is None and result["b"]["count"] is None
