"""Figures of the contrastive_model pipeline."""

from __future__ import annotations

from typing import Any

import anndata as ad
import matplotlib

matplotlib.use("Agg")  # figures are written by the catalog, never shown

import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
from matplotlib.figure import Figure

from perturbscope.blocks import BlockScreen
from perturbscope.models.model.contrastive import UMAP_KEYS
from perturbscope.parameters import required
from perturbscope.schema import CELL_GROUP, PERTURBATION, PHASE, ScreenSchema

__all__ = ["plot_embeddings"]


def plot_embeddings(
    embedded: ad.AnnData | BlockScreen, params: dict[str, Any], schema_params: dict[str, Any]
) -> Figure:
    """UMAPs of the salient and background spaces, coloured by program / perturbation and phase
    (``params``: ``contrastive_model.evaluation``, whose ``annotation_key`` names the program column)."""
    missing = [key for key in UMAP_KEYS.values() if key not in embedded.obsm]
    if missing:  # contrastive_model.embedding.umap: false
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "No UMAPs: contrastive_model.embedding.umap is false.\nSet it to true to compute them.",
            ha="center",
            va="center",
        )
        return fig
    annotation = required(params, "annotation_key", "contrastive_model.evaluation")
    annotation = annotation or ScreenSchema.from_params(schema_params).program_key
    colours = []
    for key in (annotation, CELL_GROUP, PHASE):
        if key and key in embedded.obs and embedded.obs[key].astype(str).nunique() > 1 and key not in colours:
            colours.append(key)
    if not colours:
        colours = [PERTURBATION] if PERTURBATION in embedded.obs else [None]
    # the cells with UMAP coordinates (all, or the umap_max_cells drawn on a large screen)
    drawn = np.isfinite(np.asarray(embedded.obsm[UMAP_KEYS["salient"]])).all(axis=1)
    plot = ad.AnnData(
        obs=embedded.obs.loc[drawn].copy(),
        obsm={key: np.asarray(embedded.obsm[key])[drawn] for key in UMAP_KEYS.values()},
    )
    for key in colours:
        if key is not None:
            plot.obs[key] = plot.obs[key].astype(str).astype("category")
    fig, axes = plt.subplots(2, len(colours), figsize=(4.8 * len(colours), 8.5), squeeze=False)
    for row, space in enumerate(("salient", "background")):
        plot.obsm[f"X_umap{space}"] = plot.obsm[UMAP_KEYS[space]]
        for col, key in enumerate(colours):
            ax = axes[row, col]
            sc.pl.embedding(
                plot,
                basis=f"umap{space}",
                color=key,
                ax=ax,
                show=False,
                frameon=False,
                size=float(np.clip(120000 / max(plot.n_obs, 1), 3, 30)),
                legend_fontsize=7,
            )
            ax.set_title(f"{space} — {key or ''}")
    fig.tight_layout()
    return fig
