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
    SALIENT_KEY,
    ContrastiveModelError,
    ContrastiveVI,
    align_counts,
    cell_groups,
    embed_screen,
)
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
    "evaluate_embeddings",
    "evaluation_metrics",
    "plot_embeddings",
    "rank_salient_genes",
    "train_contrastive_model",
]

PCA_KEY = "X_pca_baseline"
"""``obsm`` key of the PCA baseline of the evaluation."""
SALIENT_GENE_COLUMNS = [PERTURBATION, "rank", "gene", "mean_log2fc", "direction", "fraction_same_direction",
                        "mean_with_salient", "mean_without_salient", "n_cells"]


def train_contrastive_model(
    screen: ad.AnnData,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    schema_params: dict[str, Any],
    seed: int,
    shared_training: dict[str, Any] | None = None,
    *,
    callback: Callable[[int, Any, ContrastiveVAE], bool | None] | None = None,
) -> tuple[ContrastiveVAE, pd.DataFrame]:
    """Train contrastiveVI: controls are the background, every other cell a target (:meth:`ContrastiveVI.fit`).

    ``callback`` (not a pipeline input) goes to :func:`~perturbscope.models.fit`, e.g. to
    score the embedding every few epochs in a benchmark. Returns the trained module (eval
    mode, CPU) and the per-epoch history (``best`` marks the restored epoch).
    """
    api = ContrastiveVI.fit(
        screen, model_params, training_params, shared_training=shared_training,
        batch_key=ScreenSchema.from_params(schema_params or {}).batch_key, seed=seed, callback=callback,
    )
    return api.module, api.history


def embed_cells(screen: ad.AnnData, model: ContrastiveVAE, params: dict[str, Any], seed: int) -> ad.AnnData:
    """Salient and background embeddings, a PCA baseline and UMAPs of both spaces.

    Adds to a copy of the screen: ``obsm["X_salient"]``, ``obsm["X_background"]``,
    ``obsm["X_pca_baseline"]`` (PCA of the log-normalised ``X`` with as many
    components as both latents together, the evaluation baseline),
    ``obsm["X_umap_salient"]``, ``obsm["X_umap_background"]`` and
    ``uns["contrastive_model"]`` (hyperparameters and training summary).
    """
    params = dict(params or {})
    out = embed_screen(
        model, screen, batch_size=int(params.get("batch_size", 1024)), umap=bool(params.get("umap", True)),
        n_neighbors=int(params.get("n_neighbors", 15)), min_dist=float(params.get("umap_min_dist", 0.5)), seed=seed,
    )
    n_comps = params.get("pca_components") or (model.n_background + model.n_salient)
    n_comps = int(min(n_comps, out.n_obs - 1, out.n_vars - 1))
    matrix = out.X.astype(np.float32) if sp.issparse(out.X) else np.asarray(out.X, dtype=np.float32)
    out.obsm[PCA_KEY] = np.asarray(sc.pp.pca(matrix, n_comps=n_comps, random_state=seed), dtype=np.float32)
    meta = {k: v for k, v in (model.metadata or {}).items() if k not in ("genes", "train_config")}
    out.uns["contrastive_model"] = {
        "hparams": {k: v for k, v in model.hparams.items() if v is not None},
        "training": {k: v for k, v in meta.items() if v is not None and v != []},
    }
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
    logged note and a note row.
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
    )
    for row in table.itertuples(index=False):
        if np.isfinite(row.value):
            chance = f" (chance {row.chance_level:.3f})" if np.isfinite(row.chance_level) else ""
            logger.info("%s %s [%s]: %.3f%s", row.metric, row.key, row.space, row.value, chance)
    return table


def evaluation_metrics(table: pd.DataFrame) -> dict[str, Any]:
    """The evaluation table as MLflow metrics (``ari.salient``, ``leakage_knn_accuracy.phase.salient``...)."""
    return metrics_for_mlflow(table)


def rank_salient_genes(screen: ad.AnnData, model: ContrastiveVAE, params: dict[str, Any]) -> pd.DataFrame:
    """Genes each perturbation moves: decoded expression with the salient code vs ``s = 0``.

    Per perturbation (see :meth:`ContrastiveVI.salient_log_fold_change`):
    ``mean_log2fc`` (the effect size), ``fraction_same_direction`` (share of its cells
    whose log2 fold change has the sign of the mean), ``mean_with_salient`` /
    ``mean_without_salient`` (mean decoded expression per ``scale`` counts); ranked by
    ``|mean_log2fc|`` (``rank`` 1 = the most moved), the top ``top_genes`` per
    perturbation (null = all genes).
    """
    params = dict(params or {})
    top = params.get("top_genes", 50)
    min_cells = int(params.get("min_cells", 1))
    api = ContrastiveVI(model)
    is_target = cell_groups(screen)[1]
    data = api.cell_data(screen)
    genes = np.asarray((model.metadata or {}).get("genes") or screen.var_names, dtype=object)
    labels = (screen.obs[PERTURBATION].astype(str).to_numpy() if PERTURBATION in screen.obs
              else np.full(screen.n_obs, "target"))
    frames = []
    for label in sorted(np.unique(labels[is_target])):
        idx = np.flatnonzero(is_target & (labels == label))
        if idx.size < min_cells:
            continue
        shift = api.salient_log_fold_change(
            data, idx, scale=float(params.get("scale", 1e4)), pseudocount=float(params.get("pseudocount", 0.01)),
            batch_size=int(params.get("batch_size", 1024)),
        )
        frame = pd.DataFrame({PERTURBATION: label, "gene": genes, **shift, "n_cells": idx.size})
        frame = frame.reindex(frame["mean_log2fc"].abs().sort_values(ascending=False, kind="stable").index)
        frame.insert(1, "rank", np.arange(1, len(frame) + 1))
        frame.insert(4, "direction", np.where(frame["mean_log2fc"] >= 0, "up", "down"))
        frames.append(frame if top is None else frame.head(int(top)))
    if not frames:
        return pd.DataFrame(columns=SALIENT_GENE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[SALIENT_GENE_COLUMNS]
