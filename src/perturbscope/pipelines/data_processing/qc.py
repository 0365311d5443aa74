"""Quality control of a validated screen: cell, gene and thin-perturbation filters with guards.

Every threshold comes from ``data_processing.qc``; each step is recorded in the QC table,
and a step that removes too much stops the run with an error naming the step.
"""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

from perturbscope.ondisk import OnDiskScreen, is_on_disk
from perturbscope.schema import CONTROL, PERTURBATION, UNPERTURBED, ScreenValidationError

from . import out_of_core

logger = logging.getLogger(__name__)

__all__ = ["QC_GUARDS", "quality_control"]


QC_GUARDS = {
    "min_cells_after_qc": 50,
    "min_genes_after_qc": 20,
    "max_fraction_removed_per_step": 0.5,
    "min_cells_per_perturbation": 10,
}
"""Defaults of the QC guards (``data_processing.qc``), for callers that do not set them."""


def _guard(qc_params: dict[str, Any], key: str) -> Any:
    return qc_params.get(key, QC_GUARDS[key])


class _Steps:
    """The QC table being built, and the guard on each step's share of removed cells."""

    def __init__(self, qc_params: dict[str, Any]) -> None:
        self.rows: list[dict[str, Any]] = [{"step": "input", "cells_removed": 0, "genes_removed": 0}]
        self.max_removed = _guard(qc_params, "max_fraction_removed_per_step")

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

    def check_left(self, qc_params: dict[str, Any], before: tuple[int, int], left: tuple[int, int]) -> None:
        min_cells, min_genes = _guard(qc_params, "min_cells_after_qc"), _guard(qc_params, "min_genes_after_qc")
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


