"""Scores of predicted perturbed cells against the held-out truth.

Notation (all on the log-normalised scale of the processed screen's ``X``):
for a test perturbation ``P``, ``t`` is the mean expression of its true
held-out cells, ``p`` the mean of the predicted cells of a method, ``c`` the
reference control mean (mean of the screen's control cells, none of which is
ever a test cell) and ``m`` the mean of all *training* perturbed cells. The
deltas are ``Δt = t - c`` and ``Δp = p - c``.

A predicted delta whose largest absolute value is below :data:`DELTA_TOL`
counts as "no predicted change": its correlation and its top-K genes are
undefined, so those scores are NaN (this is what the no-change baseline gets
against control, and the perturbed-mean baseline against ``m``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.spatial.distance import cdist

__all__ = [
    "DELTA_TOL",
    "pearson",
    "pearson_delta",
    "top_k_genes",
    "top_k_jaccard",
    "mse_of_means",
    "l2_of_means",
    "top_expressed_genes",
    "direction_accuracy",
    "energy_distance",
    "score_perturbation",
    "METRIC_COLUMNS",
]

DELTA_TOL = 1e-5
"""Predicted deltas with ``max |Δ|`` below this are treated as exactly zero."""


def _vec(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _is_flat(delta: np.ndarray) -> bool:
    return delta.size == 0 or float(np.max(np.abs(delta))) <= DELTA_TOL


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two vectors; NaN if either is constant (or < 2 entries)."""
    a, b = _vec(a), _vec(b)
    if a.size != b.size:
        raise ValueError(f"pearson: vectors of different lengths ({a.size} vs {b.size})")
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    na, nb = np.sqrt(a @ a), np.sqrt(b @ b)
    if na <= DELTA_TOL * np.sqrt(a.size) or nb <= DELTA_TOL * np.sqrt(b.size):
        return float("nan")
    return float(np.clip((a @ b) / (na * nb), -1.0, 1.0))


def pearson_delta(pred_mean: Any, true_mean: Any, reference: Any, genes: Sequence[int] | None = None) -> float:
    """Pearson correlation of predicted and true deltas against ``reference``.

    ``r(p - ref, t - ref)`` over all genes, or over the gene positions
    ``genes`` (e.g. the top-20 DE genes). With ``reference = c`` (control
    mean) this is the usual "Pearson delta"; with ``reference = m`` (mean of
    the training perturbations) a model is not rewarded for the shift that
    every perturbation shares. NaN when the predicted delta is (numerically)
    zero on the genes used.
    """
    ref = _vec(reference)
    dp, dt = _vec(pred_mean) - ref, _vec(true_mean) - ref
    if genes is not None:
        idx = np.asarray(genes, dtype=np.int64)
        dp, dt = dp[idx], dt[idx]
    if _is_flat(dp):
        return float("nan")
    return pearson(dp, dt)


