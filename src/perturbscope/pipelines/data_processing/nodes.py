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
import scipy.sparse as sp

from perturbscope.schema import CONTROL, ScreenSchema, ScreenValidationError

logger = logging.getLogger(__name__)

UNKNOWN_PHASE = "unknown"
UNPERTURBED = "unperturbed"
"""The label of every cell of a plain count matrix (``schema.perturbation_key: null``)."""


# --------------------------------------------------------------------------- validation
def _count_values(matrix: Any) -> np.ndarray:
    """The stored values of a count matrix (the non-zeros of a sparse one)."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix).ravel()


def _check_counts(matrix: Any, where: str) -> None:
    values = _count_values(matrix)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number):
        raise ScreenValidationError(f"{where} holds {values.dtype} values, not numbers.")
    finite = np.isfinite(values)
    if not finite.all():
        n_nan = int(np.isnan(values).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ScreenValidationError(
            f"{where} holds {n_nan} NaN and {n_inf} infinite value(s); raw UMI counts must be "
            "finite. Replace them (e.g. with 0) or give the layer with raw counts as "
            "schema.counts_layer."
        )
    negative = values < 0
    if negative.any():
        raise ScreenValidationError(
            f"{where} holds {int(negative.sum())} negative value(s) (smallest "
            f"{values[negative].min():g}); raw UMI counts are >= 0. Is this log-normalised or "
            "scaled data? Point schema.counts_layer at the raw counts."
        )
    fractional = values != np.round(values)
    if fractional.any():
        examples = ", ".join(f"{v:g}" for v in np.unique(values[fractional])[:5])
        raise ScreenValidationError(
            f"{where} holds {int(fractional.sum())} non-integer value(s) (e.g. {examples}); "
            "perturbscope needs raw UMI counts. If X is normalised, point schema.counts_layer "
            "at the layer with raw counts."
        )


def _check_unique(index: pd.Index, what: str, fix: str) -> None:
    if index.is_unique:
        return
    dupes = index[index.duplicated()].unique()
    shown = ", ".join(map(str, dupes[:5]))
    raise ScreenValidationError(
        f"{len(dupes)} duplicate {what} name(s), e.g. {shown}. {fix}"
    )


def _perturbation_labels(adata: ad.AnnData, schema: ScreenSchema) -> tuple[pd.Series, pd.Series]:
    """The cleaned labels and the control mask; errors for missing labels and no controls."""
    key = schema.perturbation_key
    labels = adata.obs[key]
    missing = labels.isna()
    if missing.any():
        raise ScreenValidationError(
            f"{int(missing.sum())} cell(s) have no label in obs['{key}'] (e.g. "
            f"{list(adata.obs_names[missing][:3])}). Label them or remove them."
        )
    labels = labels.astype(str).str.strip()
    empty = labels == ""
    if empty.any():
        raise ScreenValidationError(
            f"{int(empty.sum())} cell(s) have an empty label in obs['{key}'] (e.g. "
            f"{list(adata.obs_names[empty.to_numpy()][:3])}). Give them their perturbation, mark "
            f"them with a control label {list(schema.control_labels)} if they carry a non-targeting "
            "guide, or remove them (e.g. cells with no guide assigned)."
        )
    is_control = labels.str.lower().isin([c.lower() for c in schema.control_labels])
    if not is_control.any():
        counts = labels.value_counts()
        shown = ", ".join(f"'{lab}' ({n})" for lab, n in counts.head(15).items())
        more = f" and {len(counts) - 15} more" if len(counts) > 15 else ""
        raise ScreenValidationError(
            f"No cell matches the control labels {list(schema.control_labels)} in "
            f"obs['{key}']. Labels present: {shown}{more}. Add the label of the "
            "non-targeting cells to schema.control_labels."
        )
    if is_control.all():
        raise ScreenValidationError(
            f"Every cell in obs['{key}'] is a control {list(schema.control_labels)}: the "
            "screen has no perturbed cells."
        )
    return labels, is_control


def validate_screen(
    adata: ad.AnnData, schema_params: dict[str, Any], screen: str
) -> ad.AnnData:
    """Check a screen against its schema and return a standardised copy.

    The copy has raw counts (float32 CSR) in ``X``, the perturbation label in
    ``obs["perturbation"]`` with every control label rewritten as ``control``, and
    the schema in ``uns["perturbscope"]``.

    Raises
    ------
    ScreenValidationError
        Missing perturbation column (the columns that exist are listed), no control
        cells (the labels present are listed), cells without a label, counts that are
        negative, non-integer, NaN or infinite, duplicate cell or gene names.
    """
    schema = ScreenSchema.from_params(schema_params)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ScreenValidationError(
            f"Screen '{screen}' is empty ({adata.n_obs} cells x {adata.n_vars} genes)."
        )
    key = schema.perturbation_key
    if key is None:
        # a plain scRNA count matrix (no perturbations): every cell is "unperturbed"
        logger.info("schema.perturbation_key is null: treating '%s' as a plain count matrix.", screen)
        labels = pd.Series(UNPERTURBED, index=adata.obs_names)
        is_control = pd.Series(False, index=adata.obs_names)
    elif key not in adata.obs.columns:
        raise ScreenValidationError(
            f"Screen '{screen}' has no obs column '{key}' (schema.perturbation_key). "
            f"Columns present: {list(map(str, adata.obs.columns))}. Set "
            "schema.perturbation_key to the column that holds each cell's perturbation."
        )
    else:
        labels, is_control = _perturbation_labels(adata, schema)
    for optional in ("program_key", "batch_key"):
        column = getattr(schema, optional)
        if column is not None and column not in adata.obs.columns:
            raise ScreenValidationError(
                f"schema.{optional} is '{column}' but obs has no such column. Columns "
                f"present: {list(map(str, adata.obs.columns))}. Fix the name or set it to null."
            )
    _check_unique(adata.obs_names, "cell", "Make them unique with adata.obs_names_make_unique().")
    _check_unique(adata.var_names, "gene", "Make them unique with adata.var_names_make_unique().")

    if schema.counts_layer is None:
        counts, where = adata.X, "X"
    elif schema.counts_layer in adata.layers:
        counts, where = adata.layers[schema.counts_layer], f"layers['{schema.counts_layer}']"
    else:
        raise ScreenValidationError(
            f"schema.counts_layer is '{schema.counts_layer}' but the screen's layers are "
            f"{list(adata.layers.keys())}. Set it to the layer with raw counts, or null for X."
        )
    if counts is None:
        raise ScreenValidationError(f"Screen '{screen}' has no matrix in {where}.")
    _check_counts(counts, where)

    out = ad.AnnData(
        X=sp.csr_matrix(counts, dtype=np.float32),
        obs=adata.obs.copy(),
        var=adata.var.copy(),
    )
    out.obs["perturbation"] = pd.Categorical(np.where(is_control, CONTROL, labels))
    out.uns["perturbscope"] = {
        "screen": screen,
        "schema": {k: v for k, v in schema_params.items() if v is not None},
    }
    return out


def count_cells_per_perturbation(adata: ad.AnnData) -> pd.DataFrame:
    """Cells per perturbation label in a validated screen, before QC."""
    counts = adata.obs["perturbation"].value_counts().rename("cells_raw")
    return counts.rename_axis("perturbation").reset_index()


# ------------------------------------------------------------------------------- QC
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
        out._inplace_subset_obs(~out.obs["perturbation"].astype(str).isin(dropped).to_numpy())
        out.obs["perturbation"] = out.obs["perturbation"].cat.remove_unused_categories()
    # not guarded by max_fraction_removed_per_step: a screen of only thin perturbations gets its own error
    record(f"min_cells_per_perturbation={min_per_perturbation}", n_cells, n_genes, guarded=False,
           perturbations_dropped=", ".join(dropped))
    perturbation = out.obs["perturbation"]
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
    labels = adata.obs["perturbation"].astype(str)
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


def normalise(adata: ad.AnnData, params: dict[str, Any]) -> ad.AnnData:
    """Keep raw counts in ``layers["counts"]``; ``normalize_total`` + ``log1p`` in ``X``."""
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


def score_cell_cycle(adata: ad.AnnData, params: dict[str, Any]) -> ad.AnnData:
    """Score S and G2/M programs and call a phase (scanpy ``score_genes_cell_cycle``).

    Gene symbols are matched case-insensitively (so mouse symbols work). When fewer
    than ``min_genes_per_phase`` genes of either list are in the screen, a warning is
    logged and ``phase`` is ``unknown`` with NaN scores. A ``phase`` column the screen
    already had is kept as ``phase_original``.
    """
    out = adata.copy()
    if "phase" in out.obs:
        # keep a phase the screen already carried (e.g. a simulator's ground truth)
        logger.info("obs['phase'] exists; it is kept as obs['phase_original'].")
        out.obs["phase_original"] = out.obs["phase"].copy()
    s_genes, g2m_genes = tirosh_cell_cycle_genes()
    by_upper = {name.upper(): name for name in out.var_names}
    s_present = [by_upper[g.upper()] for g in s_genes if g.upper() in by_upper]
    g2m_present = [by_upper[g.upper()] for g in g2m_genes if g.upper() in by_upper]
    minimum = int(params.get("min_genes_per_phase", 5))
    if len(s_present) < minimum or len(g2m_present) < minimum:
        logger.warning(
            "Only %d S-phase and %d G2/M genes of the Tirosh list are in the screen "
            "(need %d each): cell-cycle phase is marked '%s'.",
            len(s_present), len(g2m_present), minimum, UNKNOWN_PHASE,
        )
        out.obs["S_score"] = np.nan
        out.obs["G2M_score"] = np.nan
        out.obs["phase"] = pd.Categorical([UNKNOWN_PHASE] * out.n_obs)
        return out
    n_bins = int(params.get("n_bins", 25))
    sc.tl.score_genes_cell_cycle(
        out, s_genes=s_present, g2m_genes=g2m_present, n_bins=n_bins,
        random_state=int(params.get("seed", 0)),
    )
    out.obs["phase"] = pd.Categorical(out.obs["phase"])
    out.uns["perturbscope"] = {
        **out.uns.get("perturbscope", {}),
        "cell_cycle_genes_used": {"S": len(s_present), "G2M": len(g2m_present)},
    }
    return out


# ----------------------------------------------------------------------------- HVGs
def select_highly_variable_genes(
    adata: ad.AnnData, params: dict[str, Any], batch_key: str | None = None
) -> ad.AnnData:
    """seurat_v3 highly variable genes on ``layers["counts"]``; subset to them.

    Keeps every gene when the screen has no more than ``n_top_genes``.
    """
    out = adata.copy()
    n_top = int(params["n_top_genes"])
    if out.n_vars <= n_top:
        logger.info("The screen has %d genes (<= n_top_genes=%d): keeping all.", out.n_vars, n_top)
        out.var["highly_variable"] = True
        return out
    sc.pp.highly_variable_genes(
        out, flavor=params.get("flavor", "seurat_v3"), n_top_genes=n_top, layer="counts",
        batch_key=batch_key, span=float(params.get("span", 0.3)),
    )
    return out[:, out.var["highly_variable"].to_numpy()].copy()


# --------------------------------------------------------------------------- labels
def label_cells(
    adata: ad.AnnData, schema_params: dict[str, Any], split_params: dict[str, Any]
) -> ad.AnnData:
    """Add ``is_control``, ``cell_group``, ``perturbed_genes``, ``n_perturbed_genes``, ``split``.

    ``split`` is ``train``/``validation``: within every perturbation (controls
    included) a ``validation_fraction`` share of cells, at least one cell kept for
    training, drawn with ``seed`` — the same screen and seed give the same split.
    """
    schema = ScreenSchema.from_params(schema_params)
    out = adata.copy()
    labels = out.obs["perturbation"].astype(str)
    genes = labels.map(lambda label: () if label == UNPERTURBED else schema.parse(label))
    out.obs["is_control"] = (labels == CONTROL).to_numpy()
    out.obs["cell_group"] = pd.Categorical(
        np.where(out.obs["is_control"], "control", "target"), categories=["control", "target"]
    )
    out.obs["perturbed_genes"] = genes.map(lambda g: schema.double_separator.join(g)).to_numpy()
    out.obs["n_perturbed_genes"] = genes.map(len).astype(np.int64).to_numpy()

    fraction = float(split_params.get("validation_fraction", 0.1))
    if not 0.0 <= fraction < 1.0:
        raise ScreenValidationError(
            f"data_processing.split.validation_fraction must be in [0, 1), got {fraction}."
        )
    rng = np.random.default_rng(int(split_params.get("seed", 0)))
    split = np.full(out.n_obs, "train", dtype=object)
    codes = labels.to_numpy()
    for label in sorted(np.unique(codes)):
        members = np.flatnonzero(codes == label)
        n_val = min(int(round(fraction * members.size)), members.size - 1)
        if n_val > 0:
            split[rng.choice(members, size=n_val, replace=False)] = "validation"
    out.obs["split"] = pd.Categorical(split, categories=["train", "validation"])
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
    kept = obs.groupby("perturbation", observed=True).agg(
        cells_kept=("split", "size"),
        train=("split", lambda s: int((s == "train").sum())),
        validation=("split", lambda s: int((s == "validation").sum())),
        n_perturbed_genes=("n_perturbed_genes", "first"),
    )
    table = cells_raw.set_index("perturbation").join(kept, how="left")
    table[["cells_kept", "train", "validation"]] = (
        table[["cells_kept", "train", "validation"]].fillna(0).astype(int)
    )
    table["is_control"] = table.index == CONTROL
    min_cells = next((s for s in qc_table["step"] if str(s).startswith("min_cells_per_perturbation=")), None)
    dropped = {
        label for text in qc_table.get("perturbations_dropped", pd.Series(dtype=object)).fillna("")
        for label in str(text).split(", ") if label
    }
    table["note"] = [
        f"dropped: fewer cells than {min_cells} after QC" if label in dropped
        else ("removed by QC" if kept == 0 else "")
        for label, kept in zip(table.index, table["cells_kept"])
    ]
    table = table.reset_index().sort_values(
        ["is_control", "cells_kept"], ascending=[False, False]
    ).reset_index(drop=True)
    last = qc_table.iloc[-1]
    hvg_row = pd.DataFrame(
        [{
            "step": "highly_variable_genes",
            "cells_removed": 0,
            "genes_removed": int(last["genes_left"]) - processed.n_vars,
            "cells_left": processed.n_obs,
            "genes_left": processed.n_vars,
        }]
    )
    return table, pd.concat([qc_table, hvg_row], ignore_index=True)
