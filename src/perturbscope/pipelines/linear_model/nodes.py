"""Nodes of the linear_model pipeline (LDVAE on a processed screen).

Thin and pure: the model work is :class:`perturbscope.models.model.LDVAE`, the effect
statistics :mod:`.effects`, the figure :mod:`.figures`; every knob comes from
``conf/base/parameters_linear_model.yml`` (and the shared ``training`` block) and nothing
here touches paths or MLflow (the catalog does both).

What the pipeline produces, and how to read it:

* ``linear_loadings`` -- genes x factors: the change of a gene's natural-log
  expression per standard deviation of a factor (over the screen's cells).
* ``linear_factor_top_genes`` -- per factor, the genes with the largest
  positive and negative loadings: the factor's gene module.
* ``linear_factor_effects`` -- per perturbation and factor, how far the
  perturbation's cells sit from the control cells on the factor (see :mod:`.effects`),
  e.g. "KLF1 raises factor_3 (+1.9 SD): up HBG1, HBZ, ...".

Embed another screen with a trained model::

    from perturbscope.models.model import LDVAE
    LDVAE(catalog.load("linear_model")).embed(other_screen).obsm["X_ldvae"]   # genes aligned by name
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from perturbscope.models._checks import check_int
from perturbscope.models.linear import LinearVAE
from perturbscope.models.model.linear import LATENT_KEY, LDVAE, loadings_matrix
from perturbscope.parameters import conf_errors, options, training_settings
from perturbscope.schema import PERTURBATION, ScreenSchema

from .effects import EFFECT_COLUMNS, factor_effects
from .figures import plot_factor_effects

__all__ = [
    "EFFECT_COLUMNS",
    "LATENT_KEY",
    "TOP_GENE_COLUMNS",
    "embed_cells",
    "factor_loadings",
    "factor_perturbation_effects",
    "linear_model_metrics",
    "plot_factor_effects",
    "top_genes_per_factor",
    "train_linear_model",
]

SECTION = "linear_model"
TOP_GENE_COLUMNS = ["factor", "direction", "rank", "gene", "loading"]


def train_linear_model(
    screen: ad.AnnData,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    shared_training: dict[str, Any],
    rotation: str,
    schema_params: dict[str, Any],
    seed: int,
) -> tuple[LinearVAE, pd.DataFrame]:
    """Train the LDVAE on every cell of the screen (see :meth:`LDVAE.fit`).

    Returns the trained module (eval mode, CPU; ``metadata`` holds the genes, batch categories, training
    summary and held-out reconstruction log-likelihood) and the per-epoch history (``best`` marks the
    restored epoch).
    """
    with conf_errors(
        SECTION,
        shared_training=shared_training,
        own_training=training_params,
        arguments={"rotation": f"{SECTION}.factors.rotation"},
    ):
        api = LDVAE.fit(
            screen,
            model_params,
            training_settings(shared_training, training_params),
            rotation=rotation,
            batch_key=ScreenSchema.from_params(schema_params).batch_key,
            seed=seed,
        )
    return api.module, api.history


def embed_cells(screen: ad.AnnData, model: LinearVAE, params: dict[str, Any]) -> ad.AnnData:
    """The processed screen with the factor scores in ``obsm["X_ldvae"]`` (see :meth:`LDVAE.embed`)."""
    return LDVAE(model).embed(screen, **options(LDVAE.embed, params, f"{SECTION}.embedding", exclude={"self", "adata"}))


def factor_loadings(model: LinearVAE) -> pd.DataFrame:
    """Genes x factors loadings: a ``gene`` column, then ``factor_1 ... factor_K``."""
    return LDVAE(model).loadings()


def top_genes_per_factor(loadings: pd.DataFrame, n_top_genes: int = 20) -> pd.DataFrame:
    """The ``n_top_genes`` largest positive and negative loadings of every factor.

    Long table ``factor, direction (positive/negative), rank (1 = strongest), gene, loading``.
    """
    with conf_errors(SECTION, arguments={"n_top_genes": f"{SECTION}.factors.n_top_genes"}):
        n_top = check_int("n_top_genes", n_top_genes, 1, "genes per factor and sign")
    matrix = loadings_matrix(loadings)
    rows = []
    for factor in matrix.columns:
        column = matrix[factor]
        for direction, picked in (
            ("positive", column[column > 0].sort_values(ascending=False).head(n_top)),
            ("negative", column[column < 0].sort_values(ascending=True).head(n_top)),
        ):
            for rank, (gene, value) in enumerate(picked.items(), start=1):
                rows.append((factor, direction, rank, str(gene), float(value)))
    return pd.DataFrame(rows, columns=TOP_GENE_COLUMNS)


def factor_perturbation_effects(
    embedded: ad.AnnData, top_genes: pd.DataFrame, params: dict[str, Any], schema_params: dict[str, Any]
) -> pd.DataFrame:
    """How far each perturbation moves each factor relative to the control cells (:func:`.effects.factor_effects`)."""
    settings = options(factor_effects, params, f"{SECTION}.effects", exclude={"embedded", "top_genes", "program_key"})
    with conf_errors(f"{SECTION}.effects"):
        return factor_effects(embedded, top_genes, ScreenSchema.from_params(schema_params).program_key, **settings)


def linear_model_metrics(model: LinearVAE, effects: pd.DataFrame) -> dict[str, Any]:
    """Run-level numbers for MLflow: held-out reconstruction log-likelihood, significant effects."""
    meta = model.metadata or {}
    out: dict[str, Any] = {}
    value = meta.get("validation_reconstruction_log_likelihood")
    if value is not None and np.isfinite(value):
        out["validation_reconstruction_log_likelihood"] = {"step": 0, "value": float(value)}
    out["n_factors"] = {"step": 0, "value": float(model.n_latent)}
    if len(effects):
        significant = effects[effects["significant"].astype(bool)]
        out["n_significant_effects"] = {"step": 0, "value": float(len(significant))}
        moved = significant[PERTURBATION].nunique()
        out["fraction_perturbations_moving_a_factor"] = {
            "step": 0,
            "value": float(moved) / float(effects[PERTURBATION].nunique()),
        }
    return out
