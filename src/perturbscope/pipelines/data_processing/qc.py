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

from perturbscope.schema import CONTROL, PERTURBATION, UNPERTURBED, ScreenValidationError

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


def quality_control(
    adata: ad.AnnData, qc_params: dict[str, Any]
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Filter cells, genes and thin perturbations; return the filtered copy and what each step removed.

    Steps, in order: cells with fewer than ``min_genes_per_cell`` detected genes,
    cells with a mitochondrial fraction above ``max_mito_fraction`` (only when genes
    with ``mito_prefix`` exist), genes detected in fewer than ``min_cells_per_gene``
    cells, and perturbations left with fewer than ``min_cells_per_perturbation`` cells
    (dropped with a warning; controls are never dropped). The raw counts stay in ``X``.

    Raises
    ------
    ScreenValidationError
        A step removed more than ``max_fraction_removed_per_step`` of the cells it was
        given; fewer than ``min_cells_after_qc`` cells or ``min_genes_after_qc`` genes
        are left; no control cells are left. The message names the step and threshold.
    """
    out = adata.copy()
    steps: list[dict[str, Any]] = [
        {"step": "input", "cells_removed": 0, "genes_removed": 0}
    ]
    max_removed = _guard(qc_params, "max_fraction_removed_per_step")

    def record(step: str, n_cells: int, n_genes: int, guarded: bool = True, **extra: Any) -> None:
        steps.append(
            {"step": step, "cells_removed": n_cells - out.n_obs, "genes_removed": n_genes - out.n_vars, **extra}
        )
        removed = n_cells - out.n_obs
        if guarded and max_removed is not None and n_cells and removed > float(max_removed) * n_cells:
            raise ScreenValidationError(
                ("The screen is empty after QC: " if out.n_obs == 0 else "")
                + f"QC step data_processing.qc.{step} removed {removed:,} of {n_cells:,} cells "
                f"({removed / n_cells:.0%}), more than data_processing.qc.max_fraction_removed_per_step="
                f"{max_removed}. The threshold does not suit this screen (e.g. a targeted panel "
                "detects fewer genes per cell): relax it, or raise max_fraction_removed_per_step "
                "if that many low-quality cells are expected."
            )

    n_cells, n_genes = out.n_obs, out.n_vars
    sc.pp.filter_cells(out, min_genes=int(qc_params["min_genes_per_cell"]))
    record(f"min_genes_per_cell={qc_params['min_genes_per_cell']}", n_cells, n_genes)

    prefix = qc_params.get("mito_prefix") or "MT-"
    mito = out.var_names.str.upper().str.startswith(prefix.upper())
    out.var["mt"] = mito
    max_mito = qc_params.get("max_mito_fraction")
    if mito.any() and max_mito is not None:
        sc.pp.calculate_qc_metrics(out, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
        n_cells, n_genes = out.n_obs, out.n_vars
        keep = out.obs["pct_counts_mt"].to_numpy() <= 100.0 * float(max_mito)
        out._inplace_subset_obs(keep)
        record(f"max_mito_fraction={max_mito}", n_cells, n_genes)
    else:
        steps.append({"step": "max_mito_fraction (no mitochondrial genes)", "cells_removed": 0, "genes_removed": 0})

    n_cells, n_genes = out.n_obs, out.n_vars
    sc.pp.filter_genes(out, min_cells=int(qc_params["min_cells_per_gene"]))
    record(f"min_cells_per_gene={qc_params['min_cells_per_gene']}", n_cells, n_genes)

    min_cells, min_genes = _guard(qc_params, "min_cells_after_qc"), _guard(qc_params, "min_genes_after_qc")
    if out.n_obs < int(min_cells or 1) or out.n_vars < int(min_genes or 1):
        which = (
            f"data_processing.qc.min_cells_after_qc={min_cells}" if out.n_obs < int(min_cells or 1)
            else f"data_processing.qc.min_genes_after_qc={min_genes}"
        )
        raise ScreenValidationError(
            f"Only {out.n_obs:,} cells x {out.n_vars:,} genes are left after QC (of {adata.n_obs:,} x "
            f"{adata.n_vars:,}), fewer than {which}: too little to model. The steps removed: "
            + "; ".join(f"{r['step']}: {r['cells_removed']:,} cells, {r['genes_removed']:,} genes" for r in steps[1:])
            + ". Relax those thresholds in data_processing.qc, or check that X holds the whole "
            "count matrix."
        )
    n_cells, n_genes = out.n_obs, out.n_vars
    min_per_perturbation = _guard(qc_params, "min_cells_per_perturbation")
    dropped = _thin_perturbations(out, min_per_perturbation)
    if dropped:
        out._inplace_subset_obs(~out.obs[PERTURBATION].astype(str).isin(dropped).to_numpy())
        out.obs[PERTURBATION] = out.obs[PERTURBATION].cat.remove_unused_categories()
    # not guarded by max_fraction_removed_per_step: a screen of only thin perturbations gets its own error
    record(f"min_cells_per_perturbation={min_per_perturbation}", n_cells, n_genes, guarded=False,
           perturbations_dropped=", ".join(dropped))
    perturbation = out.obs[PERTURBATION]
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
    table = pd.DataFrame(steps)
    table["perturbations_dropped"] = table.get("perturbations_dropped", pd.Series(dtype=object)).fillna("")
    table["cells_left"] = adata.n_obs - table["cells_removed"].cumsum()
    table["genes_left"] = adata.n_vars - table["genes_removed"].cumsum()
    out.obs["total_counts"] = np.asarray(out.X.sum(axis=1)).ravel()
    return out, table


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
            len(thin), int(min_cells), shown, " ..." if len(thin) > 20 else "",
        )
    return sorted(thin.index)
