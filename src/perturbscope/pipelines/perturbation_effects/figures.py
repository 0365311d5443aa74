"""Figures of the perturbation_effects pipeline."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written by the catalog, never shown

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perturbscope.schema import PERTURBATION

__all__ = ["effect_tests_figure"]


def effect_tests_figure(table: pd.DataFrame, max_shown: int = 60, alpha: float = 0.05, dpi: int = 110) -> Figure:
    """Energy distance to the controls per perturbation, the ``max_shown`` largest first; red = significant
    (BH q < ``alpha``, as the test called it)."""
    shown = table.sort_values("energy_distance", ascending=False).head(int(max_shown))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(shown) + 2), 3.6), dpi=int(dpi))
    if shown.empty:
        ax.text(0.5, 0.5, "no perturbation tested", ha="center", va="center")
        ax.set_axis_off()
        return fig
    significant = shown["significant"].astype(bool).to_numpy()
    x = np.arange(len(shown))
    ax.bar(x, shown["energy_distance"], color=np.where(significant, "#c0392b", "#bbbbbb"))
    ax.set_xticks(x, shown[PERTURBATION].astype(str), rotation=90, fontsize=7)
    ax.set_ylabel(f"energy distance ({shown['distance'].iloc[0]}, PCA)")
    ax.set_title(f"Did it work? red: differs from controls (permutation test, BH q < {alpha})", fontsize=9)
    fig.tight_layout()
    return fig
