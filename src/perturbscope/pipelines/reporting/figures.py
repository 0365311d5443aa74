"""Plotting helpers shared by the report sections (matplotlib, no pyplot state).

Every function returns a :class:`matplotlib.figure.Figure` built without
``pyplot`` (so nothing leaks between nodes) at the ``dpi`` it is given; the PNG
the catalog writes and the one embedded in the report are the same picture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from perturbscope import neighbours
from perturbscope.schema import UNPERTURBED

GREY = "#b8bcc4"
MUTED_LABELS = frozenset({"control", "unknown", "unassigned", "none", "nan", "other", UNPERTURBED})
"""Categories drawn in grey (and below the others) in categorical scatter plots."""


def new_figure(width: float, height: float, dpi: int) -> Figure:
    """A blank figure with constrained layout."""
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained", facecolor="white")


def category_colours(categories: Sequence[str]) -> dict[str, str]:
    """A stable colour per category; muted labels (control, unknown...) are grey."""
    vivid = [c for c in categories if str(c).lower() not in MUTED_LABELS]
    palette = colormaps["tab10" if len(vivid) <= 10 else "tab20"]
    n = palette.N
    colours = {c: palette(i % n) for i, c in enumerate(vivid)}
    colours.update({c: GREY for c in categories if str(c).lower() in MUTED_LABELS})
    return {c: _hex(v) for c, v in colours.items()}


def _hex(colour) -> str:
    if isinstance(colour, str):
        return colour
    r, g, b = (int(round(255 * x)) for x in colour[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def top_categories(values: pd.Series, max_categories: int, other: str = "other") -> pd.Series:
    """Keep the ``max_categories`` most frequent non-muted labels; the rest become ``other``."""
    values = values.astype(str)
    counts = values[~values.str.lower().isin(MUTED_LABELS)].value_counts()
    keep = set(counts.index[:max_categories]) | set(values[values.str.lower().isin(MUTED_LABELS)])
    return values.where(values.isin(keep), other)


# -------------------------------------------------------------------------- embeddings
def compute_umap(
    features: np.ndarray,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.3,
    seed: int = 0,
    n_pcs: int | None = None,
) -> np.ndarray:
    """2-D UMAP of ``features`` (cells x dims) with scanpy; PCA first when ``n_pcs`` is given."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] < 3:
        raise ValueError(f"UMAP needs a 2-D array with at least 3 cells, got shape {features.shape}.")
    adata = ad.AnnData(X=features)
    if n_pcs is not None:
        n_comps = int(min(n_pcs, features.shape[0] - 1, features.shape[1] - 1))
        sc.pp.pca(adata, n_comps=n_comps, random_state=seed)
        rep = "X_pca"
    else:
        adata.obsm["X_rep"] = features
        rep = "X_rep"
    graph = neighbours.neighbour_graph(adata.obsm[rep], n_neighbors, seed)
    return neighbours.umap(graph, min_dist, seed)


def scatter_categorical(ax, xy: np.ndarray, labels: pd.Series, *, title: str, point_size: float, legend: bool) -> None:
    """Scatter ``xy`` coloured by ``labels``; grey (muted) labels are drawn first, underneath."""
    labels = labels.astype(str).to_numpy()
    categories = list(pd.unique(labels))
    muted = [c for c in categories if c.lower() in MUTED_LABELS]
    vivid = sorted(c for c in categories if c.lower() not in MUTED_LABELS)
    colours = category_colours(vivid + muted)
    for category in muted + vivid:
        mask = labels == category
        ax.scatter(
            xy[mask, 0],
            xy[mask, 1],
            s=point_size,
            c=colours[category],
            linewidths=0,
            alpha=0.55 if category in muted else 0.85,
            rasterized=True,
        )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#cccccc")
    if legend:
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colours[c], markersize=6, label=c) for c in vivid + muted
        ]
        ax.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
            fontsize=7.5,
            ncol=1 if len(handles) <= 14 else 2,
            handletextpad=0.2,
            borderaxespad=0.2,
        )


def plot_embedding_grid(
    embeddings: Mapping[str, np.ndarray],
    colourings: Mapping[str, pd.Series],
    *,
    dpi: int,
    point_size: float = 6.0,
) -> Figure:
    """Rows: representations (e.g. PCA, salient space); columns: colourings (phase, program)."""
    n_rows, n_cols = len(embeddings), len(colourings)
    fig = new_figure(4.6 * n_cols + 1.4 * n_cols, 4.2 * n_rows, dpi)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for i, (rep, xy) in enumerate(embeddings.items()):
        for j, (colour, labels) in enumerate(colourings.items()):
            ax = axes[i, j]
            scatter_categorical(
                ax, xy, labels, title=f"{rep}\ncoloured by {colour}", point_size=point_size, legend=True
            )
            ax.set_xlabel("UMAP 1", fontsize=8)
            ax.set_ylabel("UMAP 2", fontsize=8)
    return fig


