"""The energy-distance permutation test: its statistic, its calibration and its power."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from perturbscope.pipelines.perturbation_effects.energy import energy_distance, energy_test


def _by_definition(x: np.ndarray, y: np.ndarray, metric: str) -> float:
    n, m = len(x), len(y)
    within_x = cdist(x, x, metric).sum() / (n * (n - 1))
    within_y = cdist(y, y, metric).sum() / (m * (m - 1))
    return 2 * cdist(x, y, metric).mean() - within_x - within_y


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_statistic_matches_the_definition(metric: str) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(55, 6)) + 0.5
    assert energy_distance(x, y, metric) == pytest.approx(_by_definition(x, y, metric), rel=1e-10)


def test_squared_distance_estimates_twice_the_squared_mean_shift() -> None:
    rng = np.random.default_rng(1)
    shift = np.array([1.0, -0.5, 0.0])
    x, y = rng.normal(size=(4000, 3)) + shift, rng.normal(size=(4000, 3))
    assert energy_distance(x, y, "sqeuclidean") == pytest.approx(2 * (shift**2).sum(), rel=0.1)


def test_euclidean_sees_a_change_of_spread_without_a_shift() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 5)) * 2.0, rng.normal(size=(300, 5))  # same mean, other spread
    assert energy_test(x, y, 199, "euclidean", seed=0)[1] <= 0.01


def test_null_p_values_are_calibrated_and_shifts_are_found() -> None:
    rng = np.random.default_rng(3)
    null = [energy_test(rng.normal(size=(30, 4)), rng.normal(size=(40, 4)), 99, seed=i)[1] for i in range(60)]
    # under the null a permutation p-value is uniform: about 5 % below 0.05, mean about 0.5
    assert np.mean(np.array(null) <= 0.05) <= 0.15
    assert 0.35 <= np.mean(null) <= 0.65
    p_shift = energy_test(rng.normal(size=(30, 4)) + 1.0, rng.normal(size=(40, 4)), 99, seed=0)[1]
    assert p_shift == pytest.approx(0.01)  # the smallest p of 99 permutations


def test_same_seed_same_p_value_and_clear_errors() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 3)) + 0.3, rng.normal(size=(25, 3))
    assert energy_test(x, y, 50, seed=7) == energy_test(x, y, 50, seed=7)
    with pytest.raises(ValueError, match="at least 2 cells"):
        energy_test(x[:1], y)
    with pytest.raises(ValueError, match="distance='cosine'"):
        energy_distance(x, y, "cosine")
