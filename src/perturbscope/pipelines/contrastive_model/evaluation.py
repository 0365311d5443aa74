"""How well an embedding separates perturbation programs and removes shared confounders.

Pure functions on numpy arrays and AnnData (no Kedro, no torch), used by the
``evaluate_embeddings`` node and by ``bench/contrastive_vs_scvi.py``.

Scores (higher is better unless noted):

* ``ari`` / ``nmi`` -- adjusted Rand index / normalised mutual information of
  Leiden clusters of the kNN graph against the annotation. By default the
  Leiden resolution is searched so that the number of clusters equals the
  number of annotation classes (it uses the *count* of classes only, never
  the labels), which makes spaces comparable.
* ``silhouette`` -- silhouette width of the annotation classes (-1..1).
* ``knn_accuracy`` -- cross-validated accuracy of a kNN classifier
  predicting the annotation; its chance level is the majority-class share.
* ``leakage_knn_accuracy`` -- the same for a confounder (cell-cycle phase,
  batch) over all perturbed cells: *lower* is better in the salient space,
  where chance level means the confounder was removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, roc_auc_score, silhouette_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

from perturbscope import neighbours
from perturbscope.schema import PHASE
from perturbscope.tracking import metric_name

logger = logging.getLogger(__name__)

__all__ = [
    "TABLE_COLUMNS",
    "chance_accuracy",
    "knn_accuracy",
    "leiden_clusters",
    "program_scores",
    "evaluate_spaces",
    "metrics_for_mlflow",
]

TABLE_COLUMNS = ["metric", "key", "space", "value", "chance_level", "n_cells", "n_classes", "note", "cells"]
"""Columns of the evaluation table (one row per metric x space; a skipped check has one row, a note).
``cells``: which cells a row scores -- ``perturbed`` (every annotated target cell), ``called_perturbed``
(those the escape mixture calls perturbed) or ``targets`` (the escape AUROC)."""
ALL_CELLS, CALLED_CELLS = "perturbed", "called_perturbed"

_MISSING = {"", "nan", "none", "null", "unknown", "na", "n/a"}


def _usable_labels(values: pd.Series, ignore: Iterable[str]) -> np.ndarray:
    """Boolean mask of cells whose label is present and not in ``ignore`` (case-insensitive)."""
    ignored = {str(v).strip().lower() for v in ignore} | {""}
    text = values.astype("string").str.strip().str.lower()
    return (values.notna() & ~text.isin(ignored).fillna(True)).to_numpy()


def chance_accuracy(labels: Sequence[Any]) -> float:
    """Accuracy of always predicting the most frequent class (the kNN chance level)."""
    counts = pd.Series(np.asarray(labels)).value_counts()
    return float(counts.iloc[0] / counts.sum()) if len(counts) else float("nan")


def _subsample(n: int, max_cells: int | None, seed: int) -> np.ndarray:
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_cells), replace=False))


def knn_accuracy(
    embedding: np.ndarray, labels: Sequence[Any], n_neighbors: int = 15, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated accuracy of a kNN classifier predicting ``labels`` from ``embedding``.

    Stratified folds when every class has at least two cells, plain shuffled
    folds otherwise; ``n_neighbors`` is capped by the training fold size.
    """
    y = np.asarray(labels).astype(str)
    n = y.size
    folds = max(2, min(int(folds), n))
    min_class = int(pd.Series(y).value_counts().min())
    if min_class >= 2:
        cv: Any = StratifiedKFold(n_splits=min(folds, min_class), shuffle=True, random_state=seed)
    else:
        cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    k = max(1, min(int(n_neighbors), n - n // cv.get_n_splits() - 1))
    predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=k), np.asarray(embedding), y, cv=cv)
    return float(np.mean(predicted == y))


def _neighbors(embedding: np.ndarray, n_neighbors: int, seed: int) -> ad.AnnData:
    return neighbours.neighbour_graph(embedding, n_neighbors, seed)


def leiden_clusters(
    embedding: np.ndarray,
    n_clusters: int | None = None,
    resolution: float | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
    max_iterations: int = 20,
) -> np.ndarray:
    """Leiden clusters of the kNN graph of ``embedding``.

    With a fixed ``resolution`` it is used as is. Otherwise the resolution is
    bisected (in log space, 0.001..10) until the partition has ``n_clusters``
    clusters (the closest count found is kept).
    """
    return _leiden(_neighbors(embedding, n_neighbors, seed), n_clusters, resolution, seed, max_iterations)[0]


