"""Figures of the perturbation_prediction pipeline (matplotlib, object-oriented: no pyplot state).

* :func:`perturbation_figure` -- per test perturbation, three panels:
  predicted vs true deltas (vs control) with Pearson r; top-K Jaccard
  ``J(K)`` for every method; PCA (shared space) of true vs predicted cells.
* :func:`summary_figure` -- one panel per score and split: every
  perturbation's score per method, with mean ± sd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perturbscope.names import file_names
from perturbscope.schema import PERTURBATION

from .evaluation import dense as _dense
from .evaluation import mean_of as _mean
from .metrics import pearson_delta
from .splits import reference_mask

__all__ = ["METHOD_LABELS", "METHOD_COLORS", "perturbation_figure", "perturbation_figures", "summary_figure"]

METHOD_LABELS = {
    "cvae_prior": "cVAE Mode A (prior)",
    "cvae_controls": "cVAE Mode B (controls)",
    "no_change": "no change",
    "perturbed_mean": "perturbed mean",
    "same_perturbation": "same perturbation",
    "additive": "additive",
}
METHOD_COLORS = {
    "cvae_prior": "#1f77b4",
    "cvae_controls": "#d62728",
    "no_change": "#7f7f7f",
    "perturbed_mean": "#bcbd22",
    "same_perturbation": "#9467bd",
    "additive": "#2ca02c",
}
SCORE_LABELS = {
    "pearson_delta": "Pearson Δ vs control",
    "pearson_delta_top_de": "Pearson Δ, top DE genes",
    "pearson_delta_vs_perturbed_mean": "Pearson Δ vs perturbed mean",
    "jaccard_top50": "Jaccard, top-50 changed genes",
    "mse": "MSE of means",
    "direction_accuracy_top_de": "direction accuracy, top DE",
    "energy_distance": "energy distance (PCA)",
    "l2_top_expressed": "L2, top-1000 expressed genes",
}
DEFAULT_SUMMARY_SCORES = (
    "pearson_delta",
    "pearson_delta_top_de",
    "pearson_delta_vs_perturbed_mean",
    "jaccard_top50",
    "mse",
    "l2_top_expressed",
    "direction_accuracy_top_de",
    "energy_distance",
)
"""The scores of the summary panel, in order."""


def perturbation_figure(
    label: str,
    true_cells: Any,
    control_cells: Any,
    predicted: dict[str, Any],
    metrics: pd.DataFrame,
    pca: dict[str, np.ndarray],
    primary: str = "cvae_controls",
    top_k: tuple[int, ...] = (25, 50, 100),
    max_points: int = 300,
    seed: int = 0,
) -> Figure:
    """The three-panel figure of one test perturbation.

    Parameters
    ----------
    label
        The perturbation.
    true_cells, control_cells
        Log-normalised true test cells and the reference control cells
        ``(n, G)`` (their mean is the reference of the deltas).
    predicted
        ``method -> predicted cells (n, G)``.
    metrics
        The rows of the metrics table for this perturbation.
    pca
        The shared PCA space (``mean``, ``components``).
    primary
        Method shown in the scatter and PCA panels (plus the strongest
        available baseline in the scatter).
    """
    rng = np.random.default_rng(seed)
    c = _mean(control_cells)
    t = _mean(true_cells)
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax_scatter, ax_j, ax_pca = fig.subplots(1, 3)

    # 1. predicted vs true deltas
    compare = next((b for b in ("additive", "same_perturbation", "perturbed_mean") if b in predicted), None)
    shown = [m for m in (compare, primary) if m in predicted]
    lim = [np.min(t - c), np.max(t - c)]
    for method in shown:
        dp = _mean(predicted[method]) - c
        r = pearson_delta(_mean(predicted[method]), t, c)
        ax_scatter.scatter(
            t - c,
            dp,
            s=10,
            alpha=0.7,
            color=METHOD_COLORS.get(method, "k"),
            label=f"{METHOD_LABELS.get(method, method)} (r = {r:.2f})",
        )
        lim = [min(lim[0], dp.min()), max(lim[1], dp.max())]
    ax_scatter.plot(lim, lim, color="0.6", lw=0.8, ls="--")
    ax_scatter.axhline(0, color="0.85", lw=0.6)
    ax_scatter.axvline(0, color="0.85", lw=0.6)
    ax_scatter.set_xlabel("true Δ vs reference controls (log-normalised)")
    ax_scatter.set_ylabel("predicted Δ vs reference controls")
    ax_scatter.set_title(f"{label}: deltas, all genes")
    ax_scatter.legend(fontsize=8, loc="upper left")

    # 2. top-K Jaccard per method
    methods = [m for m in METHOD_LABELS if m in set(metrics["method"])]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        row = metrics.loc[metrics["method"] == method].iloc[0]
        values = [row.get(f"jaccard_top{k}", np.nan) for k in top_k]
        ax_j.bar(
            np.arange(len(top_k)) + (i - (len(methods) - 1) / 2) * width,
            np.nan_to_num(values),
            width,
            color=METHOD_COLORS.get(method, "k"),
            label=METHOD_LABELS.get(method, method),
        )
    ax_j.set_xticks(np.arange(len(top_k)), [f"K = {k}" for k in top_k])
    ax_j.set_ylim(0, 1)
    ax_j.set_ylabel("Jaccard of top-K changed genes")
    ax_j.set_title("J(K) (no bar: undefined)")
    ax_j.legend(fontsize=7, ncol=2)

    # 3. PCA of true vs predicted cells
    def pcs(x: Any) -> np.ndarray:
        x = _dense(x)
        if x.shape[0] > max_points:
            x = x[np.sort(rng.choice(x.shape[0], max_points, replace=False))]
        return (x - pca["mean"][None, :]) @ pca["components"][:2].T

    ctrl = pcs(control_cells)
    ax_pca.scatter(ctrl[:, 0], ctrl[:, 1], s=6, color="0.8", label="reference control cells")
    if primary in predicted:
        pr = pcs(predicted[primary])
        ax_pca.scatter(
            pr[:, 0],
            pr[:, 1],
            s=8,
            alpha=0.6,
            color=METHOD_COLORS.get(primary, "r"),
            label=f"predicted: {METHOD_LABELS.get(primary, primary)}",
        )
    tr = pcs(true_cells)
    ax_pca.scatter(tr[:, 0], tr[:, 1], s=10, color="k", label="true held-out cells")
    ax_pca.set_xlabel("PC1")
    ax_pca.set_ylabel("PC2")
    ax_pca.set_title("shared PCA: true vs predicted cells")
    ax_pca.legend(fontsize=8)
    return fig


def perturbation_figures(
    adata: ad.AnnData,
    split: pd.DataFrame,
    cvae_predictions: ad.AnnData,
    baseline_predictions: ad.AnnData,
    metrics: pd.DataFrame,
    pca: dict[str, np.ndarray],
    seed: int = 0,
    *,
    method: str = "cvae_prior",
    max_figures: int = 12,
    top_k: Sequence[int] = (25, 50, 100),
) -> tuple[dict[str, Figure], pd.DataFrame]:
    """:func:`perturbation_figure` for up to ``max_figures`` test perturbations of a split, with ``method``'s
    predicted cells in the scatter and PCA panels (``cvae_prior``, ``cvae_controls`` or a baseline).

    The perturbations with the largest true effect (norm of the mean delta)
    are drawn; files are named by :func:`perturbscope.names.file_names` (the label where it is a safe file
    name, else a slug and a short hash; the label itself is in the figure's title). Returns the figures by
    file name and a table mapping each ``file`` to its ``perturbation``.
    """
    test = (split["role"] == "test").to_numpy()
    labels_arr = split[PERTURBATION].to_numpy()
    controls = adata.X[reference_mask(split)]
    c = _mean(controls)
    effect = {}
    for label in sorted(set(labels_arr[test])):
        effect[label] = float(np.linalg.norm(_mean(adata.X[test & (labels_arr == label)]) - c))
    chosen = sorted(effect, key=lambda p: -effect[p])[: int(max_figures)]
    top_k = tuple(int(k) for k in top_k)
    out: dict[str, Figure] = {}
    names = file_names(sorted(chosen), ".png")
    for label in sorted(chosen):
        predicted = {}
        for preds in (cvae_predictions, baseline_predictions):
            meth = preds.obs["method"].astype(str).to_numpy()
            lab = preds.obs[PERTURBATION].astype(str).to_numpy()
            for method in sorted(set(meth[lab == label])):
                predicted[method] = preds.X[(meth == method) & (lab == label)]
        fig = perturbation_figure(
            label,
            adata.X[test & (labels_arr == label)],
            controls,
            predicted,
            metrics.loc[metrics[PERTURBATION] == label],
            pca,
            primary=str(method),
            top_k=top_k,
            seed=int(seed),
        )
        out[names[label]] = fig
    index = pd.DataFrame({"file": [names[label] for label in sorted(chosen)], PERTURBATION: sorted(chosen)})
    return out, index


def message_figure(title: str, text: str) -> Figure:
    """A small figure holding a title and a wrapped sentence (e.g. why a split was not scored)."""
    import textwrap

    fig = Figure(figsize=(6, 1.8), layout="constrained")
    fig.text(0.5, 0.62, title, ha="center", va="center", fontsize=11, weight="bold")
    fig.text(0.5, 0.3, textwrap.fill(text, 80), ha="center", va="center", fontsize=8.5)
    return fig


def summary_figure(metrics: pd.DataFrame, summary_scores: Sequence[str] = DEFAULT_SUMMARY_SCORES) -> Figure:
    """Scores per method across test perturbations: one panel per (split, score of ``summary_scores``).

    Dots are perturbations; the bar is mean ± sd (NaN scores left out).
    """
    scores = [s for s in summary_scores if s in metrics.columns]
    evaluations = list(dict.fromkeys(metrics["evaluation"]))
    if not evaluations or not scores:
        return message_figure("Perturbation prediction", "No split had test perturbations to score.")
    methods = [m for m in METHOD_LABELS if m in set(metrics["method"])]
    fig = Figure(figsize=(3.2 * len(scores), 3.4 * len(evaluations)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(evaluations), len(scores), squeeze=False))
    rng = np.random.default_rng(0)
    for i, evaluation in enumerate(evaluations):
        sub = metrics.loc[metrics["evaluation"] == evaluation]
        for j, score in enumerate(scores):
            ax = axes[i, j]
            for x, method in enumerate(methods):
                values = sub.loc[sub["method"] == method, score].to_numpy(dtype=float)
                values = values[np.isfinite(values)]
                if values.size == 0:
                    continue
                color = METHOD_COLORS.get(method, "k")
                ax.scatter(x + rng.uniform(-0.15, 0.15, values.size), values, s=8, alpha=0.5, color=color)
                ax.errorbar(
                    x,
                    values.mean(),
                    yerr=values.std(ddof=1) if values.size > 1 else 0,
                    fmt="o",
                    color=color,
                    ecolor="k",
                    capsize=3,
                    markersize=7,
                    markeredgecolor="k",
                )
            ax.set_xticks(range(len(methods)), [METHOD_LABELS[m] for m in methods], rotation=45, ha="right", fontsize=7)
            ax.set_title(SCORE_LABELS.get(score, score), fontsize=9)
            if j == 0:
                ax.set_ylabel(evaluation.replace("_", " "))
    return fig
