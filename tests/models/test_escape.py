"""The escape mixture: which target cells a perturbation reached, from their salient codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from perturbscope.models.escape import EscapeMixture, fit_escape_mixture


def _screen(seed: int = 0):
    """Controls N(0, I) in 6 dims; targets whose escapers the model spread 30 % wider than held-out controls."""
    rng = np.random.default_rng(seed)
    d = 6
    controls = rng.normal(size=(300, d))
    codes, labels, responded = [], [], []

    def add(label: str, n: int, share: float, shift: float, direction: np.ndarray) -> None:
        hit = rng.random(n) < share
        x = rng.normal(scale=1.3, size=(n, d))
        x[hit] = rng.normal(size=(int(hit.sum()), d)) + shift * direction
        codes.append(x)
        labels.extend([label] * n)
        responded.extend(hit)

    eye = np.eye(d)
    add("A", 250, 0.7, 4.0, eye[0])  # 70 % penetrance
    add("B", 250, 0.0, 0.0, eye[1])  # no effect
    add("C", 250, 1.0, 0.3, eye[2])  # every cell shifted a little: no cell can be told apart
    add("D", 250, 1.0, 4.0, eye[3])  # every cell perturbed
    add("E", 8, 0.7, 4.0, eye[4])  # too rare to fit
    return np.vstack(codes), np.array(labels), np.array(responded), controls


def test_mixture_recovers_penetrance_and_calls_nobody_without_an_effect() -> None:
    codes, labels, responded, controls = _screen()
    mixture, crossfit = fit_escape_mixture(codes, labels, controls, min_cells=20, seed=0)
    table = {row["perturbation"]: row for row in mixture.table()}
    assert set(table) == {"A", "B", "C", "D"}  # E has too few cells
    assert table["A"]["estimated_perturbed_share"] == pytest.approx(0.7, abs=0.07)
    assert table["A"]["separation"] > 2.5
    assert table["B"]["estimated_perturbed_share"] == 0.0
    assert table["C"]["estimated_perturbed_share"] == 0.0
    assert table["D"]["estimated_perturbed_share"] > 0.95
    a = labels == "A"
    assert roc_auc_score(responded[a], crossfit[a]) > 0.98
    assert np.all(crossfit[labels == "B"] == 0.0)
    assert np.all(np.isnan(crossfit[labels == "E"]))
    # held-out controls, projected on A's direction, are rarely called
    assert table["A"]["control_false_call_rate"] < 0.05
    # new cells use the full-data directions; the same cells give nearly the same calls
    again = mixture.probability(codes, labels)
    assert np.all(np.isnan(again[labels == "E"]))
    assert np.mean((again[a] > 0.5) == (crossfit[a] > 0.5)) > 0.97


def test_mixture_round_trips_through_json_and_is_deterministic() -> None:
    codes, labels, _, controls = _screen(seed=1)
    mixture, first = fit_escape_mixture(codes, labels, controls, seed=3)
    _, second = fit_escape_mixture(codes, labels, controls, seed=3)
    np.testing.assert_array_equal(first, second)
    restored = EscapeMixture.from_dict(json.loads(json.dumps(mixture.to_dict())))
    np.testing.assert_allclose(restored.probability(codes, labels), mixture.probability(codes, labels))
    assert restored.perturbations == mixture.perturbations


def test_bad_inputs_name_the_problem() -> None:
    codes, labels, _, controls = _screen()
    with pytest.raises(ValueError, match="one label per cell"):
        fit_escape_mixture(codes, labels[:-1], controls)
    with pytest.raises(ValueError, match="at least 2 control cells"):
        fit_escape_mixture(codes, labels, controls[:1])
    with pytest.raises(ValueError, match="6 columns"):
        fit_escape_mixture(codes, labels, controls[:, :3])
