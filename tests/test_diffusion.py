"""Rectified flow against hand calculations and the closed-form flow of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dgae_jax import diffusion


def test_path_target_and_clean_estimate_by_hand():
    x = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    eps = jnp.array([[0.5, 0.5], [-1.0, 0.0]])
    t = jnp.array([0.25, 0.8])
    x_t = diffusion.interpolate(x, eps, t)
    np.testing.assert_allclose(x_t, [[0.875, -0.625], [-0.7, 0.4]], rtol=1e-6)
    v = diffusion.velocity_target(x, eps)
    np.testing.assert_allclose(v, [[-0.5, 1.5], [-1.5, -2.0]], rtol=1e-6)
    # The exact velocity recovers x exactly; a wrong one is off by t * error.
    np.testing.assert_allclose(diffusion.clean_estimate(x_t, t, v), x, rtol=1e-6)
    np.testing.assert_allclose(diffusion.clean_estimate(x_t, t, v + 1.0),
                               x - jnp.array([[0.25], [0.8]]), rtol=1e-6)


def test_time_grids():
    for spacing in diffusion.SPACINGS:
        g = np.asarray(diffusion.time_grid(7, spacing))
        assert g.shape == (8,) and g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(0.0)
        assert np.all(np.diff(g) < 0)
    # epsilon-VAE Eq. 12 with m=1, n=100 at u = 1/2: log(50.5) / log(100).
    g = np.asarray(diffusion.time_grid(2, "reversed_log"))
    assert g[1] == pytest.approx(np.log(50.5) / np.log(100.0), rel=1e-6)
    # Denser near the noise end: the first step is the smallest.
    assert np.argmin(-np.diff(np.asarray(diffusion.time_grid(10, "reversed_log")))) == 0
    np.testing.assert_allclose(diffusion.time_grid(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="steps"):
        diffusion.time_grid(0)
    with pytest.raises(ValueError, match="spacing"):
        diffusion.time_grid(3, "cosine")


def test_time_sampling_distributions():
    n = 200_000
    t = np.asarray(diffusion.sample_time(jax.random.key(0), n, "logit_normal", 0.5, 1.5))
    assert t.min() > 0 and t.max() < 1
    # logit(t) must be N(0.5, 1.5^2): compare quantiles.
    qs = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    logit = np.log(t / (1 - t))
    np.testing.assert_allclose(np.quantile(logit, qs), scipy.stats.norm.ppf(qs, 0.5, 1.5),
                               atol=0.03)
    u = np.asarray(diffusion.sample_time(jax.random.key(1), n, "uniform"))
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="time sampling"):
        diffusion.sample_time(jax.random.key(0), 2, "beta")


def gaussian_velocity(mu, s):
    """The optimal (conditional-mean) velocity for data N(mu, s^2) under x_t = (1-t)x + t eps.

    E[eps - x | x_t = y] = -mu + (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2) * (y - (1-t) mu).
    """

    def v(y, t):
        t = t[:, None]
        gain = (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2)
        return -mu + gain * (y - (1 - t) * mu)

    return v


# reversed_log's last step always spans [0, log(1 + 99/N) / log(100)], so it needs more steps
# on this stiff toy flow; a trained decoder's near-straight flow is what it is meant for.
@pytest.mark.parametrize("sampler,steps,spacing", [
    ("euler", 400, "uniform"), ("heun", 8, "uniform"),
    ("euler", 1000, "reversed_log"), ("heun", 128, "reversed_log")])
def test_samplers_map_noise_to_gaussian_data(sampler, steps, spacing):
    mu, s = 1.5, 0.5
    noise = jax.random.normal(jax.random.key(0), (20_000, 2))
    x0 = np.asarray(diffusion.sample(gaussian_velocity(mu, s), noise, steps, sampler, spacing))
    np.testing.assert_allclose(x0.mean(0), mu, atol=0.02)  # Monte-Carlo error ~0.004
    np.testing.assert_allclose(x0.std(0), s, rtol=0.02)


def test_reversed_log_converges_with_steps():
    noise = jax.random.normal(jax.random.key(0), (4096, 1))
    errors = [abs(float(diffusion.sample(gaussian_velocity(1.5, 0.5), noise, n, "heun",
                                         "reversed_log").std()) - 0.5) for n in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]


def test_heun_beats_euler_at_equal_steps():
    mu, s = 1.5, 0.5
    noise = jax.random.normal(jax.random.key(0), (4096, 1))
    err = {}
    for sampler in diffusion.SAMPLERS:
        x0 = np.asarray(diffusion.sample(gaussian_velocity(mu, s), noise, 6, sampler))
        err[sampler] = abs(x0.std() - s)
    assert err["heun"] < 0.2 * err["euler"]


def test_one_euler_step_lands_on_the_mean():
    """At t = 1 the optimal velocity is y - mu, so a single Euler step gives exactly mu."""
    noise = jax.random.normal(jax.random.key(3), (16, 3))
    x0 = diffusion.sample(gaussian_velocity(0.7, 0.3), noise, 1, "euler")
    np.testing.assert_allclose(x0, 0.7, atol=1e-6)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(lambda x, t: x, jnp.zeros((1, 1)), 2, "dpm")
