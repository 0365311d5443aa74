"""Nodes of the data_processing pipeline.

Every node is a pure function over a :class:`~perturbscope.blocks.BlockScreen` (an AnnData is wrapped on
the way in, never copied or changed): a screen in memory and one read from disk run the same code, block
by block (:mod:`.blockwise`, :mod:`.qc`). Each parameter block of
``conf/base/parameters_data_processing.yml`` is the keyword arguments of one function, whose signature owns
the defaults. The processed screen is written block by block when the catalog saves it
(``BlockScreen.to_memory()`` gives an AnnData in Python).
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from perturbscope import guides
from perturbscope.blocks import BlockScreen, as_block_screen
from perturbscope.parameters import options
from perturbscope.schema import (
    CELL_GROUP,
    CONTROL,
    IS_CONTROL,
    N_PERTURBED_GENES,
    PERTURBATION,
    PERTURBED_GENES,
    PHASE,
    SPLIT,
    UNPERTURBED,
    ScreenSchema,
    ScreenValidationError,
)
from perturbscope.validation import validate_screen as _validate

from . import blockwise, guide_calling, qc

logger = logging.getLogger(__name__)

__all__ = [
    "call_guides",
    "count_cells_per_perturbation",
    "label_cells",
    "normalise",
    "quality_control",
    "score_cell_cycle",
    "select_highly_variable_genes",
    "summarise_screen",
    "tirosh_cell_cycle_genes",
    "validate_screen",
]

SECTION = "data_processing"


def call_guides(
    screen: ad.AnnData | BlockScreen, params: dict[str, Any], schema_params: dict[str, Any]
) -> tuple[BlockScreen, pd.DataFrame, pd.DataFrame]:
    """Which guides each cell carries, from its guide UMI counts, and its label; a screen whose cells already
    carry labels passes unchanged (:func:`.guide_calling.call_guides`)."""
    schema = ScreenSchema.from_params(schema_params)
    settings = options(guide_calling.call_guides, params, f"{SECTION}.guides", exclude={"screen", "schema"})
    try:
        return guide_calling.call_guides(as_block_screen(screen), schema, **settings)
    except guides.GuideInputError as err:
        raise ScreenValidationError(str(err)) from None


def validate_screen(adata: ad.AnnData | BlockScreen, schema_params: dict[str, Any], screen: str) -> BlockScreen:
    """Check a screen against its schema (:func:`perturbscope.validation.validate_screen`)."""
    return _validate(adata, schema_params, screen)


def count_cells_per_perturbation(adata: ad.AnnData | BlockScreen) -> pd.DataFrame:
    """Cells per perturbation label in a validated screen, before QC."""
    counts = adata.obs[PERTURBATION].value_counts().rename("cells_raw")
    return counts.rename_axis(PERTURBATION).reset_index()


def quality_control(screen: ad.AnnData | BlockScreen, params: dict[str, Any]) -> tuple[BlockScreen, pd.DataFrame]:
    """Cell, gene and thin-perturbation filters with guards (:func:`.qc.quality_control`)."""
    return qc.quality_control(screen, **options(qc.quality_control, params, f"{SECTION}.qc", exclude={"screen"}))


def _normalise(screen: BlockScreen, target_sum: float | None = 10_000) -> BlockScreen:
    library = qc.library_sizes(screen)
    if target_sum is None:  # scanpy: the median of the cells' totals (cells with counts)
        target_sum = float(np.median(library[library > 0]))
    out = screen.with_normalisation(library, target_sum)
    out.uns = {**out.uns, "log1p": {"base": None}}  # as sc.pp.log1p records it
    return out


def normalise(screen: ad.AnnData | BlockScreen, params: dict[str, Any]) -> BlockScreen:
    """``X = log1p(counts / total * target_sum)`` per cell (scanpy's ``normalize_total`` + ``log1p``; null
    ``target_sum``: the median total); the raw counts stay and are written to ``layers["counts"]``. One pass
    for the totals; the normalised values are computed block by block when they are read or written."""
    return _normalise(
        as_block_screen(screen), **options(_normalise, params, f"{SECTION}.normalisation", exclude={"screen"})
    )


# ------------------------------------------------------------------------ cell cycle
def tirosh_cell_cycle_genes() -> tuple[list[str], list[str]]:
    """The Tirosh et al. 2016 S-phase (first 43) and G2/M (last 54) genes."""
    text = files("perturbscope.resources").joinpath("cell_cycle_genes_tirosh2016.txt").read_text()
    genes = [line.strip() for line in text.splitlines() if line.strip()]
    return genes[:43], genes[43:]


def _cell_cycle(screen: BlockScreen, seed: int, min_genes_per_phase: int = 5, n_bins: int = 25) -> BlockScreen:
    out = screen.copy()
    if PHASE in out.obs:  # keep a phase the screen already carried (e.g. a simulator's ground truth)
        logger.info("obs['phase'] exists; it is kept as obs['phase_original'].")
        out.obs["phase_original"] = out.obs[PHASE].copy()
    s_genes, g2m_genes = tirosh_cell_cycle_genes()
    by_upper = {name.upper(): name for name in out.var_names}
    s_present = [by_upper[g.upper()] for g in s_genes if g.upper() in by_upper]
    g2m_present = [by_upper[g.upper()] for g in g2m_genes if g.upper() in by_upper]
    if len(s_present) < min_genes_per_phase or len(g2m_present) < min_genes_per_phase:
        logger.warning(
            "Only %d S-phase and %d G2/M genes of the Tirosh list are in the screen (need %d each): cell-cycle "
            "phase is marked 'unknown'.",
            len(s_present),
            len(g2m_present),
            min_genes_per_phase,
        )
        scores = blockwise.unknown_phase(out.obs_names)
    else:
        scores = blockwise.score_cell_cycle(out, s_present, g2m_present, int(n_bins), int(seed))
        out.uns["perturbscope"] = {
            **out.uns.get("perturbscope", {}),
            "cell_cycle_genes_used": {"S": len(s_present), "G2M": len(g2m_present)},
        }
    for column, values in scores.items():
        out.obs[column] = values
    out.obs[PHASE] = pd.Categorical(out.obs[PHASE])
    return out


def score_cell_cycle(screen: ad.AnnData | BlockScreen, params: dict[str, Any], seed: int = 0) -> BlockScreen:
    """S and G2/M scores and a phase per cell, as scanpy's ``score_genes_cell_cycle`` computes them.

    Gene symbols are matched case-insensitively (so mouse symbols work). With fewer than
    ``min_genes_per_phase`` genes of either list in the screen, a warning is logged and ``phase`` is
    ``unknown`` with NaN scores. A ``phase`` column the screen already had is kept as ``phase_original``.
    """
    settings = options(_cell_cycle, params, f"{SECTION}.cell_cycle", exclude={"screen", "seed"})
    return _cell_cycle(as_block_screen(screen), seed, **settings)


# ----------------------------------------------------------------------------- HVGs
def _hvg(
    screen: BlockScreen,
    batch_key: str | None,
    n_top_genes: int = 2000,
    span: float = 0.3,
    keep_perturbed_genes: bool = True,
    separator: str = "+",
) -> BlockScreen:
    out = screen.copy()
    if out.n_vars <= n_top_genes:
        logger.info("The screen has %d genes (<= n_top_genes=%d): keeping all.", out.n_vars, n_top_genes)
        out.var["highly_variable"] = True
        return out
    batch = None if not batch_key else out.obs[batch_key].astype(str).to_numpy()
    table = blockwise.seurat_v3(out, int(n_top_genes), float(span), batch)
    for column, values in table.items():
        out.var[column] = values.to_numpy()
    out.uns["hvg"] = {"flavor": "seurat_v3"}
    keep = out.var["highly_variable"].to_numpy().copy()
    if keep_perturbed_genes and PERTURBATION in out.obs:
        perturbed = {
            gene for label in out.obs[PERTURBATION].astype(str).unique() for gene in label.split(separator) if gene
        }
        extra = np.isin(out.var_names.astype(str), sorted(perturbed)) & ~keep
        if extra.any():
            logger.info("%d perturbed gene(s) kept beside the highly variable genes.", int(extra.sum()))
        out.var["perturbed_gene"] = np.isin(out.var_names.astype(str), sorted(perturbed))
        keep |= extra
    return out.subset(genes=keep)


def select_highly_variable_genes(
    screen: ad.AnnData | BlockScreen, params: dict[str, Any], batch_key: str | None = None, separator: str = "+"
) -> BlockScreen:
    """seurat_v3 highly variable genes on the raw counts (per batch with ``batch_key``); subset to them.

    Keeps every gene when the screen has no more than ``n_top_genes``, and with ``keep_perturbed_genes`` the
    perturbations' own genes measured in the panel (labels split on ``separator``; ``var["perturbed_gene"]``),
    so the knockdown check can read them. Two passes over the blocks give scanpy's ranking
    (:func:`.blockwise.seurat_v3`).
    """
    settings = options(_hvg, params, f"{SECTION}.hvg", exclude={"screen", "batch_key", "separator"})
    return _hvg(as_block_screen(screen), batch_key, separator=separator, **settings)


# --------------------------------------------------------------------------- labels
def _split(labels: np.ndarray, seed: int, validation_fraction: float = 0.1) -> np.ndarray:
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ScreenValidationError(
            f"{SECTION}.split.validation_fraction must be in [0, 1), got {validation_fraction}."
        )
    rng = np.random.default_rng(int(seed))
    split = np.full(labels.size, "train", dtype=object)
    for label in sorted(np.unique(labels)):
        members = np.flatnonzero(labels == label)
        n_val = min(int(round(float(validation_fraction) * members.size)), members.size - 1)
        if n_val > 0:
            split[rng.choice(members, size=n_val, replace=False)] = "validation"
    return split


def label_cells(
    screen: ad.AnnData | BlockScreen, schema_params: dict[str, Any], split_params: dict[str, Any], seed: int = 0
) -> BlockScreen:
    """Add ``is_control``, ``cell_group``, ``perturbed_genes``, ``n_perturbed_genes``, ``split``.

    ``split`` is ``train``/``validation``: within every perturbation (controls included) a
    ``validation_fraction`` share of cells, at least one cell kept for training, drawn with ``seed`` — the
    same screen and seed give the same split.
    """
    schema = ScreenSchema.from_params(schema_params)
    out = as_block_screen(screen).copy()
    labels = out.obs[PERTURBATION].astype(str)
    genes = labels.map(lambda label: () if label == UNPERTURBED else schema.parse(label))
    out.obs[IS_CONTROL] = (labels == CONTROL).to_numpy()
    out.obs[CELL_GROUP] = pd.Categorical(
        np.where(out.obs[IS_CONTROL], "control", "target"), categories=["control", "target"]
    )
    out.obs[PERTURBED_GENES] = genes.map(lambda g: schema.double_separator.join(g)).to_numpy()
    out.obs[N_PERTURBED_GENES] = genes.map(len).astype(np.int64).to_numpy()
    split = _split(
        labels.to_numpy(), seed, **options(_split, split_params, f"{SECTION}.split", exclude={"labels", "seed"})
    )
    out.obs[SPLIT] = pd.Categorical(split, categories=["train", "validation"])
    return out


# -------------------------------------------------------------------------- summary
def summarise_screen(
    cells_raw: pd.DataFrame,
    processed: ad.AnnData | BlockScreen,
    qc_table: pd.DataFrame,
    guide_steps: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The screen summary: cells per perturbation before/after QC, and the QC steps.

    Returns
    -------
    per_perturbation
        One row per perturbation: ``cells_raw``, ``cells_kept``, ``train``, ``validation``, ``is_control``,
        ``n_perturbed_genes``, ``note``.
    qc_steps
        The QC table (cells and genes removed by each step, what was left), after the guide-calling steps
        (cells with no guide, multiplets) when the screen came with guide counts, with a final
        ``highly_variable_genes`` row.
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
        label for text in qc_table["perturbations_dropped"].fillna("") for label in str(text).split(", ") if label
    }
    table["note"] = [
        f"dropped: fewer cells than {min_cells} after QC"
        if label in dropped
        else ("removed by QC" if kept == 0 else "")
        for label, kept in zip(table.index, table["cells_kept"], strict=True)
    ]
    table = table.reset_index().sort_values([IS_CONTROL, "cells_kept"], ascending=[False, False]).reset_index(drop=True)
    last = qc_table.iloc[-1]
    hvg = {"step": "highly_variable_genes", "cells_removed": 0, "cells_left": processed.n_obs}
    hvg_row = pd.DataFrame([{**hvg, "genes_removed": int(last["genes_left"]) - processed.n_vars,
                             "genes_left": processed.n_vars}])  # fmt: skip
    parts = [qc_table, hvg_row]
    if guide_steps is not None and len(guide_steps):
        parts.insert(0, guide_steps.reindex(columns=qc_table.columns))
    return table, pd.concat(parts, ignore_index=True)
