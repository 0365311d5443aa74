r"""Did a perturbation do anything? The energy-distance permutation test per perturbation.

Definition
----------
For the cells :math:`X` of one perturbation and the control cells :math:`Y`, both as
coordinates in one PCA of the log-normalised highly variable genes (fitted on all
cells together, so every perturbation is measured in the same space), the energy
distance of Székely & Rizzo is

.. math::

    E(X, Y) = 2\,\overline{d(x, y)} - \overline{d(x, x')} - \overline{d(y, y')}

where each bar is the mean over all pairs of distinct cells, across or within the
groups. With ``distance: euclidean`` (the default) :math:`d` is the Euclidean
distance: :math:`E \ge 0` in expectation and is 0 exactly when the two distributions
are equal, so the test sees a change of shape (e.g. a response in only some cells)
as well as a shift. ``distance: sqeuclidean`` uses the squared distance, which is
scPerturb's E-distance (Peidli et al., Nature Methods 2024); it then equals
an unbiased estimate of :math:`2\lVert\mu_X - \mu_Y\rVert^2`, i.e. it tests the
means only.

The p-value is a permutation test (scPerturb's E-test): the labels of the pooled
cells are shuffled ``n_permutations`` times and
:math:`p = (1 + \#\{E_\pi \ge E\}) / (1 + n_\text{permutations})`. The q-values are
Benjamini-Hochberg over all tested perturbations (statsmodels).

Speed: the pooled distance matrix :math:`D` is computed once per perturbation. For
a labelling vector :math:`a` (1 for the perturbation's cells), the three sums are
:math:`a^\top D a`, :math:`a^\top r - a^\top D a` and :math:`1^\top r - 2a^\top r +
a^\top D a` with :math:`r = D1`, so all permutations of a perturbation cost one
matrix product :math:`D A` over the stacked labellings :math:`A`.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

__all__ = ["DISTANCES", "energy_distance", "energy_test"]

DISTANCES = ("euclidean", "sqeuclidean")


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not supported; use one of {list(DISTANCES)}")


def _statistic(within_x: np.ndarray, row_x: np.ndarray, total: float, n_x: int, n_y: int) -> np.ndarray:
    """E from ``a'Da`` (``within_x``) and ``a'r`` (``row_x``) of one or many labellings."""
    cross = row_x - within_x
    within_y = total - 2.0 * row_x + within_x
    return 2.0 * cross / (n_x * n_y) - within_x / (n_x * (n_x - 1)) - within_y / (n_y * (n_y - 1))


def energy_distance(x: np.ndarray, y: np.ndarray, distance: str = "euclidean") -> float:
    """The energy distance of two samples (rows = cells; see the module docstring)."""
    _check_distance(distance)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"energy_distance needs at least 2 cells per group, got {len(x)} and {len(y)}")
    return float(energy_test(x, y, n_permutations=0, distance=distance)[0])


def energy_test(
    x: np.ndarray,
    y: np.ndarray,
    n_permutations: int = 999,
    distance: str = "euclidean",
    seed: int = 0,
    chunk: int = 256,
) -> tuple[float, float]:
    """``(energy distance, permutation p-value)`` of two samples; p is NaN without permutations.

    ``chunk``: labellings per matrix product (memory ``n_cells x chunk`` floats).
    """
    _check_distance(distance)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n_x, n_y = len(x), len(y)
    if n_x < 2 or n_y < 2:
        raise ValueError(f"energy_test needs at least 2 cells per group, got {n_x} and {n_y}")
    pooled = np.concatenate([x, y])
    dist = cdist(pooled, pooled, metric=distance)
    rows = dist.sum(1)
    total = float(rows.sum())
    observed_a = np.zeros(n_x + n_y)
    observed_a[:n_x] = 1.0
    observed = float(_statistic(observed_a @ dist @ observed_a, rows[:n_x].sum(), total, n_x, n_y))
    if n_permutations <= 0:
        return observed, float("nan")
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, n_permutations, chunk):
        size = min(chunk, n_permutations - start)
        labels = np.zeros((n_x + n_y, size))
        for j in range(size):
            labels[rng.permutation(n_x + n_y)[:n_x], j] = 1.0
        within = np.einsum("ij,ij->j", labels, dist @ labels)
        stats = _statistic(within, rows @ labels, total, n_x, n_y)
        # a tolerance for ties in floating point (e.g. identical samples)
        exceed += int(np.sum(stats >= observed - 1e-12 * max(abs(observed), 1.0)))
    return observed, (1.0 + exceed) / (1.0 + n_permutations)
