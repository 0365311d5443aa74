"""What every model shares between an AnnData screen and its torch module: raw counts, genes,
batches, and the one path from parameters to hyperparameters and a :class:`TrainConfig`.

Each function takes the caller's error class (and a hint) so its messages name the
model's parameter section and the fix.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.models.data import CellData, RowsOf, StreamingCellData
from perturbscope.models.training import TrainConfig, resolve_device
from perturbscope.ondisk import OnDiskScreen, is_on_disk
from perturbscope.schema import COUNTS_LAYER

logger = logging.getLogger(__name__)

BATCH_OBS_KEY = "batch"
"""Name of the batch-code entry in ``CellData.obs`` (the models' ``batch_key``)."""

# Model arguments the pipelines set themselves (from the screen), not from parameters.
DERIVED_MODEL_ARGS = frozenset({"n_genes", "n_batch", "batch_key", "library_log_mean", "library_log_var"})


def raw_counts(
    adata: ad.AnnData,
    counts_layer: str | None = None,
    error: type[ValueError] = ValueError,
    hint: str = "",
) -> sp.csr_matrix:
    """``layers[counts_layer]``, else ``layers["counts"]``, else ``X``, as float32 CSR.

    Raises ``error`` (with ``hint`` appended) when the layer is missing or the
    values are not raw UMI counts (negative, non-integer or non-finite).
    """
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            raise error(
                f"The screen has no layer '{counts_layer}' (layers: {list(adata.layers)}). "
                "Pass the layer holding raw UMI counts, or None to use layers['counts'] / X."
            )
        matrix, where = adata.layers[counts_layer], f"layers['{counts_layer}']"
    elif COUNTS_LAYER in adata.layers:
        matrix, where = adata.layers[COUNTS_LAYER], "layers['counts']"
    else:
        matrix, where = adata.X, "X"
    csr = sp.csr_matrix(matrix, dtype=np.float32)
    values = csr.data
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or np.any(values != np.round(values))):
        raise error(
            f"{where} does not hold raw UMI counts (negative, non-integer or non-finite values). {hint}".rstrip()
        )
    return csr


def align_counts(
    counts: sp.csr_matrix,
    var_names: pd.Index,
    genes: list[str],
    error: type[ValueError],
    fill_missing: bool | None = False,
) -> sp.csr_matrix:
    """``counts`` (cells x ``var_names``) with columns reordered to the model's ``genes`` (by name).

    Extra genes are dropped. Genes the screen lacks raise ``error`` naming them, or
    with ``fill_missing=True`` become zero columns (logged). ``fill_missing=None``:
    the caller offers no such option (the message then does not suggest it).
    """
    names = pd.Index(pd.Index(var_names).astype(str))
    if not names.is_unique:
        dupes = names[names.duplicated()].unique()[:5].tolist()
        raise error(f"The screen has duplicate gene names (e.g. {dupes}); run adata.var_names_make_unique() first.")
    position = names.get_indexer(pd.Index(genes))
    missing = [g for g, p in zip(genes, position) if p < 0]
    if missing and not fill_missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        option = (
            "" if fill_missing is None else ", or pass fill_missing=True to treat them as zero counts (less accurate)"
        )
        raise error(
            f"{len(missing)} of the model's {len(genes)} genes are missing from the screen: {shown}. "
            "The model reads cells by these genes (matched by name in var_names): give a screen that "
            f"measures them (same gene naming, e.g. symbols vs Ensembl ids){option}."
        )
    counts = counts.tocsc()
    if missing:
        logger.warning("%d of %d model genes missing from the screen are filled with zeros.", len(missing), len(genes))
        columns = [counts[:, p] if p >= 0 else sp.csc_matrix((counts.shape[0], 1), dtype=np.float32) for p in position]
        return sp.hstack(columns, format="csr", dtype=np.float32)
    return counts[:, position].tocsr()


