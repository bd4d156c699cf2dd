"""The bootstrap spread of a mean against its closed form, sigma / sqrt(n)."""

import numpy as np
import pytest

from dgae_jax.metrics.bootstrap import bootstrap_std


def test_bootstrap_std_matches_the_standard_error_of_the_mean():
    values = np.random.default_rng(3).normal(20.0, 2.0, size=256)
    expected = values.std() / np.sqrt(values.size)  # the plug-in estimate the bootstrap targets
    # 4,000 resamples: the bootstrap's own error is about 1 / sqrt(2 * 4000) = 1.1% of it.
    assert bootstrap_std(values, resamples=4000) == pytest.approx(expected, rel=0.05)


def test_bootstrap_std_is_deterministic_order_free_and_zero_for_constant_values():
    values = np.linspace(0.0, 1.0, 50)
    assert bootstrap_std(values) == bootstrap_std(values)
    assert bootstrap_std(values, seed=1) != bootstrap_std(values)
    assert bootstrap_std(values[::-1]) == bootstrap_std(values)  # order-free
    assert bootstrap_std(np.full(10, 3.0)) == 0.0


@pytest.mark.parametrize("values", [np.zeros(0), np.zeros((2, 3))])
def test_bootstrap_std_refuses_empty_or_multidimensional_input(values):
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_std(values)
