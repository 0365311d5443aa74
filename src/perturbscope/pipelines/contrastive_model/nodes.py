"""Nodes of the contrastive_model pipeline (contrastiveVI on a processed screen).

Thin and pure: the model work is :class:`perturbscope.models.model.ContrastiveVI`, the
scores :mod:`.evaluation`, the figure :mod:`.figures`; every knob comes from
``conf/base/parameters_contrastive_model.yml`` (and the shared ``training`` block) and
nothing here touches paths or MLflow (the catalog does both).

Embed another screen with a trained model::

    from perturbscope.models.model import ContrastiveVI
    ContrastiveVI(catalog.load("contrastive_model")).embed(adata)   # obsm["X_salient"], ["X_background"]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.model.contrastive import (
    BACKGROUND_KEY,
    CALLED_PERTURBED,
    PERTURBED_PROBABILITY,
    SALIENT_KEY,
    ContrastiveModelError,
    ContrastiveVI,
    align_counts,
    cell_groups,
    embed_screen,
)
from perturbscope.ondisk import OnDiskScreen, is_on_disk
from perturbscope.schema import PERTURBATION, ScreenSchema

from .evaluation import evaluate_spaces, metrics_for_mlflow
from .figures import plot_embeddings

logger = logging.getLogger(__name__)

__all__ = [
    "ContrastiveModelError",
    "PCA_KEY",
    "align_counts",
    "embed_cells",
    "embed_screen",
    "escape_table",
    "evaluate_embeddings",
    "evaluation_metrics",
    "plot_embeddings",
    "rank_salient_genes",
    "train_contrastive_model",
]

PCA_KEY = "X_pca_baseline"
"""``obsm`` key of the PCA baseline of the evaluation."""
SALIENT_GENE_COLUMNS = [
    PERTURBATION,
    "rank",
    "gene",
    "mean_log2fc",
    "direction",
    "fraction_same_direction",
    "mean_with_salient",
    "mean_without_salient",
    "n_cells",
    "n_called_perturbed",
]
ESCAPE_COLUMNS = [
    PERTURBATION,
    "n_cells",
    "n_called_perturbed",
    "fraction_called_perturbed",
    "mean_perturbed_probability",
    "median_perturbed_probability",
    "estimated_perturbed_share",
    "separation",
    "control_false_call_rate",
]


def train_contrastive_model(
    screen: ad.AnnData,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    schema_params: dict[str, Any],
    seed: int,
    shared_training: dict[str, Any] | None = None,
    escape_params: dict[str, Any] | None = None,
    *,
    callback: Callable[[int, Any, ContrastiveVAE], bool | None] | None = None,
) -> tuple[ContrastiveVAE, pd.DataFrame]:
    """Train contrastiveVI: controls are the background, every other cell a target (:meth:`ContrastiveVI.fit`).

    ``escape_params`` (``contrastive_model.escape``) set the escape mixture fitted on the
    trained salient codes: each target cell's probability of having been perturbed.

    ``callback`` (not a pipeline input) goes to :func:`~perturbscope.models.fit`, e.g. to
    score the embedding every few epochs in a benchmark. Returns the trained module (eval
    mode, CPU) and the per-epoch history (``best`` marks the restored epoch).
    """
    api = ContrastiveVI.fit(
        screen,
        model_params,
        training_params,
        shared_training=shared_training,
        batch_key=ScreenSchema.from_params(schema_params or {}).batch_key,
        seed=seed,
        callback=callback,
        escape=escape_params,
    )
    return api.module, api.history


def embed_cells(
    screen: ad.AnnData | OnDiskScreen, model: ContrastiveVAE, params: dict[str, Any], seed: int
) -> ad.AnnData | OnDiskScreen:
    """Salient and background embeddings, a PCA baseline and UMAPs of both spaces.

    Adds to a copy of the screen: ``obsm["X_salient"]``, ``obsm["X_background"]``,
    ``obsm["X_pca_baseline"]`` (PCA of the log-normalised ``X`` with as many
    components as both latents together, the evaluation baseline),
    ``obsm["X_umap_salient"]``, ``obsm["X_umap_background"]`` and
    ``uns["contrastive_model"]`` (hyperparameters and training summary); with the escape
    mixture also ``obs["perturbed_probability"]`` and ``obs["called_perturbed"]`` (above
    ``call_threshold``).
    """
    params = dict(params or {})
    umap_max = params.get("umap_max_cells")
    out = embed_screen(
        model,
        screen,
        batch_size=int(params.get("batch_size", 1024)),
        umap=bool(params.get("umap", True)),
        n_neighbors=int(params.get("n_neighbors", 15)),
        min_dist=float(params.get("umap_min_dist", 0.5)),
        seed=seed,
        call_threshold=float(params.get("call_threshold", 0.5)),
        umap_max_cells=None if umap_max is None else int(umap_max),
    )
    n_comps = params.get("pca_components") or (model.n_background + model.n_salient)
    n_comps = int(min(n_comps, out.n_obs - 1, out.n_vars - 1))
    if is_on_disk(out):
        out.obsm[PCA_KEY] = _pca_on_disk(out, n_comps, int(params.get("pca_max_cells") or 50000), seed)
    else:
        matrix = out.X.astype(np.float32) if sp.issparse(out.X) else np.asarray(out.X, dtype=np.float32)
        out.obsm[PCA_KEY] = np.asarray(sc.pp.pca(matrix, n_comps=n_comps, random_state=seed), dtype=np.float32)
    meta = {k: v for k, v in (model.metadata or {}).items() if k not in ("genes", "train_config", "escape_mixture")}
    out.uns["contrastive_model"] = {
        "hparams": {k: v for k, v in model.hparams.items() if v is not None},
        "training": {k: v for k, v in meta.items() if v is not None and v != []},
    }
    return out


def _pca_on_disk(screen: OnDiskScreen, n_comps: int, max_cells: int, seed: int) -> np.ndarray:
    """PCA of ``X`` for a screen read from disk: fitted by scanpy on ``max_cells`` cells drawn with
    ``seed``, every cell projected block by block."""
    pick = np.zeros(screen.n_obs, dtype=bool)
    pick[np.random.default_rng(seed).choice(screen.n_obs, min(max_cells, screen.n_obs), replace=False)] = True
    sample = sp.vstack([chunk.x[pick[chunk.start : chunk.stop]] for chunk in screen.chunks(x=True)], format="csr")
    _, components, _, _ = sc.pp.pca(sample, n_comps=n_comps, random_state=seed, return_info=True)
    mean = np.asarray(sample.mean(axis=0)).ravel()
    offset = mean @ components.T
    out = np.empty((screen.n_obs, n_comps), dtype=np.float32)
    for chunk in screen.chunks(x=True):
        out[chunk.start : chunk.stop] = np.asarray(chunk.x @ components.T) - offset
    logger.info(
        "PCA baseline fitted on %s of %s cells (contrastive_model.embedding.pca_max_cells).",
        f"{int(pick.sum()):,}",
        f"{screen.n_obs:,}",
    )
    return out


def evaluate_embeddings(
    embedded: ad.AnnData, params: dict[str, Any], schema_params: dict[str, Any], seed: int
) -> pd.DataFrame:
    """The evaluation table: program separation and confounder leakage per space.

    Spaces: salient, background and the PCA baseline. Program scores (ARI,
    NMI of Leiden clusters vs the annotation, silhouette, kNN accuracy) use
    perturbed cells with an annotation: ``evaluation.annotation_key``, else
    ``schema.program_key``. Leakage is kNN accuracy of each confounder
    (``evaluation.confounders`` plus ``schema.batch_key``) over perturbed
    cells, next to its chance level; a confounder that is absent or unknown
    (e.g. ``phase`` on a screen without cell-cycle genes) is skipped with a
    logged note and a note row. With the escape mixture, the program scores are also
    computed over the cells called perturbed (``cells`` = ``called_perturbed``), and on a
    screen with ground truth (``evaluation.responder_key``, e.g. a simulation's
    ``responded``) the AUROC of ``perturbed_probability`` for the cells that truly responded.
    """
    params = dict(params or {})
    schema = ScreenSchema.from_params(schema_params or {})
    annotation_key = params.get("annotation_key") or schema.program_key
    confounders = list(params.get("confounders") or [])
    if schema.batch_key and schema.batch_key not in confounders:
        confounders.append(schema.batch_key)
    elif "batch" not in confounders:
        logger.info("No schema.batch_key: batch leakage is not evaluated.")
    table = evaluate_spaces(
        embedded,
        spaces={"salient": SALIENT_KEY, "background": BACKGROUND_KEY, "pca": PCA_KEY},
        target_mask=cell_groups(embedded)[1],
        annotation_key=annotation_key,
        confounder_keys=confounders,
        ignore_labels=params.get("ignore_labels") or ("unassigned", "none", "unknown", "control", "ctrl"),
        resolution=params.get("leiden_resolution", "auto"),
        n_neighbors=int(params.get("n_neighbors", 15)),
        folds=int(params.get("knn_folds", 5)),
        max_cells=params.get("max_cells", 20000),
        seed=seed,
        leiden_runs=params.get("leiden_runs", 1),
        called_mask=(
            embedded.obs[CALLED_PERTURBED].to_numpy().astype(bool) if CALLED_PERTURBED in embedded.obs else None
        ),
        probability=(embedded.obs[PERTURBED_PROBABILITY].to_numpy() if PERTURBED_PROBABILITY in embedded.obs else None),
        responder_key=params.get("responder_key"),
    )
    for row in table.itertuples(index=False):
        if np.isfinite(row.value):
            chance = f" (chance {row.chance_level:.3f})" if np.isfinite(row.chance_level) else ""
            logger.info("%s %s [%s]: %.3f%s", row.metric, row.key, row.space, row.value, chance)
    return table


def evaluation_metrics(table: pd.DataFrame) -> dict[str, Any]:
    """The evaluation table as MLflow metrics (``ari.salient``, ``leakage_knn_accuracy.phase.salient``...)."""
    return metrics_for_mlflow(table)


def rank_salient_genes(embedded: ad.AnnData, model: ContrastiveVAE, params: dict[str, Any]) -> pd.DataFrame:
    """Genes each perturbation moves: decoded expression with the salient code vs ``s = 0``.

    Per perturbation (see :meth:`ContrastiveVI.salient_log_fold_change`):
    ``mean_log2fc`` (the effect size), ``fraction_same_direction`` (share of its cells
    whose log2 fold change has the sign of the mean), ``mean_with_salient`` /
    ``mean_without_salient`` (mean decoded expression per ``scale`` counts); ranked by
    ``|mean_log2fc|`` (``rank`` 1 = the most moved), the top ``top_genes`` per
    perturbation (null = all genes). With ``obs["perturbed_probability"]`` (the escape
    mixture) every mean is weighted by the cells' probability of having been perturbed
    (escapers count little; a cell without a probability counts fully) and
    ``n_called_perturbed`` counts the cells above ``call_threshold``.
    """
    screen = embedded
    params = dict(params or {})
    top = params.get("top_genes", 50)
    min_cells = int(params.get("min_cells", 1))
    api = ContrastiveVI(model)
    is_target = cell_groups(screen)[1]
    data = api.cell_data(screen)
    genes = np.asarray((model.metadata or {}).get("genes") or screen.var_names, dtype=object)
    labels = (
        screen.obs[PERTURBATION].astype(str).to_numpy()
        if PERTURBATION in screen.obs
        else np.full(screen.n_obs, "target")
    )
    frames = []
    probability = None
    if PERTURBED_PROBABILITY in screen.obs:
        probability = np.nan_to_num(screen.obs[PERTURBED_PROBABILITY].to_numpy(dtype=np.float64), nan=1.0)
    threshold = float(params.get("call_threshold", 0.5))
    for label in sorted(np.unique(labels[is_target])):
        idx = np.flatnonzero(is_target & (labels == label))
        if idx.size < min_cells:
            continue
        weights = None if probability is None else probability[idx]
        shift = api.salient_log_fold_change(
            data,
            idx,
            scale=float(params.get("scale", 1e4)),
            pseudocount=float(params.get("pseudocount", 0.01)),
            batch_size=int(params.get("batch_size", 1024)),
            weights=weights,
        )
        n_called = idx.size if weights is None else int((weights > threshold).sum())
        frame = pd.DataFrame(
            {PERTURBATION: label, "gene": genes, **shift, "n_cells": idx.size, "n_called_perturbed": n_called}
        )
        frame = frame.reindex(frame["mean_log2fc"].abs().sort_values(ascending=False, kind="stable").index)
        frame.insert(1, "rank", np.arange(1, len(frame) + 1))
        frame.insert(4, "direction", np.where(frame["mean_log2fc"] >= 0, "up", "down"))
        frames.append(frame if top is None else frame.head(int(top)))
    if not frames:
        return pd.DataFrame(columns=SALIENT_GENE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[SALIENT_GENE_COLUMNS]


def escape_table(embedded: ad.AnnData, model: ContrastiveVAE) -> pd.DataFrame:
    """Per perturbation: cells, cells called perturbed, their probability of having been perturbed,
    and the escape mixture's fit.

    ``estimated_perturbed_share`` is the mixture's weight of perturbed cells (0: the perturbation
    calls nobody), ``separation`` the distance of its two components in null sds, and
    ``control_false_call_rate`` the share of held-out controls it would call perturbed. Empty for
    a model without an escape mixture (``contrastive_model.escape.enabled: false``).
    """
    mixture = ContrastiveVI(model).escape_mixture
    if PERTURBED_PROBABILITY not in embedded.obs or mixture is None:
        logger.info("The model has no escape mixture (contrastive_model.escape.enabled): no escape table.")
        return pd.DataFrame(columns=ESCAPE_COLUMNS)
    is_target = cell_groups(embedded)[1]
    probability = embedded.obs[PERTURBED_PROBABILITY].to_numpy().astype(np.float64)
    called = embedded.obs[CALLED_PERTURBED].to_numpy().astype(bool)
    labels = embedded.obs[PERTURBATION].astype(str).to_numpy()
    fits = {row[PERTURBATION]: row for row in mixture.table()}
    rows = []
    for label in sorted(np.unique(labels[is_target])):
        mask = is_target & (labels == label)
        p = probability[mask]
        fit = fits.get(label, {})
        fitted = bool(np.isfinite(p).any())
        rows.append(
            {
                PERTURBATION: label,
                "n_cells": int(mask.sum()),
                "n_called_perturbed": int(called[mask].sum()),
                "fraction_called_perturbed": float(called[mask].mean()),
                "mean_perturbed_probability": float(np.nanmean(p)) if fitted else np.nan,
                "median_perturbed_probability": float(np.nanmedian(p)) if fitted else np.nan,
                **{k: fit.get(k, np.nan) for k in ESCAPE_COLUMNS[6:]},
            }
        )
    table = pd.DataFrame(rows, columns=ESCAPE_COLUMNS)
    logger.info(
        "Escape mixture: %d of %d target cells called perturbed; %d of %d perturbations call nobody.",
        int(table["n_called_perturbed"].sum()),
        int(table["n_cells"].sum()),
        int((table["estimated_perturbed_share"] == 0).sum()),
        len(table),
    )
    return table
