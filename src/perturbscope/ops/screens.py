"""The screens registry and the checks a screen file passes before anything runs on it.

The registry is ``conf/<env>/screens.yml``, read by Kedro as *globals* (see
``settings.py``) so that the catalog (``raw_screen``'s file) and the parameters (the
``schema`` keys a screen overrides) both see it. This module validates its entries,
fingerprints screen files (a content hash recorded with every registered model) and
checks a file cheaply *before* a Kedro session is started on it: a file that is
unreadable, half-copied or does not fit its schema is reported and skipped, and
nothing is written for it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anndata as ad
import fsspec
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from perturbscope.names import ScreenNameError, check_screen_name
from perturbscope.schema import ScreenSchema
from perturbscope.validation import validate_screen

logger = logging.getLogger(__name__)

__all__ = [
    "ENTRY_KEYS",
    "SCHEMA_KEYS",
    "FileFingerprint",
    "ScreenFileError",
    "ScreenRegistryError",
    "check_screen_file",
    "file_stamp",
    "fingerprint",
    "validate_registry",
]

ENTRY_KEYS = frozenset({"description", "file", "feature_reference", "guides_per_cell", "schema", "retrain"})
"""The keys a registry entry may have."""

SCHEMA_KEYS = frozenset(f for f in ScreenSchema.__dataclass_fields__ if f != "extra")
"""The schema keys a registry entry may override (the fields of :class:`ScreenSchema`)."""

_CHUNK = 8 * 1024 * 1024


class ScreenRegistryError(ValueError):
    """An entry of the screens registry (conf/<env>/screens.yml) is malformed."""


class ScreenFileError(ValueError):
    """A screen file is missing, unreadable or truncated; the message says which and what to do."""


# ------------------------------------------------------------------------------ registry
def validate_registry(screens: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Check the registry's entries and return them as plain dicts (``{}`` for an empty one).

    Raises
    ------
    ScreenRegistryError
        A name that is not ``[A-Za-z0-9_-]`` (a dot would break the ``globals``
        lookups in parameters.yml and catalog_data_processing.yml), an unknown entry or schema key
        (a typo would be ignored silently otherwise), ``file: null``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, entry in dict(screens or {}).items():
        name = str(name)
        try:
            check_screen_name(name, "the screens registry's entry")
        except ScreenNameError as err:
            raise ScreenRegistryError(str(err)) from None
        entry = dict(entry or {})
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ScreenRegistryError(
                f"screens.{name} has unknown key(s) {unknown}; an entry takes {sorted(ENTRY_KEYS)}."
            )
        if "file" in entry and not entry["file"]:
            raise ScreenRegistryError(
                f"screens.{name}.file is empty: give a path, or omit `file` for <data_root>/01_raw/{name}.h5ad."
            )
        schema = dict(entry.get("schema") or {})
        unknown = sorted(set(schema) - SCHEMA_KEYS)
        if unknown:
            raise ScreenRegistryError(
                f"screens.{name}.schema has unknown key(s) {unknown}; the schema takes {sorted(SCHEMA_KEYS)}."
            )
        entry["schema"] = schema
        entry["retrain"] = bool(entry.get("retrain", True))
        out[name] = entry
    return out


# --------------------------------------------------------------------------- fingerprints
@dataclass(frozen=True)
class FileFingerprint:
    """What identifies one version of a screen file."""

    path: str
    sha256: str
    size: int


def _fs(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of a path or URL and the path within it."""
    return fsspec.core.url_to_fs(str(path))


def file_stamp(path: str) -> tuple[int, str]:
    """``(size, modification time)``: a cheap check that a file did not change meanwhile."""
    fs, fs_path = _fs(path)
    info = fs.info(fs_path)
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    return int(info.get("size") or 0), str(modified)


