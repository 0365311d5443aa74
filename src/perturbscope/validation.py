"""Screen validation: does an AnnData fit its schema, and its standardised copy.

Called by the data_processing pipeline's first node and by the screens registry
(:func:`perturbscope.ops.screens.check_screen_file`) before a retrain starts, so a
bad screen fails with the same message either way.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.blocks import BlockScreen
from perturbscope.schema import CONTROL, PERTURBATION, UNPERTURBED, ScreenSchema, ScreenValidationError

logger = logging.getLogger(__name__)

__all__ = ["validate_screen"]


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
    raise ScreenValidationError(f"{len(dupes)} duplicate {what} name(s), e.g. {shown}. {fix}")


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
            f"Every cell in obs['{key}'] is a control {list(schema.control_labels)}: the screen has no perturbed cells."
        )
    return labels, is_control


def check_counts_in_blocks(screen: BlockScreen, where: str) -> None:
    """The raw-count checks of :func:`validate_screen`, block by block (an error names the cells)."""
    if not np.issubdtype(screen.counts_dtype, np.number):
        raise ScreenValidationError(f"{where} holds {screen.counts_dtype} values, not numbers.")
    for chunk in screen.chunks():
        try:
            _check_counts(chunk.counts, where)
        except ScreenValidationError as err:
            if chunk.start == 0 and chunk.stop == screen.n_obs:
                raise
            raise ScreenValidationError(f"Cells {chunk.start:,}-{chunk.stop - 1:,}: {err}") from None


def _raw_counts(adata: ad.AnnData | BlockScreen, counts_layer: str | None, screen: str) -> BlockScreen:
    """The screen's raw counts (``layers[counts_layer]``, None: ``X``) as a :class:`BlockScreen`."""
    try:
        if isinstance(adata, ad.AnnData):
            return BlockScreen.from_anndata(adata, counts_layer, processed=False)
        if adata.on_disk:
            return adata.raw_counts(counts_layer)
    except (ValueError, KeyError) as err:
        raise ScreenValidationError(f"schema.counts_layer: {err}") from None
    if counts_layer is not None:
        raise ScreenValidationError(
            f"schema.counts_layer is '{counts_layer}' but screen '{screen}' was wrapped in memory with its counts "
            "already chosen: wrap the AnnData itself (BlockScreen.from_anndata(adata, counts_layer))."
        )
    return adata


def validate_screen(adata: ad.AnnData | BlockScreen, schema_params: dict[str, Any], screen: str) -> BlockScreen:
    """Check a screen against its schema and return a standardised copy, read in blocks.

    The copy reads the raw counts (``schema.counts_layer``, else ``X``; float32 CSR blocks) as its
    ``X``, has the perturbation label in ``obs["perturbation"]`` with every control label rewritten as
    ``control``, and the schema in ``uns["perturbscope"]``. The counts are checked block by block (an
    error names the cells).

    Raises
    ------
    ScreenValidationError
        Missing perturbation column (the columns that exist are listed), no control
        cells (the labels present are listed), cells without a label, counts that are
        negative, non-integer, NaN or infinite, duplicate cell or gene names.
    """
    schema = ScreenSchema.from_params(schema_params)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ScreenValidationError(f"Screen '{screen}' is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
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

    where = "X" if schema.counts_layer is None else f"layers['{schema.counts_layer}']"
    raw = _raw_counts(adata, schema.counts_layer, screen)
    check_counts_in_blocks(raw, where)
    obs = adata.obs.copy()
    obs[PERTURBATION] = pd.Categorical(np.where(is_control, CONTROL, labels))
    # the guides of a screen that came with guide counts stay with the cells (each cell's guide UMIs)
    uns = {"guides": copy.deepcopy(dict(adata.uns["guides"]))} if "guides" in adata.uns else {}
    obsm = {"guide_counts": adata.obsm["guide_counts"]} if "guide_counts" in adata.obsm else {}
    # the raw counts' own cells and genes (a screen subset upstream, e.g. by guide calling, keeps its rows)
    out = raw._evolve(obs=obs, var=adata.var.copy(), uns=uns, obsm=obsm, varm={})
    out.uns["perturbscope"] = {
        "screen": screen,
        "schema": {k: v for k, v in schema_params.items() if v is not None},
    }
    return out