def _leiden(
    holder: ad.AnnData,
    n_clusters: int | None,
    resolution: float | None,
    seed: int,
    max_iterations: int = 20,
    start: float | None = None,
) -> tuple[np.ndarray, float]:
    """Leiden clusters of ``holder``'s graph and the resolution that gave them.

    ``start``: a resolution to try first (another seed's match on the same graph); when it gives
    ``n_clusters`` clusters the bisection is skipped, else it runs as without it.
    """

    def run(res: float) -> np.ndarray:
        return neighbours.leiden(holder, res, seed)

    if resolution is not None:
        return run(float(resolution)), float(resolution)
    if n_clusters is None:
        raise ValueError("leiden_clusters needs n_clusters or a resolution")
    best, best_res, best_gap = None, float("nan"), np.inf
    if start is not None and np.isfinite(start):
        labels = run(float(start))
        best, best_res, best_gap = labels, float(start), abs(len(np.unique(labels)) - n_clusters)
        if best_gap == 0:
            return best, best_res
    low, high = np.log(1e-3), np.log(10.0)
    for _ in range(max_iterations):
        mid = 0.5 * (low + high)
        labels = run(float(np.exp(mid)))
        found = len(np.unique(labels))
        gap = abs(found - n_clusters)
        if gap < best_gap:
            best, best_res, best_gap = labels, float(np.exp(mid)), gap
        if found == n_clusters:
            break
        if found < n_clusters:
            low = mid
        else:
            high = mid
    assert best is not None
    return best, best_res


def program_scores(
    embedding: np.ndarray,
    labels: Sequence[Any],
    resolution: float | str | None = "auto",
    n_neighbors: int = 15,
    folds: int = 5,
    max_cells: int | None = 20000,
    seed: int = 0,
    leiden_runs: int = 1,
) -> dict[str, float]:
    """ARI, NMI (Leiden vs labels), silhouette and kNN accuracy of one embedding.

    Parameters
    ----------
    embedding
        ``(n, d)`` coordinates of the annotated cells.
    labels
        Their annotation (``n`` labels, at least two classes).
    resolution
        Leiden resolution, or ``"auto"``/None to match the number of classes.
    n_neighbors, folds
        kNN graph / classifier size and cross-validation folds.
    max_cells
        Cells subsampled (with ``seed``) for all scores; None = all.
    seed
        Seeds the subsample, the kNN graph, Leiden and the folds.
    leiden_runs
        Leiden runs (seeds ``seed, seed + 1, ...``) on the same kNN graph;
        ARI and NMI are their medians. Leiden's seed alone can move the ARI
        of one embedding by several hundredths when classes touch, so one
        run is a noisy score.
    """
    if isinstance(leiden_runs, bool) or not isinstance(leiden_runs, (int, np.integer)) or leiden_runs < 1:
        raise ValueError(f"leiden_runs must be a positive integer, got {leiden_runs!r}")
    y = np.asarray(labels).astype(str)
    keep = _subsample(y.size, max_cells, seed)
    emb, y = np.asarray(embedding)[keep], y[keep]
    n_classes = len(np.unique(y))
    res = None if resolution in (None, "auto") else float(resolution)
    graph = _neighbors(emb, n_neighbors, seed)
    # the first run bisects the resolution; the others start from its match (one Leiden call each when
    # their partition has as many clusters, the full bisection otherwise)
    runs, start = [], None
    for i in range(int(leiden_runs)):
        clusters, found_at = _leiden(graph, n_classes, res, seed + i, start=start)
        runs.append(clusters)
        start = found_at if start is None else start
    return {
        "ari": float(np.median([adjusted_rand_score(y, clusters) for clusters in runs])),
        "nmi": float(np.median([normalized_mutual_info_score(y, clusters) for clusters in runs])),
        "silhouette": float(silhouette_score(emb, y)) if 1 < n_classes < y.size else float("nan"),
        "knn_accuracy": knn_accuracy(emb, y, n_neighbors, folds, seed),
    }


def _row(
    metric: str,
    key: str,
    space: str,
    value: float,
    chance: float = float("nan"),
    n_cells: int = 0,
    n_classes: int = 0,
    note: str = "",
    cells: str = ALL_CELLS,
) -> dict[str, Any]:
    return {
        "metric": metric,
        "key": key,
        "space": space,
        "value": value,
        "chance_level": chance,
        "n_cells": n_cells,
        "n_classes": n_classes,
        "note": note,
        "cells": cells,
    }


