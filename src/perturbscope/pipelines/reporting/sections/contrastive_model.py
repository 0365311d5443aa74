"""Report section of ``contrastive_model``: the contrastive story and the training curves.

The story figure (the reference tutorial's): UMAPs of the perturbed cells on the
log-normalised data (PCA) and on contrastiveVI's salient space, side by side,
coloured by cell-cycle phase and by gene program / perturbation. Confounders such
as the cell cycle that structure the PCA view should vanish from the salient one,
where cells group by what the perturbation did.

``contrastive_story_umap`` (a table: one row per perturbed cell, both UMAPs and the
labels) is computed once and saved, so the notebook redraws the figure instantly.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from kedro.pipeline import Node, Pipeline

from perturbscope.models.model.contrastive import SALIENT_KEY
from perturbscope.pipelines.reporting.figures import (
    MUTED_LABELS,
    compute_umap,
    plot_embedding_grid,
    plot_training_curves,
    top_categories,
)
from perturbscope.pipelines.reporting.report import FigureSpec, ReportTable, make_section
from perturbscope.pipelines.reporting.sections.base import Section, section_result
from perturbscope.schema import IS_CONTROL, PERTURBATION, PHASE, ScreenSchema

PIPELINE = "contrastive_model"
FIGURES = ("contrastive_story", "contrastive_training_curves")

# Catalog outputs of the contrastive_model pipeline read here.
EMBEDDING = "contrastive_embeddings"
"""The cells' annotations and embeddings, the salient posterior means in ``obsm[SALIENT_KEY]``."""
HISTORY = "contrastive_training_history"
"""``History.to_frame()`` of the training run."""
METRICS = "contrastive_evaluation"
"""Program separation and confounder leakage per space (``metric, key, space, value, chance_level``)."""

ESCAPE = "contrastive_escape"
"""Per perturbation: cells, cells called perturbed, the escape mixture's fit (empty without it)."""

UMAP_TABLE = "contrastive_story_umap"
"""Reporting's own output: the UMAP coordinates of the story figure."""
REPRESENTATIONS = {"pca": "log-normalised expression (PCA)", "salient": "contrastiveVI salient space"}


class ContrastiveReportError(ValueError):
    """The contrastive outputs cannot be reported (the message names what is missing)."""


def _labels(obs: pd.DataFrame, program_key: str | None, max_categories: int) -> pd.DataFrame:
    out = pd.DataFrame(index=obs.index)
    out[PERTURBATION] = obs[PERTURBATION].astype(str)
    out[PHASE] = obs[PHASE].astype(str) if PHASE in obs else "unknown"
    if program_key and program_key in obs:
        out["program"] = obs[program_key].astype(str)
    out["perturbation_top"] = top_categories(out[PERTURBATION], max_categories)
    return out


def story_umaps(
    processed: ad.AnnData, embedding: ad.AnnData, params: dict[str, Any], schema: dict[str, Any], seed: int = 0
) -> pd.DataFrame:
    """UMAPs of the perturbed cells on log-normalised PCA and on the salient space.

    Cells are the targeted (non-control) cells of ``processed``, at most
    ``max_cells`` (a fixed random subset drawn with ``seed``). Returns one row per cell:
    ``cell``, ``perturbation``, ``phase``, ``program`` (when annotated),
    ``perturbation_top``, ``pca_umap_1/2`` and ``salient_umap_1/2``.
    """
    if SALIENT_KEY not in embedding.obsm:
        raise ContrastiveReportError(
            f"'{EMBEDDING}' has no obsm['{SALIENT_KEY}'] (obsm keys: {list(embedding.obsm)}); the "
            "contrastive_model pipeline stores the salient posterior means there."
        )
    target = processed.obs_names[~processed.obs[IS_CONTROL].to_numpy(dtype=bool)]
    missing = target.difference(embedding.obs_names)
    if len(missing):
        raise ContrastiveReportError(
            f"{len(missing)} perturbed cell(s) of processed_screen are not in '{EMBEDDING}' (e.g. "
            f"{list(missing[:3])}): the embedding comes from another version of the screen. Rerun "
            "contrastive_model."
        )
    rng = np.random.default_rng(int(seed))
    max_cells = int(params["max_cells"])
    if len(target) > max_cells:
        target = target[np.sort(rng.choice(len(target), size=max_cells, replace=False))]
    x = processed[target].X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    salient = np.asarray(embedding[target].obsm[SALIENT_KEY], dtype=np.float32)
    common = {"n_neighbors": int(params["n_neighbors"]), "min_dist": float(params["min_dist"]), "seed": int(seed)}
    pca_umap = compute_umap(x, n_pcs=int(params["n_pcs"]), **common)
    salient_umap = compute_umap(salient, **common)
    table = _labels(
        processed.obs.loc[target], ScreenSchema.from_params(schema).program_key, int(params["max_categories"])
    )
    table[["pca_umap_1", "pca_umap_2"]] = pca_umap
    table[["salient_umap_1", "salient_umap_2"]] = salient_umap
    return table.rename_axis("cell").reset_index()