def _mito_genes(var_names: pd.Index, qc_params: dict[str, Any]) -> np.ndarray:
    prefix = qc_params.get("mito_prefix") or "MT-"
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
    adata: ad.AnnData | OnDiskScreen, qc_params: dict[str, Any]
) -> tuple[ad.AnnData | OnDiskScreen, pd.DataFrame]:
    """Filter cells, genes and thin perturbations; return the filtered copy and what each step removed.

    Steps, in order: cells with fewer than ``min_genes_per_cell`` detected genes,
    cells with a mitochondrial fraction above ``max_mito_fraction`` (only when genes
    with ``mito_prefix`` exist), genes detected in fewer than ``min_cells_per_gene``
    cells, and perturbations left with fewer than ``min_cells_per_perturbation`` cells
    (dropped with a warning; controls are never dropped). The raw counts stay in ``X``.
    A screen read from disk (:class:`~perturbscope.ondisk.OnDiskScreen`) is filtered in one
    pass over its blocks, with the same result.

    Raises
    ------
    ScreenValidationError
        A step removed more than ``max_fraction_removed_per_step`` of the cells it was
        given; fewer than ``min_cells_after_qc`` cells or ``min_genes_after_qc`` genes
        are left; no control cells are left. The message names the step and threshold.
    """
    if is_on_disk(adata):
        return _quality_control_on_disk(adata, qc_params)
    out = adata.copy()
    steps = _Steps(qc_params)

    before = out.shape
    sc.pp.filter_cells(out, min_genes=int(qc_params["min_genes_per_cell"]))
    steps.record(f"min_genes_per_cell={qc_params['min_genes_per_cell']}", before, out.shape)

    mito = _mito_genes(out.var_names, qc_params)
    out.var["mt"] = mito
    max_mito = qc_params.get("max_mito_fraction")
    if mito.any() and max_mito is not None:
        sc.pp.calculate_qc_metrics(out, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
        before = out.shape
        keep = out.obs["pct_counts_mt"].to_numpy() <= 100.0 * float(max_mito)
        out._inplace_subset_obs(keep)
        steps.record(f"max_mito_fraction={max_mito}", before, out.shape)
    else:
        steps.rows.append(
            {"step": "max_mito_fraction (no mitochondrial genes)", "cells_removed": 0, "genes_removed": 0}
        )

    before = out.shape
    sc.pp.filter_genes(out, min_cells=int(qc_params["min_cells_per_gene"]))
    steps.record(f"min_cells_per_gene={qc_params['min_cells_per_gene']}", before, out.shape)
    steps.check_left(qc_params, adata.shape, out.shape)

    before = out.shape
    min_per_perturbation = _guard(qc_params, "min_cells_per_perturbation")
    dropped = _thin_perturbations(out, min_per_perturbation)
    if dropped:
        out._inplace_subset_obs(~out.obs[PERTURBATION].astype(str).isin(dropped).to_numpy())
        out.obs[PERTURBATION] = out.obs[PERTURBATION].cat.remove_unused_categories()
    # not guarded by max_fraction_removed_per_step: a screen of only thin perturbations gets its own error
    steps.record(
        f"min_cells_per_perturbation={min_per_perturbation}",
        before,
        out.shape,
        guarded=False,
        perturbations_dropped=", ".join(dropped),
    )
    _check_perturbations_left(out.obs, dropped, min_per_perturbation)
    out.obs["total_counts"] = np.asarray(out.X.sum(axis=1)).ravel()
    return out, steps.table(*adata.shape)


def _quality_control_on_disk(screen: OnDiskScreen, qc_params: dict[str, Any]) -> tuple[OnDiskScreen, pd.DataFrame]:
    """:func:`quality_control` in one pass over the blocks of a screen read from disk.

    ``obs`` gains ``n_genes`` and ``total_counts`` (over the genes kept; ``pct_counts_mt`` too
    when mitochondrial genes exist), ``var`` gains ``mt`` and ``n_cells``."""
    steps = _Steps(qc_params)
    min_genes, min_cells = int(qc_params["min_genes_per_cell"]), int(qc_params["min_cells_per_gene"])
    mito = _mito_genes(screen.var_names, qc_params)
    max_mito = qc_params.get("max_mito_fraction")
    use_mito = bool(mito.any()) and max_mito is not None
    stats = out_of_core.quality_masks(
        screen, min_genes, mito if mito.any() else None, max_mito if use_mito else None, min_cells
    )
    enough_genes = stats["n_genes"] >= min_genes
    n0, g0 = screen.shape
    steps.record(f"min_genes_per_cell={min_genes}", (n0, g0), (int(enough_genes.sum()), g0))
    cells = stats["cells_kept"]
    if use_mito:
        steps.record(f"max_mito_fraction={max_mito}", (int(enough_genes.sum()), g0), (int(cells.sum()), g0))
    else:
        steps.rows.append(
            {"step": "max_mito_fraction (no mitochondrial genes)", "cells_removed": 0, "genes_removed": 0}
        )
    genes = stats["genes_kept"]
    left = (int(cells.sum()), int(genes.sum()))
    steps.record(f"min_cells_per_gene={min_cells}", (left[0], g0), left)
    steps.check_left(qc_params, screen.shape, left)

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
    min_per_perturbation = _guard(qc_params, "min_cells_per_perturbation")
    dropped = _thin_perturbations(out, min_per_perturbation)
    before = out.shape
    if dropped:
        out = out.subset(cells=~out.obs[PERTURBATION].astype(str).isin(dropped).to_numpy())
        out.obs[PERTURBATION] = out.obs[PERTURBATION].cat.remove_unused_categories()
    steps.record(
        f"min_cells_per_perturbation={min_per_perturbation}",
        before,
        out.shape,
        guarded=False,
        perturbations_dropped=", ".join(dropped),
    )
    _check_perturbations_left(out.obs, dropped, min_per_perturbation)
    out.obs["total_counts"] = out_of_core.library_sizes(out).astype(np.float32)  # as X.sum(axis=1)
    return out, steps.table(*screen.shape)


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