def _program_rows(
    adata: ad.AnnData,
    spaces: Mapping[str, str],
    mask: np.ndarray,
    annotation_key: str,
    ignore_labels: Iterable[str],
    cells: str,
    score: Any,
) -> list[dict[str, Any]]:
    """Program-score rows of every space over the annotated cells of ``mask``."""
    mask = mask & _usable_labels(adata.obs[annotation_key], ignore_labels)
    labels = adata.obs[annotation_key].astype(str).to_numpy()[mask]
    n_classes = len(np.unique(labels))
    if n_classes < 2:
        note = (
            f"fewer than two annotated classes among {cells} cells in '{annotation_key}' "
            f"(ignoring {sorted(set(ignore_labels))})"
        )
        logger.info("Program scores skipped: %s.", note)
        return [
            _row(
                "ari",
                annotation_key,
                "",
                float("nan"),
                n_cells=int(mask.sum()),
                n_classes=n_classes,
                note=note,
                cells=cells,
            )
        ]
    chance = chance_accuracy(labels)
    rows = []
    for space, obsm_key in spaces.items():
        for metric, value in score(adata.obsm[obsm_key][mask], labels).items():
            rows.append(
                _row(
                    metric,
                    annotation_key,
                    space,
                    value,
                    chance if metric == "knn_accuracy" else float("nan"),
                    int(mask.sum()),
                    n_classes,
                    cells=cells,
                )
            )
    return rows


def _auroc_rows(
    adata: ad.AnnData, target_mask: np.ndarray, probability: np.ndarray | None, responder_key: str | None
) -> list[dict[str, Any]]:
    """AUROC of the escape probability for the target cells that truly responded (ground truth);
    cells without a probability (perturbations too rare to fit) are left out."""
    if probability is None or not responder_key:
        return []
    metric = "perturbed_probability_auroc"
    if responder_key not in adata.obs:
        return [
            _row(
                metric,
                responder_key,
                "escape",
                float("nan"),
                note=f"obs has no column '{responder_key}'",
                cells="targets",
            )
        ]
    scored = target_mask & np.isfinite(np.asarray(probability, dtype=np.float64))
    truth = adata.obs[responder_key].to_numpy().astype(bool)[scored]
    if truth.all() or not truth.any():
        return [
            _row(
                metric,
                responder_key,
                "escape",
                float("nan"),
                n_cells=int(scored.sum()),
                note=f"'{responder_key}' has a single value among scored target cells",
                cells="targets",
            )
        ]
    value = float(roc_auc_score(truth, np.asarray(probability)[scored]))
    return [_row(metric, responder_key, "escape", value, 0.5, int(scored.sum()), 2, cells="targets")]


