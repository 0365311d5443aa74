"""Quality control of a validated screen: cell, gene and thin-perturbation filters with guards.

Every threshold is an argument of :func:`quality_control` (``data_processing.qc`` in the conf); each
step is recorded in the QC table, and a step that removes too much stops the run with an error naming
the step. One implementation, over the blocks of a :class:`~perturbscope.blocks.BlockScreen`.
"""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from perturbscope.blocks import BlockScreen, as_block_screen
from perturbscope.schema import CONTROL, PERTURBATION, UNPERTURBED, ScreenValidationError

logger = logging.getLogger(__name__)

__all__ = ["library_sizes", "quality_control", "quality_masks"]


class _Steps:
    """The QC table being built, and the guard on each step's share of removed cells."""

    def __init__(self, max_removed: float | None) -> None:
        self.rows: list[dict[str, Any]] = [{"step": "input", "cells_removed": 0, "genes_removed": 0}]
        self.max_removed = max_removed

    def record(
        self, step: str, before: tuple[int, int], after: tuple[int, int], guarded: bool = True, **extra: Any
    ) -> None:
        n_cells, removed = before[0], before[0] - after[0]
        self.rows.append({"step": step, "cells_removed": removed, "genes_removed": before[1] - after[1], **extra})
        if guarded and self.max_removed is not None and n_cells and removed > float(self.max_removed) * n_cells:
            raise ScreenValidationError(
                ("The screen is empty after QC: " if after[0] == 0 else "")
                + f"QC step data_processing.qc.{step} removed {removed:,} of {n_cells:,} cells "
                f"({removed / n_cells:.0%}), more than data_processing.qc.max_fraction_removed_per_step="
                f"{self.max_removed}. The threshold does not suit this screen (e.g. a targeted panel "
                "detects fewer genes per cell): relax it, or raise max_fraction_removed_per_step "
                "if that many low-quality cells are expected."
            )

    def check_left(
        self, min_cells: int | None, min_genes: int | None, before: tuple[int, int], left: tuple[int, int]
    ) -> None:
        if left[0] < int(min_cells or 1) or left[1] < int(min_genes or 1):
            which = (
                f"data_processing.qc.min_cells_after_qc={min_cells}"
                if left[0] < int(min_cells or 1)
                else f"data_processing.qc.min_genes_after_qc={min_genes}"
            )
            raise ScreenValidationError(
                f"Only {left[0]:,} cells x {left[1]:,} genes are left after QC (of {before[0]:,} x "
                f"{before[1]:,}), fewer than {which}: too little to model. The steps removed: "
                + "; ".join(
                    f"{r['step']}: {r['cells_removed']:,} cells, {r['genes_removed']:,} genes" for r in self.rows[1:]
                )
                + ". Relax those thresholds in data_processing.qc, or check that X holds the whole "
                "count matrix."
            )

    def table(self, n_cells: int, n_genes: int) -> pd.DataFrame:
        table = pd.DataFrame(self.rows)
        table["perturbations_dropped"] = table.get("perturbations_dropped", pd.Series(dtype=object)).fillna("")
        table["cells_left"] = n_cells - table["cells_removed"].cumsum()
        table["genes_left"] = n_genes - table["genes_removed"].cumsum()
        return table


def _mito_genes(var_names: pd.Index, prefix: str | None) -> np.ndarray:
    prefix = prefix or "MT-"
    return np.asarray(var_names.str.upper().str.startswith(prefix.upper()))


def _check_perturbations_left(obs: pd.DataFrame, dropped: list[str], min_per_perturbation: Any) -> None:
    perturbation = obs[PERTURBATION]
    if dropped and not ((perturbation != CONTROL) & (perturbation != UNPERTURBED)).any():
        raise ScreenValidationError(
            f"Every perturbation has fewer than data_processing.qc.min_cells_per_perturbation="
            f"{min_per_perturbation} cells after QC, so none is left. Lower "
            "it, or check schema.perturbation_key (a per-cell barcode column gives one cell per label)."
        )
    if (perturbation != UNPERTURBED).any() and not (perturbation == CONTROL).any():
        raise ScreenValidationError(
            "QC removed every control cell. Relax data_processing.qc: without controls "
            "there is nothing to compare perturbations to."
        )