def story_figure(umap: pd.DataFrame, dpi: int, point_size: float = 6.0) -> FigureSpec:
    """The 2-row grid (PCA, salient) x (phase, program, perturbation) of :func:`story_umaps`."""
    colourings: dict[str, pd.Series] = {}
    notes = []
    known_phases = set(umap[PHASE].astype(str)) - {"unknown"}
    if known_phases:
        colourings["cell-cycle phase"] = umap[PHASE]
    else:
        notes.append("every cell's phase is 'unknown' (the screen lacks the Tirosh genes), so phase is not shown")
    if "program" in umap and (~umap["program"].astype(str).str.lower().isin(MUTED_LABELS)).any():
        colourings["gene program"] = umap["program"]
    colourings[PERTURBATION] = umap["perturbation_top"]
    embeddings = {label: umap[[f"{rep}_umap_1", f"{rep}_umap_2"]].to_numpy() for rep, label in REPRESENTATIONS.items()}
    fig = plot_embedding_grid(embeddings, colourings, dpi=dpi, point_size=point_size)
    caption = (
        f"UMAPs of {len(umap):,} perturbed cells: top row on the log-normalised data (PCA), bottom row "
        "on the salient space, coloured by " + ", ".join(colourings) + ". Structure shared with controls "
        "(e.g. the cell cycle) should vanish from the salient space, where cells group by the "
        "perturbation's effect."
    )
    if notes:
        caption += " Note: " + "; ".join(notes) + "."
    return FigureSpec(fig, "The contrastive story: log-normalised PCA vs salient space", caption)


