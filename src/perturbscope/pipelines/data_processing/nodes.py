"""Nodes of the data_processing pipeline.

Every node is a pure function: it copies the AnnData it is given before changing
anything, and every knob comes from ``conf/base/parameters_data_processing.yml``.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

from perturbscope.ondisk import OnDiskScreen, is_on_disk
from perturbscope.schema import (
    CELL_GROUP,
    CONTROL,
    IS_CONTROL,
    N_PERTURBED_GENES,
    PERTURBATION,
    PERTURBED_GENES,
    PHASE,
    SPLIT,
    UNKNOWN_PHASE,
    UNPERTURBED,
    ScreenSchema,
    ScreenValidationError,
)
from perturbscope.validation import validate_screen

from . import out_of_core
from .qc import QC_GUARDS, quality_control

logger = logging.getLogger(__name__)

__all__ = [
    "QC_GUARDS",
    "count_cells_per_perturbation",
    "label_cells",
    "normalise",
    "quality_control",
    "score_cell_cycle",
    "select_highly_variable_genes",
    "summarise_screen",
    "validate_screen",
]


def count_cells_per_perturbation(adata: ad.AnnData) -> pd.DataFrame:
    """Cells per perturbation label in a validated screen, before QC."""
    counts = adata.obs[PERTURBATION].value_counts().rename("cells_raw")
    return counts.rename_axis(PERTURBATION).reset_index()


def normalise(adata: ad.AnnData | OnDiskScreen, params: dict[str, Any]) -> ad.AnnData | OnDiskScreen:
    """Keep raw counts in ``layers["counts"]``; ``normalize_total`` + ``log1p`` in ``X``.

    A screen read from disk gets each cell's total in one pass; the normalised values are
    computed block by block when they are read or written."""
    if is_on_disk(adata):
        library = out_of_core.library_sizes(adata)
        target = params.get("target_sum")
        if target is None:  # scanpy: the median of the cells' totals (cells with counts)
            target = float(np.median(library[library > 0]))
        out = adata.with_normalisation(library, target)
        out.uns = {**out.uns, "log1p": {"base": None}}  # as sc.pp.log1p records it
        return out
    out = adata.copy()
    out.layers["counts"] = out.X.copy()
    sc.pp.normalize_total(out, target_sum=params.get("target_sum"))
    sc.pp.log1p(out)
    return out


# ------------------------------------------------------------------------ cell cycle
def tirosh_cell_cycle_genes() -> tuple[list[str], list[str]]:
    """The Tirosh et al. 2016 S-phase (first 43) and G2/M (last 54) genes."""
    text = files("perturbscope.resources").joinpath("cell_cycle_genes_tirosh2016.txt").read_text()
    genes = [line.strip() for line in text.splitlines() if line.strip()]
    return genes[:43], genes[43:]


def score_cell_cycle(
    adata: ad.AnnData | OnDiskScreen, params: dict[str, Any], seed: int = 0
) -> ad.AnnData | OnDiskScreen:
    """Score S and G2/M programs and call a phase (scanpy ``score_genes_cell_cycle``).

    Gene symbols are matched case-insensitively (so mouse symbols work). When fewer
    than ``min_genes_per_phase`` genes of either list are in the screen, a warning is
    logged and ``phase`` is ``unknown`` with NaN scores. A ``phase`` column the screen
    already had is kept as ``phase_original``.
    """
    out = adata.copy()
    if PHASE in out.obs:
        # keep a phase the screen already carried (e.g. a simulator's ground truth)
        logger.info("obs['phase'] exists; it is kept as obs['phase_original'].")
        out.obs["phase_original"] = out.obs[PHASE].copy()
    s_genes, g2m_genes = tirosh_cell_cycle_genes()
    by_upper = {name.upper(): name for name in out.var_names}
    s_present = [by_upper[g.upper()] for g in s_genes if g.upper() in by_upper]
    g2m_present = [by_upper[g.upper()] for g in g2m_genes if g.upper() in by_upper]
    minimum = int(params.get("min_genes_per_phase", 5))
    if len(s_present) < minimum or len(g2m_present) < minimum:
        logger.warning(
            "Only %d S-phase and %d G2/M genes of the Tirosh list are in the screen "
            "(need %d each): cell-cycle phase is marked '%s'.",
            len(s_present),
            len(g2m_present),
            minimum,
            UNKNOWN_PHASE,
        )
        for column, values in out_of_core.unknown_phase(out.obs_names).items():
            out.obs[column] = values
        return out
    n_bins = int(params.get("n_bins", 25))
    if is_on_disk(out):
        scores = out_of_core.score_cell_cycle_on_disk(out, s_present, g2m_present, n_bins, int(seed))
        for column, values in scores.items():
            out.obs[column] = values
    else:
        sc.tl.score_genes_cell_cycle(
            out,
            s_genes=s_present,
            g2m_genes=g2m_present,
            n_bins=n_bins,
            random_state=int(seed),
        )
    out.obs[PHASE] = pd.Categorical(out.obs[PHASE])
    out.uns["perturbscope"] = {
        **out.uns.get("perturbscope", {}),
        "cell_cycle_genes_used": {"S": len(s_present), "G2M": len(g2m_present)},
    }
    return out


# ----------------------------------------------------------------------------- HVGs
def select_highly_variable_genes(
    adata: ad.AnnData | OnDiskScreen, params: dict[str, Any], batch_key: str | None = None
) -> ad.AnnData | OnDiskScreen:
    """seurat_v3 highly variable genes on ``layers["counts"]``; subset to them.

    Keeps every gene when the screen has no more than ``n_top_genes``. A screen read from
    disk gets the same statistics in two passes (``out_of_core.seurat_v3_on_disk``).
    """
    out = adata.copy()
    n_top = int(params["n_top_genes"])
    if out.n_vars <= n_top:
        logger.info("The screen has %d genes (<= n_top_genes=%d): keeping all.", out.n_vars, n_top)
        out.var["highly_variable"] = True
        return out
    if is_on_disk(out):
        flavor = params.get("flavor", "seurat_v3")
        if flavor != "seurat_v3":
            raise ScreenValidationError(
                f"data_processing.hvg.flavor={flavor!r} is not available for screens read from disk in "
                "chunks; use seurat_v3."
            )
        batch = None if not batch_key else out.obs[batch_key].astype(str).to_numpy()
        table = out_of_core.seurat_v3_on_disk(out, n_top, float(params.get("span", 0.3)), batch)
        for column, values in table.items():
            out.var[column] = values.to_numpy()
        out.uns["hvg"] = {"flavor": flavor}
        return out.subset(genes=out.var["highly_variable"].to_numpy())
    sc.pp.highly_variable_genes(
        out,
        flavor=params.get("flavor", "seurat_v3"),
        n_top_genes=n_top,
        layer="counts",
        batch_key=batch_key,
        span=float(params.get("span", 0.3)),
    )
    return out[:, out.var["highly_variable"].to_numpy()].copy()


# --------------------------------------------------------------------------- labels
def label_cells(
    adata: ad.AnnData | OnDiskScreen, schema_params: dict[str, Any], split_params: dict[str, Any], seed: int = 0
) -> ad.AnnData | OnDiskScreen:
    """Add ``is_control``, ``cell_group``, ``perturbed_genes``, ``n_perturbed_genes``, ``split``.

    ``split`` is ``train``/``validation``: within every perturbation (controls
    included) a ``validation_fraction`` share of cells, at least one cell kept for
    training, drawn with ``seed`` — the same screen and seed give the same split.
    """
    schema = ScreenSchema.from_params(schema_params)
    out = adata.copy()
    labels = out.obs[PERTURBATION].astype(str)
    genes = labels.map(lambda label: () if label == UNPERTURBED else schema.parse(label))
    out.obs[IS_CONTROL] = (labels == CONTROL).to_numpy()
    out.obs[CELL_GROUP] = pd.Categorical(
        np.where(out.obs[IS_CONTROL], "control", "target"), categories=["control", "target"]
    )
    out.obs[PERTURBED_GENES] = genes.map(lambda g: schema.double_separator.join(g)).to_numpy()
    out.obs[N_PERTURBED_GENES] = genes.map(len).astype(np.int64).to_numpy()

    fraction = float(split_params.get("validation_fraction", 0.1))
    if not 0.0 <= fraction < 1.0:
        raise ScreenValidationError(f"data_processing.split.validation_fraction must be in [0, 1), got {fraction}.")
    rng = np.random.default_rng(int(seed))
    split = np.full(out.n_obs, "train", dtype=object)
    codes = labels.to_numpy()
    for label in sorted(np.unique(codes)):
        members = np.flatnonzero(codes == label)
        n_val = min(int(round(fraction * members.size)), members.size - 1)
        if n_val > 0:
            split[rng.choice(members, size=n_val, replace=False)] = "validation"
    out.obs[SPLIT] = pd.Categorical(split, categories=["train", "validation"])
    return out


# -------------------------------------------------------------------------- summary
def summarise_screen(
    cells_raw: pd.DataFrame, processed: ad.AnnData, qc_table: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The screen summary: cells per perturbation before/after QC, and the QC steps.

    Returns
    -------
    per_perturbation
        One row per perturbation: ``cells_raw``, ``cells_kept``, ``train``,
        ``validation``, ``is_control``, ``n_perturbed_genes``.
    qc_steps
        The QC table (cells and genes removed by each step, what was left), with a
        final ``highly_variable_genes`` row.
    """
    obs = processed.obs
    kept = obs.groupby(PERTURBATION, observed=True).agg(
        cells_kept=(SPLIT, "size"),
        train=(SPLIT, lambda s: int((s == "train").sum())),
        validation=(SPLIT, lambda s: int((s == "validation").sum())),
        n_perturbed_genes=(N_PERTURBED_GENES, "first"),
    )
    table = cells_raw.set_index(PERTURBATION).join(kept, how="left")
    table[["cells_kept", "train", "validation"]] = table[["cells_kept", "train", "validation"]].fillna(0).astype(int)
    table[IS_CONTROL] = table.index == CONTROL
    min_cells = next((s for s in qc_table["step"] if str(s).startswith("min_cells_per_perturbation=")), None)
    dropped = {
        label
        for text in qc_table.get("perturbations_dropped", pd.Series(dtype=object)).fillna("")
        for label in str(text).split(", ")
        if label
    }
    table["note"] = [
        f"dropped: fewer cells than {min_cells} after QC"
        if label in dropped
        else ("removed by QC" if kept == 0 else "")
        for label, kept in zip(table.index, table["cells_kept"])
    ]
    table = table.reset_index().sort_values([IS_CONTROL, "cells_kept"], ascending=[False, False]).reset_index(drop=True)
    last = qc_table.iloc[-1]
    hvg_row = pd.DataFrame(
        [
            {
                "step": "highly_variable_genes",
                "cells_removed": 0,
                "genes_removed": int(last["genes_left"]) - processed.n_vars,
                "cells_left": processed.n_obs,
                "genes_left": processed.n_vars,
            }
        ]
    )
    return table, pd.concat([qc_table, hvg_row], ignore_index=True)
