"""Report section of ``linear_model`` (LDVAE): the top genes' loadings per factor, the
factor x perturbation effects, the strongest effects in words, and the training curves."""

from __future__ import annotations

from typing import Any

import pandas as pd
from kedro.pipeline import Node, Pipeline

from perturbscope.models.model.linear import loadings_matrix
from perturbscope.pipelines.reporting.figures import plot_heatmap, plot_training_curves
from perturbscope.pipelines.reporting.report import FigureSpec, ReportTable, make_section
from perturbscope.pipelines.reporting.sections.base import Section, section_result
from perturbscope.schema import PERTURBATION

PIPELINE = "linear_model"
FIGURES = ("ldvae_loadings", "ldvae_factor_effects", "ldvae_training_curves")

# Catalog outputs of the linear_model pipeline read here.
LOADINGS = "linear_loadings"
"""Genes x factors: a ``gene`` column, then ``factor_1 ... factor_K``."""
EFFECTS = "linear_factor_effects"
"""Long table, one row per perturbation and factor (``effect``, ``standardised_effect``,
``q_value``, ``significant``, ``genes_up``/``genes_down``, ``reading``...)."""
HISTORY = "linear_training_history"
HEATMAP = "linear_factor_effects_heatmap"
"""The pipeline's factor x perturbation heatmap (PNG)."""

READING_COLUMNS = [PERTURBATION, "factor", "standardised_effect", "q_value", "program", "reading"]


def top_gene_loadings(loadings: pd.DataFrame, n_top: int) -> pd.DataFrame:
    """Loadings of the union of each factor's ``n_top`` genes by |loading|, grouped by factor.

    Rows are ordered factor by factor (each factor's top genes, strongest first; a
    gene already listed is not repeated); columns are the factors.
    """
    matrix = loadings_matrix(loadings)
    order: list[str] = []
    for factor in matrix.columns:
        ranked = matrix[factor].abs().sort_values(ascending=False).index[:n_top]
        order.extend(g for g in ranked if g not in order)
    return matrix.loc[order]


def loadings_figure(loadings: pd.DataFrame, n_top: int, dpi: int) -> FigureSpec:
    """Heatmap of the top genes' loadings per factor (:func:`top_gene_loadings`), genes as rows."""
    top = top_gene_loadings(loadings, n_top)
    return FigureSpec(
        plot_heatmap(top, dpi=dpi, title="LDVAE loadings: top genes per factor", cbar_label="loading"),
        "LDVAE: top genes' loadings per factor",
        f"The {n_top} genes with the largest |loading| of each factor (rows, grouped factor by factor, "
        "strongest first). A loading is the change of the gene's natural-log expression per SD of the factor.",
    )


def effects_figure(heatmap: bytes) -> FigureSpec:
    """The linear_model pipeline's own factor x perturbation heatmap (its PNG, read through the catalog)."""
    return FigureSpec(
        heatmap,
        "LDVAE: factor x perturbation effects",
        "How far each perturbation's cells sit from the controls on each factor, in control SDs "
        "(dots: significant after Benjamini-Hochberg). A row is a perturbation, a column a factor.",
    )


def strongest_effects(effects: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` strongest significant effects (by |standardised effect|), in words."""
    if effects.empty:
        return pd.DataFrame(columns=READING_COLUMNS)
    significant = effects[effects["significant"].astype(str).str.lower().isin(["true", "1"])]
    ranked = significant.reindex(significant["standardised_effect"].abs().sort_values(ascending=False).index)
    columns = [c for c in READING_COLUMNS if c in ranked.columns]
    return ranked[columns].head(n).round({"standardised_effect": 2}).reset_index(drop=True)


def effect_facts(effects: pd.DataFrame) -> dict[str, Any]:
    if effects.empty:
        return {"factor x perturbation effects": "none (no perturbations or no controls)"}
    significant = effects["significant"].astype(str).str.lower().isin(["true", "1"])
    n_perturbations = effects[PERTURBATION].nunique()
    moving = effects.loc[significant, PERTURBATION].nunique()
    return {
        "perturbations tested": n_perturbations,
        "significant perturbation x factor effects": int(significant.sum()),
        "perturbations moving at least one factor": f"{moving} of {n_perturbations}",
    }


def report_linear_model(
    loadings: pd.DataFrame,
    effects: pd.DataFrame,
    history: pd.DataFrame,
    heatmap: bytes,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The linear_model section: loadings and effect heatmaps, training curves, strongest effects."""
    dpi = int(params["figure_dpi"])
    knobs = params["linear_model"]
    n_top = int(knobs["top_genes_per_factor"])
    figures = {
        "ldvae_loadings": loadings_figure(loadings, n_top, dpi),
        "ldvae_factor_effects": effects_figure(heatmap),
        "ldvae_training_curves": FigureSpec(
            plot_training_curves({"LDVAE": history}, dpi=dpi),
            "Training curves: LDVAE",
            "Train and validation loss per epoch; the dotted line marks the epoch whose weights were kept.",
        ),
    }
    n_genes, n_factors = loadings_matrix(loadings).shape
    facts = {"factors": n_factors, "genes": n_genes, "epochs trained": len(history), **effect_facts(effects)}
    section = make_section(
        PIPELINE,
        "Linear model (LDVAE)",
        intro=(
            "LDVAE: a VAE whose linear decoder makes each latent factor a gene module; its loadings "
            "name the genes a factor moves, and each perturbation is read as a shift along the factors."
        ),
        facts=facts,
        tables=[
            ReportTable(
                "ldvae_strongest_effects",
                "Strongest factor shifts, in words",
                strongest_effects(effects, int(knobs["strongest_effects"])),
                "Significant perturbation x factor effects, strongest first (standardised effect in "
                "control SDs; q: BH-adjusted p-value).",
            ),
        ],
        figures=figures,
    )
    return section_result(section, figures)


def create_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(
                report_linear_model,
                inputs=[LOADINGS, EFFECTS, HISTORY, HEATMAP, "params:reporting"],
                outputs=SECTION.node_outputs(),
                name="report_linear_model",
            )
        ]
    )


SECTION = Section(pipeline=PIPELINE, figures=FIGURES, create_pipeline=create_pipeline)
