"""Nodes of the contrastive_model pipeline (contrastiveVI on a processed screen).

Thin and pure: the model work is :class:`perturbscope.models.model.ContrastiveVI` and its escape
mixture, the scores :mod:`.evaluation`, the figure :mod:`.figures`. Each parameter block of
``conf/base/parameters_contrastive_model.yml`` is the keyword arguments of one function, whose signature
owns the defaults (:func:`perturbscope.parameters.options`); nothing here touches paths or MLflow.

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

from perturbscope.blocks import BlockScreen
from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.escape import EscapeMixture
from perturbscope.models.model.contrastive import (
    BACKGROUND_KEY,
    SALIENT_KEY,
    ContrastiveVI,
    call_escapers,
    cell_groups,
    fit_escapers,
)
from perturbscope.parameters import conf_errors, options, required, training_settings
from perturbscope.schema import ScreenSchema

from . import tables
from .evaluation import evaluate_spaces, metrics_for_mlflow
from .figures import plot_embeddings

logger = logging.getLogger(__name__)

__all__ = [
    "call_perturbed_cells",
    "embed_cells",
    "escape_table",
    "evaluate_embeddings",
    "evaluation_metrics",
    "fit_escape_mixture",
    "plot_embeddings",
    "rank_salient_genes",
    "train_contrastive_model",
]

SECTION = "contrastive_model"


def train_contrastive_model(
    screen: ad.AnnData | BlockScreen,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    shared_training: dict[str, Any],
    schema_params: dict[str, Any],
    seed: int,
    *,
    callback: Callable[[int, Any, ContrastiveVAE], bool | None] | None = None,
) -> tuple[ContrastiveVAE, pd.DataFrame]:
    """Train contrastiveVI: controls are the background, every other cell a target (:meth:`ContrastiveVI.fit`).

    ``callback`` (not a pipeline input) goes to :func:`~perturbscope.models.fit`, e.g. to score the
    embedding every few epochs in a benchmark. Returns the trained module (eval mode, CPU) and the
    per-epoch history (``best`` marks the restored epoch).
    """
    with conf_errors(SECTION, shared_training=shared_training, own_training=training_params):
        api = ContrastiveVI.fit(
            screen,
            model_params,
            training_settings(shared_training, training_params),
            batch_key=ScreenSchema.from_params(schema_params).batch_key,
            seed=seed,
            callback=callback,
        )
    return api.module, api.history


def embed_cells(
    screen: ad.AnnData | BlockScreen, model: ContrastiveVAE, params: dict[str, Any], seed: int
) -> tuple[ad.AnnData | BlockScreen, ad.AnnData]:
    """Salient and background embeddings, a PCA baseline and UMAPs of both spaces.

    Returns the embedded screen and its embeddings alone (:func:`.tables.cell_embeddings`: ``obs``, ``obsm``,
    ``uns``, no genes), which the nodes after this one read. Adds to a copy of the screen:
    ``obsm["X_salient"]``, ``obsm["X_background"]``,
    ``obsm["X_pca_baseline"]`` (PCA of the log-normalised ``X`` with ``pca_components`` components, by
    default as many as both latents together; a screen of more than ``pca_max_cells`` cells, or read from
    disk, fits it on that many cells and projects every cell), ``obsm["X_umap_salient"]``,
    ``obsm["X_umap_background"]`` (``umap_max_cells`` cells at most) and ``uns["contrastive_model"]``
    (hyperparameters and training summary).
    """
    settings = options(tables.embed_with_baseline, params, f"{SECTION}.embedding", exclude={"screen", "model", "seed"})
    embedded = tables.embed_with_baseline(screen, model, seed, **settings)
    return embedded, tables.cell_embeddings(embedded)


# ---------------------------------------------------------------------------------- escapers
def fit_escape_mixture(embedded: ad.AnnData | BlockScreen, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """The escape mixture (Mixscape's model on the salient code, :func:`fit_escapers`) as a JSON-able dict;
    ``{}`` when ``escape.enabled`` is false. Its own artifact: refit it with other settings without
    retraining (``kedro run --pipelines contrastive_model --from-nodes fit_escape_mixture``)."""
    section = f"{SECTION}.escape"
    if not required(params, "enabled", section):
        logger.info("contrastive_model.escape.enabled is false: no escape mixture.")
        return {}
    settings = options(
        fit_escapers, required(params, "mixture", section), f"{section}.mixture", exclude={"embedded", "seed"}
    )
    with conf_errors(f"{section}.mixture"):
        return fit_escapers(embedded, seed=seed, **settings).to_dict()


def call_perturbed_cells(
    embedded: ad.AnnData | BlockScreen, mixture: dict[str, Any], params: dict[str, Any]
) -> pd.DataFrame:
    """Per cell: ``perturbed_probability`` and ``called_perturbed`` (probability above
    ``escape.call_threshold``); no rows without a mixture."""
    if not mixture:
        return pd.DataFrame(columns=tables.CALL_COLUMNS, index=pd.Index([], name="cell"))
    threshold = required(params, "call_threshold", f"{SECTION}.escape")
    return call_escapers(embedded, EscapeMixture.from_dict(mixture), threshold)


def escape_table(embedded: ad.AnnData, calls: pd.DataFrame, mixture: dict[str, Any]) -> pd.DataFrame:
    """Per perturbation: cells, cells called perturbed, their probability of having been perturbed, and the escape
    mixture's fit (:func:`.tables.escape_summary`); empty without an escape mixture."""
    return tables.escape_summary(embedded, tables.aligned_calls(embedded, calls), mixture)


# ------------------------------------------------------------------------------- evaluation
def evaluate_embeddings(
    embedded: ad.AnnData, calls: pd.DataFrame, params: dict[str, Any], schema_params: dict[str, Any], seed: int
) -> pd.DataFrame:
    """The evaluation table: program separation and confounder leakage per space (:func:`evaluate_spaces`).

    Spaces: salient, background and the PCA baseline. Program scores use perturbed cells with an
    annotation (``annotation_key``, else ``schema.program_key``); leakage is measured for the
    ``confounders`` plus ``schema.batch_key``. With escape calls, the program scores are also computed
    over the cells called perturbed, and on a screen with ground truth (``responder_key``) the AUROC of
    ``perturbed_probability`` for the cells that truly responded.
    """
    settings = options(
        evaluate_spaces,
        params,
        f"{SECTION}.evaluation",
        exclude={"adata", "spaces", "target_mask", "seed", "called_mask", "probability"},
        defaults=True,
    )
    schema = ScreenSchema.from_params(schema_params)
    settings["annotation_key"] = settings["annotation_key"] or schema.program_key
    confounders = list(settings["confounders"])
    if schema.batch_key and schema.batch_key not in confounders:
        confounders.append(schema.batch_key)
    settings["confounders"] = confounders
    aligned = tables.aligned_calls(embedded, calls)
    table = evaluate_spaces(
        embedded,
        spaces={"salient": SALIENT_KEY, "background": BACKGROUND_KEY, "pca": tables.PCA_KEY},
        target_mask=cell_groups(embedded)[1],
        seed=seed,
        called_mask=None if aligned is None else aligned[1],
        probability=None if aligned is None else aligned[0],
        **settings,
    )
    for row in table.itertuples(index=False):
        if np.isfinite(row.value):
            chance = f" (chance {row.chance_level:.3f})" if np.isfinite(row.chance_level) else ""
            logger.info("%s %s [%s]: %.3f%s", row.metric, row.key, row.space, row.value, chance)
    return table


def evaluation_metrics(table: pd.DataFrame) -> dict[str, Any]:
    """The evaluation table as MLflow metrics (``ari.salient``, ``leakage_knn_accuracy.phase.salient``...)."""
    return metrics_for_mlflow(table)


def rank_salient_genes(
    screen: ad.AnnData | BlockScreen, calls: pd.DataFrame, model: ContrastiveVAE, params: dict[str, Any]
) -> pd.DataFrame:
    """Genes each perturbation moves: decoded expression with the salient code vs ``s = 0``.

    Per perturbation (see :meth:`ContrastiveVI.salient_log_fold_change`): ``mean_log2fc`` (the effect
    size), ``fraction_same_direction`` (share of its cells whose log2 fold change has the sign of the
    mean), ``mean_with_salient`` / ``mean_without_salient`` (mean decoded expression per ``scale``
    counts); ranked by ``|mean_log2fc|`` (``rank`` 1 = the most moved), the top ``top_genes`` per
    perturbation (null = all genes). With escape calls every mean is weighted by the cells' probability of
    having been perturbed (escapers count little; a cell without a probability counts fully) and
    ``n_called_perturbed`` counts the cells above ``call_threshold``.
    """
    settings = options(
        tables.salient_gene_table, params, f"{SECTION}.salient_expression", exclude={"screen", "calls", "model"}
    )
    return tables.salient_gene_table(screen, calls, model, **settings)
