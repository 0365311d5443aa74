"""The statistics of data_processing computed block by block over a :class:`perturbscope.blocks.BlockScreen`.

Each function streams the count matrix block by block and accumulates what it needs, so memory is set
by the block size, not by the number of cells, and a screen in memory and one on disk run the same
code. The results are scanpy's: the same seurat_v3 ranking (per-gene mean and variance, scanpy's loess
fit from scikit-misc, clipped sums) and the same cell-cycle scores (scanpy's binning of genes by mean
expression and its draw of control genes). ``tests/pipelines/data_processing/test_blocks.py`` compares
them with scanpy on the same screens. Written by hand because scanpy needs the whole matrix in memory.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from perturbscope.blocks import BlockScreen
from perturbscope.schema import PHASE, UNKNOWN_PHASE

logger = logging.getLogger(__name__)

__all__ = ["gene_means", "score_cell_cycle", "seurat_v3", "unknown_phase"]


def gene_means(screen: BlockScreen) -> np.ndarray:
    """Mean of ``X`` (the normalised values) per gene over all cells (one pass)."""
    sums = np.zeros(screen.n_vars, dtype=np.float64)
    for chunk in screen.chunks(x=True):
        sums += np.asarray(chunk.x.sum(axis=0, dtype=np.float64)).ravel()
    return sums / max(screen.n_obs, 1)


# --------------------------------------------------------------------- cell cycle
def _control_genes(means: pd.Series, genes: list[str], ctrl_size: int, n_bins: int, seed: int) -> pd.Index:
    """scanpy's ``score_genes`` choice of control genes: genes binned by mean expression,
    ``ctrl_size`` drawn from each bin a scored gene falls in (numpy's global generator seeded
    with ``seed``, as scanpy does), the scored genes left out."""
    np.random.seed(seed)  # noqa: NPY002 - scanpy's own draw, reproduced exactly
    means = means[np.isfinite(means)]
    n_items = int(np.round(len(means) / (n_bins - 1)))
    cut = means.rank(method="min") // n_items
    gene_list = pd.Index(genes)
    control = pd.Index([], dtype="string")
    for value in np.unique(cut.loc[gene_list]):
        pool = cut[cut == value].index
        if ctrl_size < len(pool):
            pool = pool.to_series().sample(ctrl_size).index
        control = control.union(pool.difference(gene_list))
    return control


def score_cell_cycle(
    screen: BlockScreen, s_genes: list[str], g2m_genes: list[str], n_bins: int, seed: int
) -> pd.DataFrame:
    """``S_score``, ``G2M_score`` and ``phase`` per cell, as ``sc.tl.score_genes_cell_cycle``
    computes them (two passes: gene means, then scores)."""
    means = pd.Series(gene_means(screen), index=pd.Index(screen.var_names, dtype="string"))
    ctrl_size = min(len(s_genes), len(g2m_genes))
    position = pd.Index(screen.var_names).get_indexer
    sets = {}
    for name, genes in (("S_score", s_genes), ("G2M_score", g2m_genes)):
        control = _control_genes(means, genes, ctrl_size, n_bins, seed)
        sets[name] = (position(pd.Index(genes)), position(pd.Index(control)))
    scores = {name: np.zeros(screen.n_obs) for name in sets}
    for chunk in screen.chunks(x=True):
        for name, (listed, control) in sets.items():
            listed_mean = np.asarray(chunk.x[:, listed].mean(axis=1, dtype=np.float64)).ravel()
            control_mean = np.asarray(chunk.x[:, control].mean(axis=1, dtype=np.float64)).ravel()
            scores[name][chunk.start : chunk.stop] = listed_mean - control_mean
    frame = pd.DataFrame(scores, index=screen.obs_names)
    phase = pd.Series("S", index=frame.index)
    phase[frame["G2M_score"] > frame["S_score"]] = "G2M"
    phase[np.all(frame < 0, axis=1)] = "G1"
    frame[PHASE] = pd.Categorical(phase)
    return frame


def unknown_phase(index: pd.Index) -> pd.DataFrame:
    """The phase columns when the screen lacks the cell-cycle genes."""
    return pd.DataFrame(
        {"S_score": np.nan, "G2M_score": np.nan, PHASE: pd.Categorical([UNKNOWN_PHASE] * len(index))}, index=index
    )


# ---------------------------------------------------------------------------- HVG
def seurat_v3(screen: BlockScreen, n_top_genes: int, span: float, batch: np.ndarray | None) -> pd.DataFrame:
    """scanpy's ``highly_variable_genes(flavor="seurat_v3")`` on the raw counts, streamed.

    Pass 1 accumulates each gene's sum and sum of squares per batch; scikit-misc's loess
    (as in scanpy) gives the expected variance; pass 2 accumulates the clipped sums. The
    ranking (median rank over batches, number of batches a gene is variable in) is scanpy's.
    Returns the ``var`` columns scanpy adds.
    """
    from skmisc.loess import loess

    codes, categories = (
        (np.zeros(screen.n_obs, dtype=np.int64), [0])
        if batch is None
        else (pd.factorize(np.asarray(batch), sort=True)[0], sorted(pd.unique(np.asarray(batch))))
    )
    n_b, n_g = len(categories), screen.n_vars
    sums, squares = np.zeros((n_b, n_g)), np.zeros((n_b, n_g))
    n_cells = np.bincount(codes, minlength=n_b).astype(np.float64)
    for chunk in screen.chunks():
        block_codes = codes[chunk.start : chunk.stop]
        for b in np.unique(block_codes):
            rows = chunk.counts[block_codes == b]
            sums[b] += np.asarray(rows.sum(axis=0, dtype=np.float64)).ravel()
            squares[b] += np.asarray(rows.multiply(rows).sum(axis=0, dtype=np.float64)).ravel()
    means = sums / n_cells[:, None]
    variances = (squares / n_cells[:, None] - means**2) * (n_cells / np.maximum(n_cells - 1, 1))[:, None]
    reg_std = np.zeros((n_b, n_g))
    for b in range(n_b):
        not_const = variances[b] > 0
        fitted = np.zeros(n_g)
        model = loess(np.log10(means[b, not_const]), np.log10(variances[b, not_const]), span=span, degree=2)
        model.fit()
        fitted[not_const] = model.outputs.fitted_values
        reg_std[b] = np.sqrt(10**fitted)
    clip = reg_std * np.sqrt(n_cells)[:, None] + means
    clipped_sums, clipped_squares = np.zeros((n_b, n_g)), np.zeros((n_b, n_g))
    for chunk in screen.chunks():
        block_codes = codes[chunk.start : chunk.stop]
        for b in np.unique(block_codes):
            rows = chunk.counts[block_codes == b].tocoo()
            values = np.minimum(rows.data.astype(np.float64), clip[b, rows.col])
            clipped_sums[b] += np.bincount(rows.col, weights=values, minlength=n_g)
            clipped_squares[b] += np.bincount(rows.col, weights=values**2, minlength=n_g)
    n = n_cells[:, None]
    norm_var = (1 / ((n - 1) * reg_std**2)) * (n * means**2 + clipped_squares - 2 * clipped_sums * means)
    ranks = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float32)
    n_batches_variable = np.sum(ranks < n_top_genes, axis=0)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    all_sums = sums.sum(axis=0)
    all_n = n_cells.sum()
    all_means = all_sums / all_n
    all_var = (squares.sum(axis=0) / all_n - all_means**2) * (all_n / max(all_n - 1, 1))
    table = pd.DataFrame(
        {
            "highly_variable_rank": median_rank,
            "means": all_means,
            "variances": all_var,
            "variances_norm": norm_var.mean(axis=0),
            "highly_variable_nbatches": n_batches_variable,
        },
        index=screen.var_names,
    )
    order = table.sort_values(
        ["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last"
    ).index
    table["highly_variable"] = table.index.isin(order[: int(n_top_genes)])
    if batch is None:
        table = table.drop(columns="highly_variable_nbatches")
    return table