def fingerprint(path: str) -> FileFingerprint:
    """The SHA-256 of a screen file's bytes (streamed; works on any fsspec path)."""
    fs, fs_path = _fs(path)
    digest = hashlib.sha256()
    size = 0
    with fs.open(fs_path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileFingerprint(path=str(path), sha256=digest.hexdigest(), size=size)


# ------------------------------------------------------------------------------ pre-flight
def _row_blocks(n_obs: int, n_cells: int | None) -> list[slice]:
    """The first and last ``n_cells / 2`` rows (all rows for ``None``)."""
    if n_cells is None or n_cells >= n_obs:
        return [slice(0, n_obs)]
    head = max(1, n_cells // 2)
    return [slice(0, head), slice(max(head, n_obs - (n_cells - head)), n_obs)]


def _sampled_counts(element: Any, n_obs: int, n_vars: int, n_cells: int | None) -> tuple[sp.csr_matrix, int]:
    """An ``n_obs x n_vars`` CSR holding the stored counts of the sampled rows; the other rows empty."""
    matrix = element if isinstance(element, h5py.Dataset) else sparse_dataset(element)
    if tuple(matrix.shape) != (n_obs, n_vars):
        raise ScreenFileError(f"the count matrix is {tuple(matrix.shape)} but obs x var is {(n_obs, n_vars)}.")
    parts, position, n_read = [], 0, 0
    for block in _row_blocks(n_obs, n_cells):
        if block.start > position:
            parts.append(sp.csr_matrix((block.start - position, n_vars), dtype=np.float32))
        parts.append(sp.csr_matrix(matrix[block]))
        n_read += block.stop - block.start
        position = block.stop
    if position < n_obs:
        parts.append(sp.csr_matrix((n_obs - position, n_vars), dtype=np.float32))
    return sp.vstack(parts, format="csr"), n_read


def _proxy(handle: h5py.File, schema: ScreenSchema, n_cells: int | None) -> tuple[ad.AnnData, int]:
    """An AnnData with the file's whole ``obs`` and ``var`` and the counts of a sample of cells.

    Rows outside the sample are empty, so :func:`validate_screen` checks every label
    and name but reads only ``n_cells`` rows of the count matrix. Other layers are
    empty placeholders (their names only matter for error messages).
    """
    obs = read_elem(handle["obs"])
    var = read_elem(handle["var"])
    if not isinstance(obs, pd.DataFrame) or not isinstance(var, pd.DataFrame):
        raise ScreenFileError("obs or var is not a table: not an .h5ad written by anndata.")
    shape = (len(obs), len(var))
    layer_names = list(handle["layers"].keys()) if "layers" in handle else []
    layers = {name: sp.csr_matrix(shape, dtype=np.float32) for name in layer_names}
    x = None
    n_read = 0
    if schema.counts_layer is None:
        if "X" in handle:
            x, n_read = _sampled_counts(handle["X"], *shape, n_cells)
    else:
        x = sp.csr_matrix(shape, dtype=np.float32)
        if schema.counts_layer in layers:
            layers[schema.counts_layer], n_read = _sampled_counts(
                handle["layers"][schema.counts_layer], *shape, n_cells
            )
    proxy = ad.AnnData(X=sp.csr_matrix(shape, dtype=np.float32), obs=obs, var=var, layers=layers or None)
    proxy.X = x
    return proxy, n_read


def _check_guide_file(
    path: str, fs: Any, fs_path: str, schema_params: Mapping[str, Any], screen: str, feature_reference: str | None
) -> dict:
    """A Cell Ranger .h5 / MuData .h5mu: readable whole, with guide counts and targets that fit the schema."""
    from perturbscope.datasets._io import local_copy
    from perturbscope.guides import GuideInputError, check_guides, guide_table, read_screen

    schema = ScreenSchema.from_params(schema_params)
    protocol = "file" if getattr(fs, "protocol", "file") in ("file", ("file", "local")) else "remote"
    try:
        with local_copy(fs, protocol, fs_path) as local:
            adata = read_screen(local, feature_reference)
        check_guides(guide_table(adata), schema.control_labels)
    except GuideInputError as err:
        raise ScreenFileError(f"'{path}': {err}") from err
    except (OSError, KeyError, ValueError) as err:
        hint = "It looks half-copied: wait for the copy to finish." if "truncated" in str(err).lower() else ""
        raise ScreenFileError(f"'{path}' is not a readable screen file ({type(err).__name__}: {err}). {hint}") from err
    logger.info("Screen %s: %s passed the checks (%d cells x %d genes, guide counts).", screen, path, *adata.shape)
    return {"n_obs": adata.n_obs, "n_vars": adata.n_vars, "cells_checked": adata.n_obs}


def check_screen_file(
    path: str,
    schema_params: Mapping[str, Any],
    screen: str,
    *,
    n_cells: int | None = 2000,
    feature_reference: str | None = None,
) -> dict[str, Any]:
    """Check a screen file before a Kedro session is started on it; write nothing.

    The file is opened with h5py (HDF5 refuses a truncated file: its stored end of
    file lies beyond the bytes present), ``obs`` and ``var`` are read whole and the
    counts of the first and last ``n_cells / 2`` cells (all cells for ``None``); then
    the data_processing pipeline's own validation (:func:`perturbscope.validation.validate_screen`) runs on
    that proxy with the screen's schema, so the checks are exactly those of a run.

    Returns
    -------
    dict
        ``n_obs``, ``n_vars`` and ``cells_checked``.

    Raises
    ------
    ScreenFileError
        No file, not an HDF5/.h5ad file, a truncated (half-copied) file, unreadable
        elements.
    ScreenValidationError
        The file does not fit the schema (missing column, no controls, counts that
        are not raw UMI counts, duplicate names...).
    """
    schema = ScreenSchema.from_params(schema_params)
    fs, fs_path = _fs(path)
    if not fs.exists(fs_path):
        raise ScreenFileError(
            f"No screen file at '{path}'. Copy the .h5ad there or fix `file` of screens.{screen} "
            "in conf/<env>/screens.yml."
        )
    if fs.size(fs_path) == 0:
        raise ScreenFileError(
            f"'{path}' is empty (0 bytes): the copy or download that made it wrote nothing. Copy the .h5ad again."
        )
    if str(fs_path).lower().endswith((".h5", ".h5mu")):  # guide counts: the labels come from guide calling
        return _check_guide_file(path, fs, fs_path, schema_params, screen, feature_reference)
    try:
        with fs.open(fs_path, "rb") as raw, h5py.File(raw, "r") as handle:
            proxy, n_read = _proxy(handle, schema, n_cells)
    except ScreenFileError as err:
        raise ScreenFileError(f"'{path}' is not a usable .h5ad: {err}") from err
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        hint = (
            "It looks half-copied (shorter than HDF5 says): wait for the copy to finish; the next retrain picks it up."
            if "truncated" in str(err).lower()
            else "Check that the file was copied completely and written by anndata (`adata.write_h5ad(path)`)."
        )
        raise ScreenFileError(f"'{path}' is not a readable .h5ad file ({type(err).__name__}: {err}). {hint}") from err
    validate_screen(proxy, dict(schema_params), screen)
    logger.info(
        "Screen %s: %s passed the checks (%d cells x %d genes; counts of %d cells read).",
        screen,
        path,
        proxy.n_obs,
        proxy.n_vars,
        n_read,
    )
    return {"n_obs": proxy.n_obs, "n_vars": proxy.n_vars, "cells_checked": n_read}