# -------------------------------------------------------------------------- curves
def _kept_epoch(history: pd.DataFrame) -> int | None:
    """The epoch whose weights training kept: a ``best_epoch`` column (its value) or a
    boolean ``best`` column (the flagged row); None when the history has neither."""
    if "best_epoch" in history and (history["best_epoch"] >= 0).any():
        return int(history["best_epoch"].iloc[-1])
    if "best" in history:
        flags = history["best"].astype(str).str.lower().isin(["true", "1"])
        if flags.any():
            return int(history.loc[flags, "epoch"].iloc[-1])
    return None


def plot_training_curves(histories: Mapping[str, pd.DataFrame], *, dpi: int, title: str = "") -> Figure:
    """Train and validation loss per epoch, one panel per model; the best epoch is marked.

    Each history has columns ``epoch``, ``train_loss`` and (optionally) ``val_loss``,
    as written by ``models.training.History.to_frame()``; the epoch whose weights
    were kept (a ``best_epoch`` column, or a boolean ``best`` column) is marked,
    else the lowest validation loss.
    """
    if not histories:
        raise ValueError("plot_training_curves needs at least one history.")
    n = len(histories)
    fig = new_figure(4.4 * n, 3.3, dpi)
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    for ax, (name, history) in zip(axes, histories.items()):
        if history.empty:  # e.g. the cVAE of a split that was not applicable to the screen
            ax.text(
                0.5,
                0.5,
                "not trained: split not applicable",
                ha="center",
                va="center",
                color="#888888",
                transform=ax.transAxes,
            )
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        missing = {"epoch", "train_loss"} - set(history.columns)
        if missing:
            raise ValueError(
                f"The training history of '{name}' lacks column(s) {sorted(missing)}; expected the "
                "output of History.to_frame() (epoch, train_loss, val_loss...)."
            )
        epoch = history["epoch"].to_numpy()
        ax.plot(epoch, history["train_loss"], color="#2f6db5", lw=1.6, label="train")
        if "val_loss" in history and history["val_loss"].notna().any():
            val = history["val_loss"].to_numpy(dtype=float)
            ax.plot(epoch, val, color="#d1495b", lw=1.6, label="validation")
            best = int(np.nanargmin(val))
            kept = _kept_epoch(history)
            if kept is not None and (epoch == kept).any():
                best = int(np.flatnonzero(epoch == kept)[0])
            ax.axvline(epoch[best], color="#888888", ls=":", lw=1)
            ax.scatter([epoch[best]], [val[best]], color="#d1495b", s=18, zorder=3)
            ax.annotate(
                f"best epoch {epoch[best]}",
                (epoch[best], val[best]),
                xytext=(4, 8),
                textcoords="offset points",
                fontsize=7.5,
                color="#555555",
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss per cell")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# -------------------------------------------------------------------------- heatmaps
def plot_heatmap(
    frame: pd.DataFrame,
    *,
    dpi: int,
    title: str = "",
    cbar_label: str = "",
    cmap: str = "RdBu_r",
    centre: float | None = 0.0,
    annotate: bool = False,
    max_label_len: int = 24,
) -> Figure:
    """A labelled heatmap of ``frame`` (rows x columns); diverging around ``centre``."""
    values = frame.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    width = min(3.0 + 0.32 * n_cols, 18.0)
    height = min(1.6 + 0.24 * n_rows, 22.0)
    fig = new_figure(width, height, dpi)
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    norm = None
    if centre is not None and finite.size:
        span = float(np.max(np.abs(finite - centre))) or 1.0
        norm = TwoSlopeNorm(vcenter=centre, vmin=centre - span, vmax=centre + span)
    image = ax.imshow(values, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([str(c)[:max_label_len] for c in frame.columns], rotation=90, fontsize=7.5)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([str(r)[:max_label_len] for r in frame.index], fontsize=7.5)
    if annotate and n_rows * n_cols <= 400:
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=6)
    colourbar = fig.colorbar(image, ax=ax, shrink=0.6, pad=0.01)
    colourbar.set_label(cbar_label, fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