def batch_codes(
    obs: pd.DataFrame, batch_key: str | None, categories: list[str] | None, error: type[ValueError]
) -> np.ndarray | None:
    """Integer codes of ``obs[batch_key]`` in ``categories`` (the training categories); None without a key."""
    if not batch_key:
        return None
    if batch_key not in obs.columns:
        raise error(
            f"Batch covariate '{batch_key}' is not an obs column of the screen (columns: "
            f"{list(map(str, obs.columns))}); fix schema.batch_key or set it to null."
        )
    values = obs[batch_key].astype(str)
    categories = list(categories or [])
    unknown = sorted(set(values) - set(categories))
    if unknown:
        raise error(
            f"Batch value(s) {unknown[:10]} in obs['{batch_key}'] were not seen in training "
            f"(known: {categories}). A batch-aware model can only read known batches."
        )
    return pd.Categorical(values, categories=categories).codes.astype(np.int64)


def training_batches(
    screen: ad.AnnData, batch_key: str | None, error: type[ValueError]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """The batch categories of a training screen and the ``CellData.obs`` entry holding their codes."""
    if not batch_key:
        return [], {}
    if batch_key not in screen.obs:
        raise error(f"schema.batch_key is '{batch_key}' but the screen's obs has no such column.")
    categories = sorted(map(str, screen.obs[batch_key].astype(str).unique()))
    return categories, {BATCH_OBS_KEY: batch_codes(screen.obs, batch_key, categories, error)}


def screen_metadata(screen: ad.AnnData, batch_key: str | None, categories: list[str]) -> dict[str, Any]:
    """What a trained model records about its screen, read back by :func:`model_cell_data`."""
    return {
        "genes": [str(g) for g in screen.var_names],
        "counts_layer": COUNTS_LAYER,
        "batch_key": batch_key or None,
        "batch_categories": categories,
        "screen": str((screen.uns.get("perturbscope") or {}).get("screen", "")),
    }


def model_cell_data(
    model: Any,
    adata: ad.AnnData,
    error: type[ValueError],
    hint: str,
    counts_layer: str | None = None,
    fill_missing: bool | None = False,
) -> CellData:
    """A screen's counts as :class:`CellData` for a trained model: its genes, in order, and its batches.

    Genes come from ``model.metadata["genes"]`` (matched by name), batch categories
    from ``model.metadata``; the data lands on the model's device.
    """
    meta = getattr(model, "metadata", None) or {}
    genes = meta.get("genes")
    if genes is None and adata.n_vars != model.n_genes:
        raise error(
            f"The model has no gene names in its metadata and expects {model.n_genes} genes; "
            f"the screen has {adata.n_vars}. Train it with this pipeline (which records gene names)."
        )
    obs = {}
    if getattr(model, "n_batch", 0):
        codes = batch_codes(adata.obs, meta.get("batch_key"), meta.get("batch_categories"), error)
        if codes is None:
            raise error("The model uses a batch covariate but its metadata names no batch_key.")
        obs[BATCH_OBS_KEY] = codes
    if is_on_disk(adata):  # its blocks stream to the model's device
        reader = AlignedRows(adata, genes, error, fill_missing)
        block = int((meta.get("train_config") or {}).get("stream_block_size") or 16384)
        return StreamingCellData(reader, adata.n_obs, reader.n_genes, obs=obs, device=model.device, block_size=block)
    counts = raw_counts(adata, counts_layer, error, hint)
    if genes is not None:
        counts = align_counts(counts, adata.var_names, list(genes), error, fill_missing)
    return CellData(counts, obs=obs, device=model.device)


def training_cells(
    screen: ad.AnnData | OnDiskScreen,
    obs: dict[str, np.ndarray],
    config: TrainConfig,
    error: type[ValueError],
    hint: str,
) -> CellData | StreamingCellData:
    """A training screen's raw counts: on the training device as :class:`CellData` (the fast path),
    or as :class:`StreamingCellData` read block by block when the screen is read from disk or its
    counts exceed ``config.memory_budget_gb``. The choice is logged."""
    device = resolve_device(config.device)
    block = int(config.stream_block_size)
    if is_on_disk(screen):
        logger.info(
            "The screen (%s cells) is read from disk: training streams its counts in blocks of %s cells.",
            f"{screen.n_obs:,}",
            f"{block:,}",
        )
        return StreamingCellData(
            screen.read_rows, screen.n_obs, screen.n_vars, obs=obs, device=device, block_size=block
        )
    counts = raw_counts(screen, None, error, hint)
    need = counts.nnz * 16 + counts.shape[0] * 16  # device CSR: int64 index + value + lgamma, per-cell terms
    budget = config.memory_budget_gb
    if budget is None or need <= float(budget) * 1e9:
        return CellData(counts, obs=obs, device=device)
    logger.info(
        "The counts would take %.2f GB on %s, above training.memory_budget_gb=%s: they stream to it in blocks "
        "of %s cells.",
        need / 1e9,
        device,
        budget,
        f"{block:,}",
    )
    return StreamingCellData(RowsOf(counts), counts.shape[0], counts.shape[1], obs=obs, device=device, block_size=block)


class AlignedRows:
    """``read_rows`` of a screen read from disk, columns reordered to a model's genes."""

    def __init__(
        self, screen: OnDiskScreen, genes: list[str] | None, error: type[ValueError], fill_missing: bool | None
    ) -> None:
        self.screen, self.error, self.fill_missing = screen, error, fill_missing
        same = genes is None or list(map(str, screen.var_names)) == list(genes)
        self.genes = None if same else list(genes)
        self.n_genes = screen.n_vars if self.genes is None else len(self.genes)
        if self.genes is not None:  # check the names once, on an empty block
            align_counts(
                sp.csr_matrix((0, screen.n_vars), dtype=np.float32), screen.var_names, self.genes, error, fill_missing
            )

    def __call__(self, start: int, stop: int) -> sp.csr_matrix:
        counts = self.screen.read_rows(start, stop)
        if self.genes is None:
            return counts
        return align_counts(counts, self.screen.var_names, self.genes, self.error, self.fill_missing)


def model_kwargs(
    model_cls: type, params: Mapping[str, Any] | None, section: str, error: type[ValueError]
) -> dict[str, Any]:
    """``params`` checked against ``model_cls``'s arguments (those set from the screen excluded)."""
    allowed = set(inspect.signature(model_cls.__init__).parameters) - {"self"} - DERIVED_MODEL_ARGS
    params = dict(params or {})
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise error(
            f"Unknown {section} parameter(s) {unknown}; allowed: {sorted(allowed)} "
            "(the number of genes and batches come from the screen)."
        )
    return params


def train_config(
    params: Mapping[str, Any] | None,
    seed: int,
    section: str,
    error: type[ValueError],
    shared: Mapping[str, Any] | None = None,
) -> tuple[TrainConfig, int, int]:
    """``(TrainConfig, batch_size, validation_batch_size)`` from a model's ``training`` parameters.

    ``shared`` is the project-wide ``training`` block (``conf/base/parameters.yml``); a
    model's own ``<pipeline>.training`` keys override it key by key. ``seed`` (the one
    ``seed`` parameter) is used unless the merged settings name their own.
    """
    params = {**dict(shared or {}), **dict(params or {})}
    allowed = set(TrainConfig.__dataclass_fields__) | {"batch_size", "validation_batch_size"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise error(f"Unknown {section} parameter(s) {unknown}; allowed: {sorted(allowed)}.")
    batch_size = params.pop("batch_size", 128)
    val_batch_size = params.pop("validation_batch_size", 1024)
    for name, value in (("batch_size", batch_size), ("validation_batch_size", val_batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise error(f"{section}.{name} must be a positive integer, got {value!r}.")
    params.setdefault("seed", seed)
    try:
        config = TrainConfig(**params)
    except (TypeError, ValueError) as err:
        raise error(f"{section}: {err}") from None
    return config, int(batch_size), int(val_batch_size)
