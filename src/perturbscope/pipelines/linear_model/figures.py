"""Figures of the linear_model pipeline."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written by the catalog, never shown

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perturbscope.schema import PERTURBATION

__all__ = ["plot_factor_effects"]


def plot_factor_effects(effects: pd.DataFrame, max_perturbations_plotted: int = 60) -> Figure:
    """Heatmap of standardised effects (perturbations x factors, the ``max_perturbations_plotted`` strongest);
    dots mark significant cells."""
    max_rows = int(max_perturbations_plotted)
    if effects is None or len(effects) == 0:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No perturbations: no factor x perturbation effects", ha="center", va="center")
        return fig
    pivot = effects.pivot(index=PERTURBATION, columns="factor", values="standardised_effect")
    factors = sorted(pivot.columns, key=lambda f: int(str(f).split("_")[-1]) if str(f).split("_")[-1].isdigit() else 0)
    pivot = pivot[factors]
    strongest = pivot.abs().max(axis=1).sort_values(ascending=False)
    pivot = pivot.loc[strongest.index[:max_rows]]
    sig = effects.pivot(index=PERTURBATION, columns="factor", values="significant").reindex(
        index=pivot.index, columns=pivot.columns
    )
    values = pivot.to_numpy(dtype=float)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    height = max(3.0, 0.25 * len(pivot) + 1.5)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(factors), height))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    rows, cols = np.nonzero(sig.fillna(False).to_numpy(dtype=bool))
    ax.scatter(cols, rows, s=6, c="black", marker="o")
    ax.set_xticks(range(len(factors)), factors, rotation=90)
    ax.set_yticks(range(len(pivot)), pivot.index)
    ax.set_title("Factor shift vs controls (control SD; dot = significant)")
    fig.colorbar(image, ax=ax, shrink=0.6, label="standardised effect")
    fig.tight_layout()
    return fig
