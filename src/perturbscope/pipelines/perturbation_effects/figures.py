"""Figures of the perturbation_effects pipeline."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written by the catalog, never shown

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perturbscope.schema import PERTURBATION

__all__ = ["effect_tests_figure", "interactions_figure", "knockdown_figure", "perturbation_map_figures"]


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


CALL_COLOURS = {
    "knocked_down": "#1e8449",
    "activated": "#1e8449",
    "no knockdown": "#c0392b",
    "no activation": "#c0392b",
    "not measurable": "#aaaaaa",
}


def knockdown_figure(table: pd.DataFrame, max_shown: int = 80, dpi: int = 110) -> Figure:
    """Remaining expression of each guide's own target (guide's cells / controls), guides grouped by target,
    coloured by the call; ``max_shown`` guides at most (the measurable ones first)."""
    shown = table.assign(_measured=table["remaining"].notna()).sort_values(
        ["_measured", "target", "guide"], ascending=[False, True, True]
    )
    shown = shown.head(int(max_shown)).sort_values(["target", "guide"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(shown) + 2.5), 3.8), dpi=int(dpi))
    if shown.empty:
        ax.text(0.5, 0.5, "no guide with a measurable target", ha="center", va="center")
        ax.set_axis_off()
        return fig
    x = np.arange(len(shown))
    remaining = shown["remaining"].fillna(0.0).to_numpy()
    colours = [CALL_COLOURS.get(str(call), "#aaaaaa") for call in shown["call"]]
    ax.bar(x, remaining, color=colours)
    ax.axhline(1.0, color="#555555", lw=0.8, ls="--")
    labels = [
        f"{g} ({t})" if str(g) != str(t) else str(g) for g, t in zip(shown["guide"], shown["target"], strict=True)
    ]
    ax.set_xticks(x, labels, rotation=90, fontsize=6)
    ax.set_ylabel("target expression left\n(guide's cells / controls)")
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colour) for call, colour in CALL_COLOURS.items() if call in set(shown["call"])
    ]
    ax.legend(handles, [c for c in CALL_COLOURS if c in set(shown["call"])], fontsize=7, frameon=False)
    ax.set_title("Did the guides work? each guide's own target, relative to the controls", fontsize=9)
    fig.tight_layout()
    return fig


def perturbation_map_figures(
    profiles: dict[str, pd.DataFrame], clusters: pd.DataFrame, profile: str = "pseudobulk", dpi: int = 110
) -> tuple[Figure, Figure]:
    """The similarity of the perturbations' ``profile`` profiles as a heatmap ordered by cluster, and a 2-D map
    (metric MDS of ``1 - correlation``) coloured by cluster."""
    from sklearn.manifold import MDS

    from .profiles import NO_EFFECT, _correlation

    table = clusters[clusters["profile"] == profile].set_index("perturbation")
    names = [n for n in profiles.get(profile, pd.DataFrame()).index if n in table.index]
    heat, ax = plt.subplots(figsize=(max(4.5, 0.22 * len(names) + 2), max(4.0, 0.22 * len(names) + 1.5)), dpi=int(dpi))
    scatter, ax2 = plt.subplots(figsize=(5.5, 4.5), dpi=int(dpi))
    if len(names) < 2:
        for a in (ax, ax2):
            a.text(0.5, 0.5, "fewer than two perturbations with a profile", ha="center", va="center")
            a.set_axis_off()
        return heat, scatter
    order = sorted(names, key=lambda n: (table.loc[n, "cluster"] == NO_EFFECT, str(table.loc[n, "cluster"]), n))
    corr = _correlation(profiles[profile].loc[order])
    image = ax.imshow(corr.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(order)), order, rotation=90, fontsize=6)
    ax.set_yticks(range(len(order)), [f"{n} [{table.loc[n, 'cluster']}]" for n in order], fontsize=6)
    heat.colorbar(image, ax=ax, shrink=0.6, label="correlation of profiles")
    ax.set_title(f"Perturbations by similarity ({profile} profiles), grouped by cluster", fontsize=9)
    heat.tight_layout()
    distance = np.clip(1.0 - corr.to_numpy(), 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    coords = MDS(n_components=2, dissimilarity="precomputed", random_state=0, n_init=4).fit_transform(distance)
    cluster_names = sorted({str(table.loc[n, "cluster"]) for n in order})
    colours = plt.get_cmap("tab10")
    for i, cluster in enumerate(cluster_names):
        pick = [j for j, n in enumerate(order) if str(table.loc[n, "cluster"]) == cluster]
        colour = "#aaaaaa" if cluster == NO_EFFECT else colours(i % 10)
        ax2.scatter(coords[pick, 0], coords[pick, 1], s=28, color=colour, label=cluster)
        for j in pick:
            ax2.annotate(order[j], coords[j], fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax2.legend(fontsize=7, frameon=False)
    ax2.set_xticks([])
    ax2.set_yticks([])
    ax2.set_title(f"Map of perturbations ({profile} profiles, MDS of 1 - correlation)", fontsize=9)
    scatter.tight_layout()
    return heat, scatter


INTERACTION_COLOURS = {
    "additive": "#7f8c8d",
    "synergy": "#c0392b",
    "buffering": "#2471a3",
    "epistasis": "#8e44ad",
    "neomorphic": "#d68910",
}


def interactions_figure(table: pd.DataFrame, synergy: float = 1.3, buffering: float = 0.75, dpi: int = 110) -> Figure:
    """Norman et al.'s view of the doubles: magnitude of the fitted coefficients against the fit of the model,
    coloured by class, with the bootstrap intervals."""
    fig, ax = plt.subplots(figsize=(5.8, 4.4), dpi=int(dpi))
    table = table[table["magnitude"].notna()] if "magnitude" in table else table  # the doubles that were fitted
    if table.empty:
        ax.text(0.5, 0.5, "no double with both singles measured", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for kind, group in table.groupby("interaction"):
        colour = INTERACTION_COLOURS.get(str(kind), "#333333")
        if {"magnitude_low", "magnitude_high"} <= set(group.columns) and group["magnitude_low"].notna().any():
            ax.errorbar(
                group["magnitude"],
                group["fit"],
                xerr=[group["magnitude"] - group["magnitude_low"], group["magnitude_high"] - group["magnitude"]],
                fmt="none",
                ecolor=colour,
                alpha=0.4,
                lw=0.8,
            )
        ax.scatter(group["magnitude"], group["fit"], color=colour, s=30, label=str(kind))
        for row in group.itertuples(index=False):
            ax.annotate(row.double, (row.magnitude, row.fit), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for x in (1.0, synergy, buffering):
        ax.axvline(x, color="#999999", lw=0.7, ls="--" if x != 1.0 else "-")
    ax.set_xlabel("magnitude  sqrt(c_A² + c_B²) / sqrt(2)   (1 = additive)")
    ax.set_ylabel("model fit  corr(c_A Δ_A + c_B Δ_B, Δ_AB)")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("Genetic interactions of the doubles (Norman et al. 2019)", fontsize=9)
    fig.tight_layout()
    return fig
