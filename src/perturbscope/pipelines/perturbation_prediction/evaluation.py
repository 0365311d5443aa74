"""Scoring a split: every method's predicted cells against the held-out truth, and the summary.

Definitions of the scores are in :mod:`.metrics`; the top DE genes of a perturbation come from
scanpy ``rank_genes_groups`` of its true test cells against the reference controls; the energy
distance is measured in the shared PCA space of :func:`fit_expression_pca`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from perturbscope.schema import IS_CONTROL, N_PERTURBED_GENES, PERTURBATION

from .baselines import BASELINES
from .metrics import METRIC_COLUMNS, score_perturbation, top_expressed_genes
from .splits import NOT_APPLICABLE, perturbations_with_test_cells, reference_mask, training_mask

logger = logging.getLogger(__name__)

__all__ = [
    "CVAE_METHODS",
    "ID_COLUMNS",
    "METHODS",
    "dense",
    "fit_expression_pca",
    "mean_of",
    "project",
    "score_split",
    "summarise",
    "top_de_genes",
]

CVAE_METHODS = ("cvae_prior", "cvae_controls")
"""Mode A (``z`` from the prior) and Mode B (encoded control cells)."""
METHODS = CVAE_METHODS + BASELINES
ID_COLUMNS = ("evaluation", PERTURBATION, N_PERTURBED_GENES, "method", "n_true_cells", "n_predicted_cells")
"""The identifying columns of a metrics table (the score columns follow)."""


def dense(x: Any) -> np.ndarray:
    """A (sparse) matrix as a dense float64 array."""
    return (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float64)


def mean_of(x: Any) -> np.ndarray:
    """Column means of a (sparse) matrix, float64 ``(G,)``."""
    return np.asarray(x.mean(axis=0), dtype=np.float64).reshape(-1)


def project(pca: dict[str, np.ndarray], x: Any) -> np.ndarray:
    """Cells ``(n, G)`` in the shared PCA space ``(n, n_pcs)``."""
    return (dense(x) - pca["mean"][None, :]) @ pca["components"].T


def fit_expression_pca(adata: ad.AnnData, n_pcs: int, seed: int) -> dict[str, np.ndarray]:
    """scanpy PCA of the screen's log-normalised ``X``: ``mean`` ``(G,)`` and ``components`` ``(n_pcs, G)``."""
    n_pcs = int(min(n_pcs, adata.n_vars - 1, adata.n_obs - 1))
    if n_pcs < 1:
        raise ValueError("the screen is too small for a PCA (needs at least 2 cells and 2 genes)")
    view = ad.AnnData(X=adata.X.astype(np.float32), var=pd.DataFrame(index=adata.var_names.copy()))
    sc.pp.pca(view, n_comps=n_pcs, zero_center=True, random_state=int(seed))
    return {"mean": mean_of(adata.X), "components": np.asarray(view.varm["PCs"].T, dtype=np.float64)}


def top_de_genes(
    adata: ad.AnnData, split: pd.DataFrame, labels: list[str], n_top: int, method: str
) -> dict[str, np.ndarray]:
    """Top DE genes (positions) of each perturbation's true test cells vs the reference controls.

    scanpy ``rank_genes_groups`` (``reference="control"``, ranked by the
    absolute score); perturbations with fewer than 2 test cells get none.
    """
    test = (split["role"] == "test").to_numpy()
    is_control = reference_mask(split)
    keep = test | is_control
    groups = np.where(is_control, "control", split[PERTURBATION].to_numpy())[keep]
    sizes = pd.Series(groups).value_counts()
    valid = [p for p in labels if sizes.get(p, 0) >= 2]
    out = {p: np.zeros(0, dtype=np.int64) for p in labels}
    if not valid:
        return out
    view = ad.AnnData(
        X=adata.X[keep].astype(np.float32),
        obs=pd.DataFrame({"group": pd.Categorical(groups)}, index=adata.obs_names[keep]),
        var=pd.DataFrame(index=adata.var_names.astype(str)),
    )
    view.uns["log1p"] = {"base": None}
    n_top = int(min(n_top, adata.n_vars))
    with warnings.catch_warnings():  # scanpy builds its result frame column by column
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(
            view,
            "group",
            groups=valid,
            reference="control",
            method=method,
            n_genes=n_top,
            rankby_abs=True,
        )
    position = {g: i for i, g in enumerate(view.var_names)}
    names = view.uns["rank_genes_groups"]["names"]
    for p in valid:
        out[p] = np.array([position[g] for g in names[p][:n_top]], dtype=np.int64)
    return out


