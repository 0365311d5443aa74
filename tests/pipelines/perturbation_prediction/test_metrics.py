"""The scores on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import energy_distance as scipy_energy

from perturbscope.pipelines.perturbation_prediction import metrics as M


def test_pearson_delta_against_a_reference() -> None:
    ref = np.array([1.0, 1.0, 1.0, 1.0])
    true = np.array([2.0, 3.0, 4.0, 1.0])  # delta 1, 2, 3, 0
    assert M.pearson_delta([3.0, 5.0, 7.0, 1.0], true, ref) == pytest.approx(1.0)  # delta 2, 4, 6, 0
    assert M.pearson_delta([0.0, -1.0, -2.0, 1.0], true, ref) == pytest.approx(-1.0)
    # delta (1, 0, 0, 0) vs (1, 2, 3, 0): centred (.75,-.25,-.25,-.25) . (-.5,.5,1.5,-1.5) / norms
    a = np.array([0.75, -0.25, -0.25, -0.25])
    b = np.array([-0.5, 0.5, 1.5, -1.5])
    expected = a @ b / np.sqrt((a @ a) * (b @ b))
    assert M.pearson_delta([2.0, 1.0, 1.0, 1.0], true, ref) == pytest.approx(expected)
    # restricted to genes 1 and 2 only: two points are perfectly correlated
    assert M.pearson_delta([1.0, 1.5, 1.6, 9.0], true, ref, genes=[1, 2]) == pytest.approx(1.0)


def test_no_predicted_change_gives_nan() -> None:
    ref = np.array([1.0, 2.0, 3.0])
    assert math.isnan(M.pearson_delta(ref + 1e-7, [2.0, 2.0, 5.0], ref))
    assert math.isnan(M.top_k_jaccard(np.zeros(3), [1.0, 2.0, 3.0], 2))
    assert math.isnan(M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_top_k_jaccard() -> None:
    true = np.array([5.0, -4.0, 3.0, 2.0, 1.0])
    pred = np.array([1.0, 2.0, 3.0, 4.0, -5.0])
    assert M.top_k_jaccard(pred, true, 2) == 0.0  # {0, 1} vs {4, 3}
    assert M.top_k_jaccard(pred, true, 3) == pytest.approx(1 / 5)  # {0, 1, 2} vs {4, 3, 2}
    assert M.top_k_jaccard(-true, true, 2) == 1.0  # signs do not matter, magnitudes do
    assert M.top_k_jaccard(pred, true, 100) == 1.0  # K capped at the number of genes
    np.testing.assert_array_equal(M.top_k_genes([1.0, 3.0, 3.0, 0.0], 2), [1, 2])  # ties: gene order


def test_mse_and_direction_accuracy() -> None:
    assert M.mse_of_means([1.0, 2.0], [0.0, 0.0]) == pytest.approx(2.5)
    pred = [1.0, -1.0, 0.0, 2.0]
    true = [1.0, 1.0, 1.0, -2.0]
    assert M.direction_accuracy(pred, true, [0, 1, 2, 3]) == pytest.approx(0.25)
    assert M.direction_accuracy(pred, true, [0]) == 1.0
    assert M.direction_accuracy(pred, true, [2]) == 0.0  # predicting no change for a moved gene is wrong
    assert math.isnan(M.direction_accuracy(pred, true, []))


def test_energy_distance() -> None:
    assert M.energy_distance([[0.0], [0.0]], [[1.0], [1.0]]) == pytest.approx(2.0)
    # 2 * mean|x - y| - mean|x - x'| - mean|y - y'| = 2 * 1 - 1 - 0
    assert M.energy_distance([[0.0], [2.0]], [[1.0]]) == pytest.approx(1.0)
    x = np.random.default_rng(0).normal(size=(30, 3))
    assert M.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    # in 1-D scipy's energy_distance is the square root of the same statistic
    u, v = np.random.default_rng(1).normal(size=40), np.random.default_rng(2).normal(1.0, 2.0, size=25)
    assert M.energy_distance(u, v) == pytest.approx(scipy_energy(u, v) ** 2)
    # 2-D: points (0,0),(3,4) vs (0,0): 2 * 2.5 - 2.5 - 0
    assert M.energy_distance([[0.0, 0.0], [3.0, 4.0]], [[0.0, 0.0]]) == pytest.approx(2.5)


def test_score_perturbation_keys_and_references() -> None:
    c = np.zeros(6)
    m = np.full(6, 0.5)
    true = np.array([2.0, -1.0, 0.5, 0.0, 0.0, 1.0])
    out = M.score_perturbation(
        true, true, c, m, de_genes=[0, 1], top_k=(2, 25), pred_pcs=np.zeros((3, 2)), true_pcs=np.zeros((4, 2))
    )
    assert set(out) == {
        "pearson_delta",
        "pearson_delta_top_de",
        "jaccard_top2",
        "jaccard_top25",
        "mse",
        "direction_accuracy_top_de",
        "pearson_delta_vs_perturbed_mean",
        "energy_distance",
        "l2_top_expressed",
    }
    assert out["pearson_delta"] == pytest.approx(1.0) and out["mse"] == 0.0 and out["energy_distance"] == 0.0
    assert out["jaccard_top2"] == 1.0 and out["direction_accuracy_top_de"] == 1.0
    # predicting the perturbed mean itself: no delta against it, so that correlation is undefined
    shared = M.score_perturbation(m, true, c, m, de_genes=[0, 1])
    assert math.isnan(shared["pearson_delta_vs_perturbed_mean"])
    assert math.isnan(shared["energy_distance"])


def test_l2_over_the_genes_most_expressed_in_controls() -> None:
    """Ahlmann-Eltze et al. 2025: L2 of the predicted vs true means over the top expressed control genes."""
    control = np.array([0.1, 5.0, 2.0, 5.0, 0.0])
    assert M.top_expressed_genes(control, 3).tolist() == [1, 3, 2]  # ties in gene order
    assert M.top_expressed_genes(control, 10).tolist() == [1, 3, 2, 0, 4]  # fewer genes than asked: all
    pred, true = np.array([9.0, 1.0, 2.0, 3.0, -4.0]), np.array([0.0, 4.0, 2.0, 7.0, 0.0])
    assert M.l2_of_means(pred, true, [1, 3, 2]) == pytest.approx(5.0)  # sqrt(3² + 4² + 0²); genes 0, 4 ignored
    assert math.isnan(M.l2_of_means(pred, true, []))
    scores = M.score_perturbation(pred, true, control, control, [1], expressed_genes=[1, 3])
    assert scores["l2_top_expressed"] == pytest.approx(5.0) and "l2_top_expressed" in M.METRIC_COLUMNS
    assert math.isnan(M.score_perturbation(pred, true, control, control, [1])["l2_top_expressed"])
