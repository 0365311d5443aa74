"""What every model class shares between an AnnData screen and its torch module: raw counts, genes,
batches, and the cells a model trains on (in memory, or streamed block by block).

Bad input raises :class:`ModelInputError`, whose message names the problem (the column, the layer,
the genes) and the fix.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.blocks import BlockScreen, is_on_disk
from perturbscope.models.data import CellData, StreamingCellData, device_bytes, resident_or_streamed, value_chunks
from perturbscope.models.runtime import resolve_device
from perturbscope.schema import COUNTS_LAYER

logger = logging.getLogger(__name__)

__all__ = [
    "BATCH_OBS_KEY",
    "ModelInputError",
    "align_counts",
    "batch_codes",
    "model_cell_data",
    "raw_counts",
    "readable",
    "screen_metadata",
    "training_batches",
    "training_cells",
]

BATCH_OBS_KEY = "batch"
"""Name of the batch-code entry in ``CellData.obs`` (the models' ``batch_key``)."""


class ModelInputError(ValueError):
    """A screen a model class cannot read (no raw counts, missing genes, unknown batches...); the
    message names the problem and the fix."""


def readable(screen: ad.AnnData | BlockScreen) -> ad.AnnData | BlockScreen:
    """What a model reads: an AnnData, or a :class:`~perturbscope.blocks.BlockScreen` read from disk (which
    streams); a BlockScreen held in memory (data_processing's output in Python) becomes an AnnData."""
    if isinstance(screen, BlockScreen) and not screen.on_disk:
        return screen.to_memory()
    return screen


def annotated_copy(screen: ad.AnnData | BlockScreen) -> ad.AnnData | BlockScreen:
    """A new screen for results to be added to: copies of the annotations (obs, var, uns and the obsm /
    varm / obsp mappings) around the *same* count matrices (X and layers are not copied: nothing that adds
    an embedding writes to them), so embedding a large screen does not hold its counts twice."""
    if isinstance(screen, BlockScreen) or screen.is_view:
        return screen.copy()
    return ad.AnnData(
        X=screen.X,
        obs=screen.obs.copy(),
        var=screen.var.copy(),
        uns=copy.deepcopy(dict(screen.uns)),
        obsm=dict(screen.obsm),
        varm=dict(screen.varm),
        obsp=dict(screen.obsp),
        varp=dict(screen.varp),
        layers=dict(screen.layers),
    )


def raw_counts(adata: ad.AnnData, counts_layer: str | None = None, hint: str = "") -> sp.csr_matrix:
    """``layers[counts_layer]``, else ``layers["counts"]``, else ``X``, as float32 CSR.

    Raises :class:`ModelInputError` (with ``hint`` appended) when the layer is missing or the values are
    not raw UMI counts (negative, non-integer or non-finite).
    """
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            raise ModelInputError(
                f"The screen has no layer '{counts_layer}' (layers: {list(adata.layers)}). "
                "Pass the layer holding raw UMI counts, or None to use layers['counts'] / X."
            )
        matrix, where = adata.layers[counts_layer], f"layers['{counts_layer}']"
    elif COUNTS_LAYER in adata.layers:
        matrix, where = adata.layers[COUNTS_LAYER], "layers['counts']"
    else:
        matrix, where = adata.X, "X"
    csr = sp.csr_matrix(matrix, dtype=np.float32)  # the same arrays when they already are float32 CSR
    values = csr.data
    for part in value_chunks(values):
        if not np.all(np.isfinite(part)) or part.min() < 0 or np.any(part != np.round(part)):
            raise ModelInputError(
                f"{where} does not hold raw UMI counts (negative, non-integer or non-finite values). {hint}".rstrip()
            )
    return csr


def align_counts(
    counts: sp.csr_matrix, var_names: pd.Index, genes: list[str], fill_missing: bool | None = False
) -> sp.csr_matrix:
    """``counts`` (cells x ``var_names``) with columns reordered to the model's ``genes`` (by name).

    Extra genes are dropped. Genes the screen lacks raise :class:`ModelInputError` naming them, or with
    ``fill_missing=True`` become zero columns (logged). ``fill_missing=None``: the caller offers no such
    option (the message then does not suggest it).
    """
    names = pd.Index(pd.Index(var_names).astype(str))
    if not names.is_unique:
        dupes = names[names.duplicated()].unique()[:5].tolist()
        raise ModelInputError(f"The screen has duplicate gene names (e.g. {dupes}); run adata.var_names_make_unique().")
    position = names.get_indexer(pd.Index(genes))
    missing = [g for g, p in zip(genes, position, strict=True) if p < 0]
    if missing and not fill_missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        option = (
            "" if fill_missing is None else ", or pass fill_missing=True to treat them as zero counts (less accurate)"
        )
        raise ModelInputError(
            f"{len(missing)} of the model's {len(genes)} genes are missing from the screen: {shown}. "
            "The model reads cells by these genes (matched by name in var_names): give a screen that "
            f"measures them (same gene naming, e.g. symbols vs Ensembl ids){option}."
        )
    if not missing and np.array_equal(position, np.arange(names.size)):
        return counts  # the model's genes, in its order: nothing to reorder (no copy)
    counts = counts.tocsc()
    if missing:
        logger.warning("%d of %d model genes missing from the screen are filled with zeros.", len(missing), len(genes))
        columns = [counts[:, p] if p >= 0 else sp.csc_matrix((counts.shape[0], 1), dtype=np.float32) for p in position]
        return sp.hstack(columns, format="csr", dtype=np.float32)
    return counts[:, position].tocsr()


def batch_codes(obs: pd.DataFrame, batch_key: str | None, categories: list[str] | None) -> np.ndarray | None:
    """Integer codes of ``obs[batch_key]`` in ``categories`` (the training categories); None without a key."""
    if not batch_key:
        return None
    if batch_key not in obs.columns:
        raise ModelInputError(
            f"The batch column '{batch_key}' is not in the screen's obs (columns: {list(map(str, obs.columns))}); "
            "pass the column that holds each cell's batch, or none."
        )
    values = obs[batch_key].astype(str)
    categories = list(categories or [])
    unknown = sorted(set(values) - set(categories))
    if unknown:
        raise ModelInputError(
            f"Batch value(s) {unknown[:10]} in obs['{batch_key}'] were not seen in training "
            f"(known: {categories}). A batch-aware model can only read known batches."
        )
    return pd.Categorical(values, categories=categories).codes.astype(np.int64)


def training_batches(
    screen: ad.AnnData | BlockScreen, batch_key: str | None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """The batch categories of a training screen and the ``CellData.obs`` entry holding their codes."""
    if not batch_key:
        return [], {}
    if batch_key not in screen.obs:
        raise ModelInputError(
            f"batch_key is '{batch_key}' but the screen's obs has no such column (columns: "
            f"{list(map(str, screen.obs.columns))})."
        )
    categories = sorted(map(str, screen.obs[batch_key].astype(str).unique()))
    return categories, {BATCH_OBS_KEY: batch_codes(screen.obs, batch_key, categories)}


def screen_metadata(screen: ad.AnnData | BlockScreen, batch_key: str | None, categories: list[str]) -> dict[str, Any]:
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
    adata: ad.AnnData | BlockScreen,
    hint: str,
    counts_layer: str | None = None,
    fill_missing: bool | None = False,
) -> CellData | StreamingCellData:
    """A screen's counts for a trained model: its genes, in order, and its batches, on its device.

    Genes come from ``model.metadata["genes"]`` (matched by name), batch categories from
    ``model.metadata``. A screen read from disk streams block by block.
    """
    adata = readable(adata)
    meta = getattr(model, "metadata", None) or {}
    genes = meta.get("genes")
    if genes is None and adata.n_vars != model.n_genes:
        raise ModelInputError(
            f"The model has no gene names in its metadata and expects {model.n_genes} genes; "
            f"the screen has {adata.n_vars}. Train it with this package (which records gene names)."
        )
    obs = {}
    if getattr(model, "n_batch", 0):
        codes = batch_codes(adata.obs, meta.get("batch_key"), meta.get("batch_categories"))
        if codes is None:
            raise ModelInputError("The model uses a batch covariate but its metadata names no batch_key.")
        obs[BATCH_OBS_KEY] = codes
    if is_on_disk(adata):  # its blocks stream to the model's device
        reader = AlignedRows(adata, genes, fill_missing)
        block = int((meta.get("train_config") or {}).get("stream_block_size") or 16384)
        return StreamingCellData(reader, adata.n_obs, reader.n_genes, obs=obs, device=model.device, block_size=block)
    counts = raw_counts(adata, counts_layer, hint)
    if genes is not None:
        counts = align_counts(counts, adata.var_names, list(genes), fill_missing)
    return CellData(counts, obs=obs, device=model.device)


def training_cells(
    screen: ad.AnnData | BlockScreen,
    obs: dict[str, np.ndarray],
    device: str,
    memory_budget_gb: float | None,
    block_size: int,
    hint: str,
) -> CellData | StreamingCellData:
    """A training screen's raw counts: on the training device as :class:`CellData` (the fast path), or
    as :class:`StreamingCellData` read block by block when the screen is read from disk or its counts
    exceed ``memory_budget_gb``. The choice is logged."""
    target = resolve_device(device)
    screen = readable(screen)
    if is_on_disk(screen):
        logger.info(
            "The screen (%s cells) is read from disk: training streams its counts in blocks of %s cells.",
            f"{screen.n_obs:,}",
            f"{block_size:,}",
        )
        return StreamingCellData(
            screen.read_rows, screen.n_obs, screen.n_vars, obs=obs, device=target, block_size=block_size
        )
    counts = raw_counts(screen, None, hint)
    data = resident_or_streamed(counts, obs, target, memory_budget_gb, block_size)
    if isinstance(data, StreamingCellData):
        logger.info(
            "The counts would take %.2f GB on %s, above memory_budget_gb=%s: they stream to it in blocks of %s cells.",
            device_bytes(counts) / 1e9,
            target,
            memory_budget_gb,
            f"{block_size:,}",
        )
    return data


class AlignedRows:
    """``read_rows`` of a screen read from disk, columns reordered to a model's genes."""

    def __init__(self, screen: BlockScreen, genes: list[str] | None, fill_missing: bool | None) -> None:
        self.screen, self.fill_missing = screen, fill_missing
        same = genes is None or list(map(str, screen.var_names)) == list(genes)
        self.genes = None if same else list(genes)
        self.n_genes = screen.n_vars if self.genes is None else len(self.genes)
        if self.genes is not None:  # check the names once, on an empty block
            align_counts(
                sp.csr_matrix((0, screen.n_vars), dtype=np.float32), screen.var_names, self.genes, fill_missing
            )

    def __call__(self, start: int, stop: int) -> sp.csr_matrix:
        counts = self.screen.read_rows(start, stop)
        if self.genes is None:
            return counts
        return align_counts(counts, self.screen.var_names, self.genes, self.fill_missing)