def score_split(
    adata: ad.AnnData,
    split: pd.DataFrame,
    cvae_predictions: ad.AnnData,
    baseline_predictions: ad.AnnData,
    pca: dict[str, np.ndarray],
    seed: int = 0,
    *,
    n_top_de: int = 20,
    de_method: str = "t-test",
    top_k: Sequence[int] = (25, 50, 100),
    max_cells_energy: int = 300,
    n_top_expressed: int = 1000,
) -> pd.DataFrame:
    """Score every method on every test perturbation of the split.

    ``n_top_de``: top DE genes of each perturbation (``de_method`` of ``rank_genes_groups`` vs control on
    its true test cells); ``top_k``: the K of the top-K Jaccard (capped at the number of genes);
    ``max_cells_energy``: cells per side in the energy distance; ``n_top_expressed``: the genes most
    expressed in the controls over which ``l2_top_expressed`` is measured (Ahlmann-Eltze, Huber & Anders,
    Nature Methods 2025).

    The truth of a test perturbation is its held-out test cells. The
    reference control mean ``c`` is the mean of the split's reference
    controls (cells no method sees; see :mod:`.splits`); the perturbed-mean
    reference ``m`` is the mean of the training perturbed cells.
    The predicted mean of a method is the mean of its predicted cells (for
    the cVAE modes, of their ``layers["expected"]``, so the observation noise
    of the draws does not blur the mean; the draws in ``X`` are what the
    energy distance sees). Definitions of the scores: :mod:`.metrics` (top DE genes:
    :func:`top_de_genes`; energy distance in the shared PCA space of
    :func:`fit_expression_pca` on at most ``max_cells_energy`` cells per
    side).

    Returns
    -------
    pandas.DataFrame
        One row per (perturbation, method): ``evaluation``, ``perturbation``,
        ``n_perturbed_genes``, ``method``, ``n_true_cells``,
        ``n_predicted_cells`` and the score columns.
    """
    labels = perturbations_with_test_cells(split)
    if not labels:
        return pd.DataFrame(columns=list(ID_COLUMNS))
    kind = str(split.loc[split["role"] == "test", "evaluation"].iloc[0])
    test = (split["role"] == "test").to_numpy()
    is_control = split[IS_CONTROL].to_numpy()
    perturbed_train = training_mask(split) & ~is_control
    c = mean_of(adata.X[reference_mask(split)])
    m = mean_of(adata.X[perturbed_train])
    top_k = [int(k) for k in top_k]
    de = top_de_genes(adata, split, labels, int(n_top_de), str(de_method))
    max_cells = int(max_cells_energy)
    expressed = top_expressed_genes(c, int(n_top_expressed))
    rng = np.random.default_rng(int(seed))

    def subsample(rows: np.ndarray) -> np.ndarray:
        return rows if rows.size <= max_cells else np.sort(rng.choice(rows, size=max_cells, replace=False))

    # (method, perturbation) -> (rows, source AnnData); the predicted mean of a cVAE mode averages
    # each cell's expectation E[x | z, c] (layers["expected"]), so observation noise cancels exactly
    groups: dict[tuple[str, str], tuple[np.ndarray, ad.AnnData]] = {}
    for preds in (cvae_predictions, baseline_predictions):
        meth = preds.obs["method"].astype(str).to_numpy()
        lab = preds.obs[PERTURBATION].astype(str).to_numpy()
        for key in set(zip(meth, lab)):
            groups[key] = (np.flatnonzero((meth == key[0]) & (lab == key[1])), preds)
    labels_arr = split[PERTURBATION].to_numpy()
    n_genes_of = pd.Series(adata.obs[N_PERTURBED_GENES].to_numpy(), index=labels_arr).groupby(level=0).first()
    rows = []
    for label in labels:
        true_rows = np.flatnonzero(test & (labels_arr == label))
        t = mean_of(adata.X[true_rows])
        true_pcs = project(pca, adata.X[subsample(true_rows)])
        for method in METHODS:
            if (method, label) not in groups:
                continue
            sel, preds = groups[(method, label)]
            p = mean_of((preds.layers.get("expected", preds.X))[sel])
            scores = score_perturbation(
                p,
                t,
                c,
                m,
                de[label],
                top_k,
                pred_pcs=project(pca, preds.X[subsample(sel)]),
                true_pcs=true_pcs,
                expressed_genes=expressed,
            )
            rows.append(
                {
                    "evaluation": kind,
                    PERTURBATION: label,
                    N_PERTURBED_GENES: int(n_genes_of[label]),
                    "method": method,
                    "n_true_cells": int(true_rows.size),
                    "n_predicted_cells": int(sel.size),
                    **scores,
                }
            )
    table = pd.DataFrame(rows)
    logger.info("Scored %d method(s) on %d %s perturbation(s).", table["method"].nunique(), len(labels), kind)
    return table