def evaluate_spaces(
    adata: ad.AnnData,
    spaces: Mapping[str, str],
    target_mask: np.ndarray,
    annotation_key: str | None = None,
    confounders: Sequence[str] = (PHASE,),
    ignore_labels: Iterable[str] = ("unassigned", "none", "unknown", "control", "ctrl"),
    leiden_resolution: float | str | None = "auto",
    leiden_runs: int = 5,
    n_neighbors: int = 15,
    knn_folds: int = 5,
    max_cells: int | None = 20000,
    responder_key: str | None = "responded",
    seed: int = 0,
    called_mask: np.ndarray | None = None,
    probability: np.ndarray | None = None,
) -> pd.DataFrame:
    """The evaluation table of several embeddings of the same cells.

    Parameters
    ----------
    adata
        Cells with the embeddings in ``obsm``.
    spaces
        ``{space name: obsm key}``, e.g. ``{"salient": "X_salient", ...}``.
    target_mask
        Boolean mask of the perturbed cells (all scores use only those).
    annotation_key
        ``obs`` column annotating perturbations (a gene program); None or a
        missing column skips the program scores with a note.
    confounders
        ``obs`` columns of shared confounders; one that is absent, has only
        missing / ``unknown`` values or a single category is skipped with a
        note.
    ignore_labels
        Annotation labels that do not count as an annotation.
    leiden_resolution, leiden_runs, n_neighbors, knn_folds, max_cells, seed
        See :func:`program_scores` (``resolution``, ``folds``). ARI and NMI are
        medians over ``leiden_runs`` Leiden seeds: one run is a noisy score.
    called_mask
        Cells called perturbed by the escape mixture: the program scores are repeated over
        the annotated ones (rows with ``cells == "called_perturbed"``).
    probability, responder_key
        The escape mixture's per-cell probability and an ``obs`` column of ground truth (True for
        cells that truly responded, e.g. a simulation's ``responded``): adds
        ``perturbed_probability_auroc`` over the targets (skipped when the column is absent).

    Returns
    -------
    pandas.DataFrame
        :data:`TABLE_COLUMNS`; ``metric`` is ``ari``, ``nmi``, ``silhouette``,
        ``knn_accuracy`` (key = the annotation) or ``leakage_knn_accuracy``
        (key = the confounder), ``chance_level`` is filled for the kNN rows.
    """
    target_mask = np.asarray(target_mask, dtype=bool)
    rows: list[dict[str, Any]] = []

    # --- program separation -------------------------------------------------------
    if annotation_key is None:
        note = "no annotation: set schema.program_key (or contrastive_model.evaluation.annotation_key)"
        logger.info("Program scores skipped: %s.", note)
        rows.append(_row("ari", "", "", float("nan"), note=note))
    elif annotation_key not in adata.obs.columns:
        note = f"obs has no column '{annotation_key}'"
        logger.info("Program scores skipped: %s.", note)
        rows.append(_row("ari", annotation_key, "", float("nan"), note=note))
    else:

        def score(embedding: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            return program_scores(
                embedding, labels, leiden_resolution, n_neighbors, knn_folds, max_cells, seed, leiden_runs
            )

        rows += _program_rows(adata, spaces, target_mask, annotation_key, ignore_labels, ALL_CELLS, score)
        if called_mask is not None:
            called = target_mask & np.asarray(called_mask, dtype=bool)
            rows += _program_rows(adata, spaces, called, annotation_key, ignore_labels, CALLED_CELLS, score)
    rows += _auroc_rows(adata, target_mask, probability, responder_key)

    # --- confounder leakage -------------------------------------------------------
    for key in confounders:
        if key is None:
            continue
        if key not in adata.obs.columns:
            note = f"obs has no column '{key}'"
        else:
            values = adata.obs[key]
            usable = target_mask & _usable_labels(values, _MISSING)
            labels = values.astype(str).to_numpy()[usable]
            n_classes = len(np.unique(labels))
            note = (
                "" if n_classes >= 2 else (f"'{key}' is unknown/missing or has a single category among perturbed cells")
            )
        if note:
            logger.info("Confounder '%s' skipped: %s.", key, note)
            rows.append(_row("leakage_knn_accuracy", key, "", float("nan"), note=note))
            continue
        keep = np.flatnonzero(usable)[_subsample(int(usable.sum()), max_cells, seed)]
        labels = values.astype(str).to_numpy()[keep]
        chance = chance_accuracy(labels)
        for space, obsm_key in spaces.items():
            acc = knn_accuracy(adata.obsm[obsm_key][keep], labels, n_neighbors, knn_folds, seed)
            rows.append(_row("leakage_knn_accuracy", key, space, acc, chance, keep.size, len(np.unique(labels))))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def metrics_for_mlflow(table: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """``{name: {"value", "step": 0}}`` for ``MlflowMetricsHistoryDataset``.

    Names are ``<metric>.<space>`` for program scores (``ari.salient``; over the cells
    called perturbed ``ari.called_perturbed.salient``), ``perturbed_probability_auroc`` and
    ``<metric>.<key>.<space>`` for leakage (``leakage_knn_accuracy.phase.salient``)
    plus ``...<key>.chance``; skipped checks (NaN values) are left out.
    """
    out: dict[str, dict[str, float | int]] = {}
    for row in table.itertuples(index=False):
        if not np.isfinite(row.value):
            continue
        if row.metric == "perturbed_probability_auroc":
            out[row.metric] = {"value": float(row.value), "step": 0}
        elif getattr(row, "cells", ALL_CELLS) == CALLED_CELLS:
            out[metric_name(row.metric, CALLED_CELLS, row.space)] = {"value": float(row.value), "step": 0}
        elif row.metric == "leakage_knn_accuracy":
            out[metric_name(row.metric, row.key, row.space)] = {"value": float(row.value), "step": 0}
            out[metric_name(row.metric, row.key, "chance")] = {"value": float(row.chance_level), "step": 0}
        else:
            out[metric_name(row.metric, row.space)] = {"value": float(row.value), "step": 0}
            if row.metric == "knn_accuracy":
                out[metric_name(row.metric, "chance")] = {"value": float(row.chance_level), "step": 0}
    return out