def _named_by_cells(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Rows scored over other cells than every perturbed one carry it in the metric's name,
    e.g. ``ari (called perturbed)``."""
    if "cells" not in evaluation or "metric" not in evaluation:
        return evaluation
    cells = evaluation["cells"].astype(str)
    other = evaluation["cells"].notna() & ~cells.isin(["perturbed", "targets", "nan"])
    out = evaluation.copy()
    out.loc[other, "metric"] = out.loc[other, "metric"] + " (" + cells[other].str.replace("_", " ") + ")"
    return out


def evaluation_table(evaluation: pd.DataFrame) -> pd.DataFrame:
    """The evaluation as one row per (metric, key) and one column per space, plus chance level."""
    needed = {"metric", "key", "space", "value"}
    if not needed <= set(evaluation.columns):
        return evaluation
    scored = _named_by_cells(evaluation).dropna(subset=["space", "value"])
    table = scored.pivot_table(index=["metric", "key"], columns="space", values="value", aggfunc="first", sort=False)
    spaces = [s for s in ("salient", "background", "pca") if s in table.columns]
    table = table[spaces + [c for c in table.columns if c not in spaces]]
    if "chance_level" in scored:
        table["chance level"] = scored.groupby(["metric", "key"], sort=False)["chance_level"].first()
    return table.round(3).reset_index()


def evaluation_facts(evaluation: pd.DataFrame) -> dict[str, str]:
    """Headline: program kNN accuracy per space (salient vs PCA), with chance level."""
    if not {"metric", "space", "value"} <= set(evaluation.columns):
        return {}
    evaluation = _named_by_cells(evaluation)
    knn = evaluation[evaluation["metric"] == "knn_accuracy"].dropna(subset=["value"])
    facts = {}
    auroc = evaluation[evaluation["metric"] == "perturbed_probability_auroc"].dropna(subset=["value"])
    if len(auroc):
        facts["escape AUROC (true responders)"] = f"{auroc['value'].iloc[0]:.3f}"
    for key, rows in knn.groupby("key", sort=False):
        values = rows.set_index("space")["value"]
        shown = ", ".join(
            f"{space} {values[space]:.2f}" for space in ("salient", "background", "pca") if space in values
        )
        chance = rows["chance_level"].dropna() if "chance_level" in rows else pd.Series(dtype=float)
        if len(chance):
            shown += f" (chance {chance.iloc[0]:.2f})"
        facts[f"{key} kNN accuracy"] = shown
    return facts


def report_contrastive_model(
    umap: pd.DataFrame,
    history: pd.DataFrame,
    evaluation: pd.DataFrame,
    params: dict[str, Any],
    escape: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The contrastive_model section: the story figure, training curves, evaluation and escape tables."""
    dpi = int(params["figure_dpi"])
    figures = {
        "contrastive_story": story_figure(umap, dpi, float(params["contrastive_model"]["point_size"])),
        "contrastive_training_curves": FigureSpec(
            plot_training_curves({"contrastiveVI": history}, dpi=dpi),
            "Training curves: contrastiveVI",
            "Train and validation loss per epoch; the dotted line marks the epoch whose weights were kept.",
        ),
    }
    facts: dict[str, Any] = {
        "perturbed cells in the UMAPs": len(umap),
        "epochs trained": len(history),
        **evaluation_facts(evaluation),
    }
    tables = [
        ReportTable(
            "contrastive_evaluation",
            "Evaluation per space",
            evaluation_table(evaluation),
            "Program separation (ARI, NMI, silhouette, kNN accuracy over annotated perturbed cells) "
            "and confounder leakage (kNN accuracy of e.g. the phase; lower is better) in the salient "
            "space, the background space and the PCA baseline.",
        )
    ]
    if escape is not None and len(escape):
        facts["target cells called perturbed"] = (
            f"{int(escape['n_called_perturbed'].sum())} of {int(escape['n_cells'].sum())}"
        )
        facts["perturbations calling no cell perturbed"] = int((escape["n_called_perturbed"] == 0).sum())
        tables.append(
            ReportTable(
                ESCAPE,
                "Escapers per perturbation",
                escape.sort_values("fraction_called_perturbed", kind="stable").reset_index(drop=True),
                "Per perturbation, the cells called perturbed (probability > 0.5) by the escape mixture on the "
                "salient code; the others look like controls (escapers). estimated_perturbed_share: the "
                "mixture's weight; separation: its two components' distance in null sds; "
                "control_false_call_rate: held-out controls it would call perturbed. Lowest share first.",
            )
        )
    notes = []
    if "note" in evaluation:
        notes = [f"{row.metric} ({row.key}): {row.note}" for row in evaluation.dropna(subset=["note"]).itertuples()]
    section = make_section(
        PIPELINE,
        "Contrastive model (contrastiveVI)",
        intro=(
            "contrastiveVI splits each perturbed cell into a background latent shared with the "
            "controls and a salient latent that holds only what the perturbation changed."
        ),
        facts=facts,
        tables=tables,
        figures=figures,
        notes=notes,
    )
    return section_result(section, figures)


def create_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(
                story_umaps,
                inputs=[
                    "processed_screen",
                    EMBEDDING,
                    "params:reporting.contrastive_model",
                    "params:schema",
                    "params:seed",
                ],
                outputs=UMAP_TABLE,
                name="compute_contrastive_story_umaps",
            ),
            Node(
                report_contrastive_model,
                inputs=[UMAP_TABLE, HISTORY, METRICS, "params:reporting", ESCAPE],
                outputs=SECTION.node_outputs(),
                name="report_contrastive_model",
            ),
        ]
    )


SECTION = Section(pipeline=PIPELINE, figures=FIGURES, create_pipeline=create_pipeline)