def top_k_genes(delta: Any, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``|delta|`` (ties broken by gene position); ``k`` capped at n_genes."""
    d = np.abs(_vec(delta))
    k = int(min(max(k, 0), d.size))
    order = np.lexsort((np.arange(d.size), -d))  # by -|delta|, then position
    return order[:k]


def top_k_jaccard(pred_delta: Any, true_delta: Any, k: int) -> float:
    """Jaccard index of the top-K most-changed genes.

    ``J(K) = |A ∩ B| / |A ∪ B|`` where ``A`` are the ``K`` genes with the
    largest ``|Δt|`` and ``B`` the ``K`` genes with the largest ``|Δp|``
    (``K`` capped at the number of genes; 1 when both sets are all genes).
    NaN if the predicted delta is (numerically) zero.
    """
    dp, dt = _vec(pred_delta), _vec(true_delta)
    if dp.size != dt.size:
        raise ValueError("top_k_jaccard: deltas of different lengths")
    if _is_flat(dp):
        return float("nan")
    a, b = set(top_k_genes(dt, k).tolist()), set(top_k_genes(dp, k).tolist())
    union = a | b
    return float(len(a & b) / len(union)) if union else float("nan")


def mse_of_means(pred_mean: Any, true_mean: Any) -> float:
    """Mean over genes of ``(p_g - t_g)²``."""
    p, t = _vec(pred_mean), _vec(true_mean)
    return float(np.mean((p - t) ** 2))


def top_expressed_genes(control_mean: Any, n: int) -> np.ndarray:
    """Positions of the ``n`` genes most expressed in the controls (highest ``c_g``; ties by position)."""
    c = _vec(control_mean)
    return np.argsort(-c, kind="stable")[: max(int(n), 0)]


def l2_of_means(pred_mean: Any, true_mean: Any, genes: Sequence[int]) -> float:
    """``sqrt(sum_g (p_g - t_g)²)`` over ``genes``: the L2 distance of Ahlmann-Eltze, Huber & Anders
    (Nature Methods 2025) when ``genes`` are the 1,000 genes most expressed in the controls."""
    genes = np.asarray(genes, dtype=np.int64)
    if genes.size == 0:
        return float("nan")
    p, t = _vec(pred_mean)[genes], _vec(true_mean)[genes]
    return float(np.sqrt(np.sum((p - t) ** 2)))


def direction_accuracy(pred_delta: Any, true_delta: Any, genes: Sequence[int]) -> float:
    """Fraction of ``genes`` where the predicted delta has the sign of the true delta.

    ``mean_g [sign(Δp_g) == sign(Δt_g)]`` over the given genes (the top-20 DE
    genes); a value with ``|Δ| <= DELTA_TOL`` has sign 0, so predicting "no
    change" for a gene that moved counts as wrong. NaN for an empty gene list.
    """
    idx = np.asarray(genes, dtype=np.int64)
    if idx.size == 0:
        return float("nan")

    def sign(v: np.ndarray) -> np.ndarray:
        return np.where(np.abs(v) <= DELTA_TOL, 0, np.sign(v))

    dp, dt = _vec(pred_delta)[idx], _vec(true_delta)[idx]
    return float(np.mean(sign(dp) == sign(dt)))


def energy_distance(x: Any, y: Any) -> float:
    """Energy distance between two samples of points (rows), e.g. cells in PCA space.

    ``E = 2 mean_ij ||x_i - y_j|| - mean_ij ||x_i - x_j|| - mean_ij ||y_i - y_j||``
    (Székely's statistic with V-statistic means, i.e. the diagonal zeros
    included, so ``E >= 0`` and ``E = 0`` for identical samples). Euclidean
    distances.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if x.shape[0] == 0 or y.shape[0] == 0:
        return float("nan")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_distance: samples live in {x.shape[1]} and {y.shape[1]} dimensions")
    xy = cdist(x, y).mean()
    xx = cdist(x, x).mean()
    yy = cdist(y, y).mean()
    return float(max(2.0 * xy - xx - yy, 0.0))


METRIC_COLUMNS: tuple[str, ...] = (
    "pearson_delta",
    "pearson_delta_top_de",
    "jaccard_top25",
    "jaccard_top50",
    "jaccard_top100",
    "mse",
    "direction_accuracy_top_de",
    "pearson_delta_vs_perturbed_mean",
    "energy_distance",
    "l2_top_expressed",
)
"""Score columns of the metrics table (``jaccard_top<K>`` for the configured K)."""


def score_perturbation(
    pred_mean: Any,
    true_mean: Any,
    control_mean: Any,
    perturbed_mean: Any,
    de_genes: Sequence[int],
    top_k: Sequence[int] = (25, 50, 100),
    pred_pcs: np.ndarray | None = None,
    true_pcs: np.ndarray | None = None,
    expressed_genes: Sequence[int] | None = None,
) -> dict[str, float]:
    """Every score of one method on one test perturbation.

    Parameters
    ----------
    pred_mean, true_mean
        Mean predicted and mean true expression ``(G,)``.
    control_mean
        Reference control mean ``c``.
    perturbed_mean
        Mean of the training perturbed cells ``m``.
    de_genes
        Positions of the top DE genes of the true cells vs control.
    top_k
        The K of the top-K Jaccard scores.
    pred_pcs, true_pcs
        Predicted and true cells in the shared PCA space (for the energy
        distance; NaN if not given).
    expressed_genes
        Positions of the genes most expressed in the controls (for
        ``l2_top_expressed``; NaN if not given).

    Returns
    -------
    dict
        ``pearson_delta``, ``pearson_delta_top_de``, ``jaccard_top<K>``,
        ``mse``, ``direction_accuracy_top_de``,
        ``pearson_delta_vs_perturbed_mean``, ``energy_distance``,
        ``l2_top_expressed`` (:func:`l2_of_means` over ``expressed_genes``).
    """
    c = _vec(control_mean)
    dp, dt = _vec(pred_mean) - c, _vec(true_mean) - c
    out = {
        "pearson_delta": pearson_delta(pred_mean, true_mean, c),
        "pearson_delta_top_de": pearson_delta(pred_mean, true_mean, c, de_genes),
    }
    for k in top_k:
        out[f"jaccard_top{int(k)}"] = top_k_jaccard(dp, dt, int(k))
    out["mse"] = mse_of_means(pred_mean, true_mean)
    out["direction_accuracy_top_de"] = direction_accuracy(dp, dt, de_genes)
    out["pearson_delta_vs_perturbed_mean"] = pearson_delta(pred_mean, true_mean, perturbed_mean)
    out["energy_distance"] = (
        energy_distance(pred_pcs, true_pcs) if pred_pcs is not None and true_pcs is not None else float("nan")
    )
    out["l2_top_expressed"] = (
        l2_of_means(pred_mean, true_mean, expressed_genes) if expressed_genes is not None else float("nan")
    )
    return out