def quality_control(
    screen: ad.AnnData | BlockScreen,
    min_genes_per_cell: int = 5,
    min_cells_per_gene: int = 3,
    max_mito_fraction: float | None = 0.2,
    mito_prefix: str = "MT-",
    min_cells_after_qc: int = 50,
    min_genes_after_qc: int = 20,
    max_fraction_removed_per_step: float | None = 0.5,
    min_cells_per_perturbation: int | None = 10,
) -> tuple[BlockScreen, pd.DataFrame]:
    """Filter cells, genes and thin perturbations; return the filtered screen and what each step removed.

    Steps, in order: cells with fewer than ``min_genes_per_cell`` detected genes, cells with a
    mitochondrial fraction above ``max_mito_fraction`` (only when genes starting with ``mito_prefix``
    exist; None = no filter), genes detected in fewer than ``min_cells_per_gene`` of the cells left, and
    perturbations left with fewer than ``min_cells_per_perturbation`` cells (dropped with a warning;
    controls are never dropped). One pass over the blocks computes the per-cell and per-gene numbers,
    as scanpy's ``filter_cells``, ``calculate_qc_metrics`` and ``filter_genes`` do. ``obs`` gains
    ``n_genes``, ``total_counts`` (over the genes kept) and, with mitochondrial genes,
    ``pct_counts_mt``; ``var`` gains ``mt`` and ``n_cells``.

    Raises
    ------
    ScreenValidationError
        A step removed more than ``max_fraction_removed_per_step`` of the cells it was given; fewer than
        ``min_cells_after_qc`` cells or ``min_genes_after_qc`` genes are left; no control cells are left.
        The message names the step and its parameter.
    """
    screen = as_block_screen(screen)
    steps = _Steps(max_fraction_removed_per_step)
    min_genes, min_cells = int(min_genes_per_cell), int(min_cells_per_gene)
    mito = _mito_genes(screen.var_names, mito_prefix)
    use_mito = bool(mito.any()) and max_mito_fraction is not None
    stats = quality_masks(
        screen, min_genes, mito if mito.any() else None, max_mito_fraction if use_mito else None, min_cells
    )
    enough_genes = stats["n_genes"] >= min_genes
    n0, g0 = screen.shape
    steps.record(f"min_genes_per_cell={min_genes}", (n0, g0), (int(enough_genes.sum()), g0))
    cells = stats["cells_kept"]
    if use_mito:
        steps.record(f"max_mito_fraction={max_mito_fraction}", (int(enough_genes.sum()), g0), (int(cells.sum()), g0))
    else:
        steps.rows.append(
            {"step": "max_mito_fraction (no mitochondrial genes)", "cells_removed": 0, "genes_removed": 0}
        )
    genes = stats["genes_kept"]
    left = (int(cells.sum()), int(genes.sum()))
    steps.record(f"min_cells_per_gene={min_cells}", (left[0], g0), left)
    steps.check_left(min_cells_after_qc, min_genes_after_qc, screen.shape, left)

    obs = screen.obs.copy()
    obs["n_genes"] = stats["n_genes"]
    if mito.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            obs["pct_counts_mt"] = 100.0 * stats["total_counts_mt"] / stats["total_counts"]
    var = screen.var.copy()
    var["mt"], var["n_cells"] = mito, stats["gene_cells"]
    out = screen.with_obs(obs)
    out.var = var
    out = out.subset(cells=cells, genes=genes)
    dropped = _thin_perturbations(out, min_cells_per_perturbation)
    before = out.shape
    if dropped:
        out = out.subset(cells=~out.obs[PERTURBATION].astype(str).isin(dropped).to_numpy())
        out.obs[PERTURBATION] = out.obs[PERTURBATION].cat.remove_unused_categories()
    # not guarded by max_fraction_removed_per_step: a screen of only thin perturbations gets its own error
    steps.record(
        f"min_cells_per_perturbation={min_cells_per_perturbation}",
        before,
        out.shape,
        guarded=False,
        perturbations_dropped=", ".join(dropped),
    )
    _check_perturbations_left(out.obs, dropped, min_cells_per_perturbation)
    out.obs["total_counts"] = library_sizes(out).astype(np.float32)  # as X.sum(axis=1)
    return out, steps.table(*screen.shape)


def quality_masks(
    screen: BlockScreen, min_genes: int, mito: np.ndarray | None, max_mito: float | None, min_cells: int
) -> dict[str, np.ndarray]:
    """One pass: each cell's detected genes and mitochondrial share, and, over the cells that pass those two
    filters, each gene's number of cells (as ``filter_cells``, ``calculate_qc_metrics`` and
    ``filter_genes`` compute them)."""
    n_genes = np.zeros(screen.n_obs, dtype=np.int64)
    total = np.zeros(screen.n_obs, dtype=np.float64)
    total_mt = np.zeros(screen.n_obs, dtype=np.float64)
    gene_cells = np.zeros(screen.n_vars, dtype=np.int64)
    pass_genes = np.zeros(screen.n_obs, dtype=bool)
    for chunk in screen.chunks():
        counts = chunk.counts
        counts.eliminate_zeros()
        rows = slice(chunk.start, chunk.stop)
        n_genes[rows] = np.diff(counts.indptr)
        total[rows] = np.asarray(counts.sum(axis=1)).ravel()
        keep = n_genes[rows] >= min_genes
        if mito is not None:
            total_mt[rows] = np.asarray(counts[:, mito].sum(axis=1)).ravel()
            if max_mito is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    keep &= 100.0 * total_mt[rows] / total[rows] <= 100.0 * float(max_mito)
        pass_genes[rows] = keep
        gene_cells += np.bincount(counts[keep].indices, minlength=screen.n_vars)
    return {
        "n_genes": n_genes,
        "total_counts": total,
        "total_counts_mt": total_mt,
        "cells_kept": pass_genes,
        "gene_cells": gene_cells,
        "genes_kept": gene_cells >= min_cells,
    }


def library_sizes(screen: BlockScreen) -> np.ndarray:
    """Each cell's total counts over the screen's genes (one pass)."""
    out = np.zeros(screen.n_obs, dtype=np.float64)
    for chunk in screen.chunks():
        out[chunk.start : chunk.stop] = np.asarray(chunk.counts.sum(axis=1, dtype=np.float64)).ravel()
    return out


def _thin_perturbations(adata: ad.AnnData, min_cells: int | None) -> list[str]:
    """Perturbations (never controls) with fewer than ``min_cells`` cells; a warning lists them."""
    if not min_cells:
        return []
    labels = adata.obs[PERTURBATION].astype(str)
    sizes = labels[(labels != CONTROL) & (labels != UNPERTURBED)].value_counts()
    thin = sizes[sizes < int(min_cells)]
    if len(thin):
        shown = ", ".join(f"{label} ({n})" for label, n in thin.sort_values().head(20).items())
        logger.warning(
            "Dropping %d perturbation(s) with fewer than %d cells after QC "
            "(data_processing.qc.min_cells_per_perturbation): %s%s.",
            len(thin),
            int(min_cells),
            shown,
            " ..." if len(thin) > 20 else "",
        )
    return sorted(thin.index)