def summarise(tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Merge the per-split metric tables (keyword: split name); summarise mean ± sd per split and method.

    Returns
    -------
    (metrics, summary, mlflow_metrics)
        The method × perturbation table of every split; the summary (one
        row per split and method: ``status`` ``scored``, ``n_perturbations`` and
        ``<score>_mean``, ``<score>_sd`` — NaN scores, e.g. the undefined
        correlation of a no-change prediction, are left out of the mean — and
        one row with ``status`` ``not applicable`` and its ``reason`` for a
        split without test cells, e.g. held-out perturbations on a singles-only
        screen); and the summary means as MLflow metrics
        ``<split>.<method>.<score>`` (the catalog prefixes them with
        ``perturbation_prediction.``).
    """
    scored = [t for t in tables.values() if len(t)]
    skipped = pd.DataFrame(
        [
            {
                "evaluation": name,
                "method": "",
                "status": "not applicable",
                "reason": NOT_APPLICABLE.get(name, "no test cells"),
                "n_perturbations": 0,
            }
            for name, table in tables.items()
            if not len(table)
        ],
        columns=["evaluation", "method", "status", "reason", "n_perturbations"],
    )
    if not scored:
        return pd.DataFrame(columns=list(ID_COLUMNS)), skipped, {}
    metrics = pd.concat(scored, ignore_index=True)
    scores = [c for c in metrics.columns if c in METRIC_COLUMNS or c.startswith("jaccard_top")]
    order = {m: i for i, m in enumerate(METHODS)}
    grouped = metrics.groupby(["evaluation", "method"], sort=False)
    summary = grouped[scores].agg(["mean", "std"])
    summary.columns = [f"{score}_{'sd' if stat == 'std' else 'mean'}" for score, stat in summary.columns]
    summary.insert(0, "n_perturbations", grouped.size())
    summary = summary.reset_index()
    summary["_order"] = summary["method"].map(order).fillna(len(order))
    summary = summary.sort_values(["evaluation", "_order"]).drop(columns="_order").reset_index(drop=True)
    summary.insert(2, "status", "scored")
    summary.insert(3, "reason", "")
    summary = pd.concat([summary, skipped], ignore_index=True) if len(skipped) else summary
    mlflow_metrics: dict[str, Any] = {}
    for _, row in summary.iterrows():
        for score in scores:
            value = row[f"{score}_mean"]
            if pd.notna(value):
                mlflow_metrics[f"{row['evaluation']}.{row['method']}.{score}"] = {
                    "value": float(value),
                    "step": 0,
                }
    return metrics, summary, mlflow_metrics
