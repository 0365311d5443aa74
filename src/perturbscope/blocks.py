"""A screen read in blocks of cells, from disk or from memory: the one screen type of data_processing.

:class:`BlockScreen` holds ``obs``, ``var``, ``uns`` and ``obsm`` in memory (a few hundred bytes per
cell) and reads its count matrix one contiguous block of rows at a time, from one of two sources:

* an ``.h5ad`` file, through anndata's backed sparse datasets (:func:`anndata.io.sparse_dataset`):
  :meth:`BlockScreen.open`, what a screen too large for memory is in this project;
* an in-memory matrix: :meth:`BlockScreen.from_anndata`, what every other screen is.

Selections (QC) and normalisation are recorded, not applied: a new screen is returned each time (the
pipeline's nodes stay pure, and no step copies the matrix), and :meth:`BlockScreen.write_h5ad` streams
the result into a new ``.h5ad`` (anndata's ``write_elem`` and sparse ``append``) without holding the
whole normalised matrix. Every data_processing step has one implementation, over blocks; memory is set
by ``chunk_size`` (cells per block), not by the number of cells.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem

from perturbscope.schema import COUNTS_LAYER

__all__ = ["BlockScreen", "Chunk", "as_block_screen", "is_on_disk", "stored_matrix_bytes"]

DEFAULT_CHUNK_SIZE = 20_000
"""Cells per block when the caller names none."""


def stored_matrix_bytes(path: str | os.PathLike, key: str = "X") -> int:
    """Bytes the sparse matrix ``key`` of an ``.h5ad`` file takes in memory as CSR (values + indices);
    a dense matrix counts 4 bytes per entry. Read from the file's metadata, without loading it."""
    with h5py.File(path, "r") as f:
        if key not in f:
            return 0
        elem = f[key]
        if isinstance(elem, h5py.Dataset):
            return int(np.prod(elem.shape)) * 4
        return int(elem["data"].shape[0]) * (elem["data"].dtype.itemsize + elem["indices"].dtype.itemsize)


def is_on_disk(screen: Any) -> bool:
    """Whether ``screen`` is a :class:`BlockScreen` read from a file (rather than held in memory)."""
    return isinstance(screen, BlockScreen) and screen.on_disk


def as_block_screen(screen: ad.AnnData | BlockScreen, counts_layer: str | None = None) -> BlockScreen:
    """``screen`` as a :class:`BlockScreen` (an AnnData is wrapped; its matrices are not copied)."""
    if isinstance(screen, BlockScreen):
        return screen
    if not isinstance(screen, ad.AnnData):
        raise TypeError(f"expected an AnnData or a BlockScreen, got {type(screen).__name__}")
    return BlockScreen.from_anndata(screen, counts_layer)


@dataclass(frozen=True)
class Chunk:
    """One block of cells: rows ``start:stop`` of the screen, raw counts and (if any) ``X``."""

    start: int
    stop: int
    counts: sp.csr_matrix
    x: sp.csr_matrix | None


@dataclass(frozen=True)
class _Source:
    """Where the matrices are: a file (``path`` and the keys in it) or memory (``counts`` and ``x``)."""

    path: str | None = None
    counts_key: str = "X"  # the raw counts in the file: "X" or "layers/<name>"
    x_key: str | None = None  # a stored X other than the counts (a processed file), else None
    counts: Any = None  # in memory: the raw counts (CSR of any numeric dtype)
    x: Any = None  # in memory: a stored X other than the counts (CSR), else None

    @property
    def has_x(self) -> bool:
        return self.x_key is not None or self.x is not None

    @contextlib.contextmanager
    def matrices(self, x: bool) -> Iterator[tuple[Any, Any]]:
        """``(counts, X or None)``, sliceable by rows: backed datasets of the open file, or the matrices."""
        if self.path is None:
            yield self.counts, (self.x if x else None)
            return
        with h5py.File(self.path, "r") as f:
            yield sparse_dataset(f[self.counts_key]), (sparse_dataset(f[self.x_key]) if x and self.x_key else None)


class BlockScreen:
    """A screen read block by block, from its ``.h5ad`` file or from memory (see the module docstring).

    Duck-types the parts of :class:`anndata.AnnData` that describe cells and genes (``obs``,
    ``var``, ``uns``, ``obsm``, ``n_obs``, ``n_vars``, ``shape``, ``obs_names``, ``var_names``,
    ``layers`` as a set of names, ``copy()``); the matrices are read with :meth:`chunks`.

    Use :meth:`open` to read a file and :meth:`from_anndata` to wrap an AnnData;
    :meth:`subset`, :meth:`with_normalisation`, :meth:`with_obs` return new screens.
    """

    def __init__(
        self,
        source: _Source,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        uns: dict[str, Any] | None = None,
        obsm: dict[str, np.ndarray] | None = None,
        varm: dict[str, Any] | None = None,
        rows: np.ndarray | None = None,
        cols: np.ndarray | None = None,
        library: np.ndarray | None = None,
        target_sum: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self._source = source
        self.chunk_size = max(1, int(chunk_size))
        self.obs = obs
        self.var = var
        self.uns = dict(uns or {})
        self.obsm = dict(obsm or {})
        self.varm = dict(varm or {})
        self._rows = rows
        self._cols = cols
        self._library = library
        self._target_sum = target_sum
        if library is not None and len(library) != len(obs):
            raise ValueError("library must hold one total per cell")

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        counts_layer: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        processed: bool = True,
    ) -> BlockScreen:
        """The screen in ``path`` with its matrices left on disk.

        The raw counts are ``layers[counts_layer]`` if named, else ``layers["counts"]`` if the file has
        it and ``processed`` (a processed screen, whose ``X`` is then read as stored), else ``X``.
        """
        path = os.fspath(path)
        with h5py.File(path, "r") as f:
            layers = set(f["layers"].keys()) if "layers" in f else set()
            if counts_layer is not None and counts_layer not in layers:
                raise ValueError(
                    f"'{path}' has no layer '{counts_layer}' (layers: {sorted(layers)}); name the layer "
                    "that holds raw counts, or none to use layers['counts'] or X."
                )
            layer = counts_layer or (COUNTS_LAYER if processed and COUNTS_LAYER in layers else None)
            source = _Source(path=path, counts_key=f"layers/{layer}" if layer else "X", x_key="X" if layer else None)
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
            uns = read_elem(f["uns"]) if "uns" in f else {}
            obsm = read_elem(f["obsm"]) if "obsm" in f else {}
            varm = read_elem(f["varm"]) if "varm" in f else {}
        return cls(source, obs, var, uns, obsm, varm, chunk_size=chunk_size)

    @classmethod
    def from_anndata(
        cls,
        adata: ad.AnnData,
        counts_layer: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        processed: bool = True,
    ) -> BlockScreen:
        """An in-memory AnnData read block by block; its matrices are not copied (a dense or CSC matrix
        is converted to CSR once).

        The raw counts are ``layers[counts_layer]`` if named, else ``layers["counts"]`` if the screen has
        it and ``processed`` (a processed screen, whose ``X`` is then read as stored), else ``X``.
        """
        if counts_layer is not None and counts_layer not in adata.layers:
            raise ValueError(
                f"The screen has no layer '{counts_layer}' (layers: {sorted(adata.layers)}); name the layer "
                "that holds raw counts, or none to use layers['counts'] or X."
            )
        layer = counts_layer or (COUNTS_LAYER if processed and COUNTS_LAYER in adata.layers else None)
        counts = adata.layers[layer] if layer else adata.X
        if counts is None:
            raise ValueError(f"The screen has no matrix in {'layers[' + repr(layer) + ']' if layer else 'X'}.")
        source = _Source(counts=_csr(counts), x=_csr(adata.X) if layer and adata.X is not None else None)
        obsm = {k: _obsm_value(v) for k, v in adata.obsm.items()}
        return cls(
            source,
            adata.obs.copy(),
            adata.var.copy(),
            copy.deepcopy(dict(adata.uns)),
            obsm,
            dict(adata.varm),
            chunk_size=chunk_size,
        )

    def raw_counts(self, counts_layer: str | None) -> BlockScreen:
        """The same file read with ``counts_layer`` (None: ``X``) as the raw counts and nothing else
        (what validation checks)."""
        if not self.on_disk:
            raise ValueError("raw_counts reopens a file; wrap an in-memory AnnData with from_anndata(counts_layer)")
        reopened = BlockScreen.open(self.path, counts_layer, self.chunk_size, processed=False)
        # the same cells and genes as this screen (a subset keeps its selection)
        return reopened._evolve(
            obs=self.obs, var=self.var, uns=self.uns, obsm=self.obsm, varm=self.varm, rows=self._rows, cols=self._cols
        )

    @property
    def on_disk(self) -> bool:
        """Whether the matrices are read from a file (else from memory)."""
        return self._source.path is not None

    @property
    def path(self) -> str | None:
        """The ``.h5ad`` file the matrices are read from (None in memory)."""
        return self._source.path

    @property
    def counts_dtype(self) -> np.dtype:
        """The stored dtype of the raw counts (blocks are read as float32)."""
        if self.on_disk:
            with h5py.File(self.path, "r") as f:
                elem = f[self._source.counts_key]
                return np.dtype((elem if isinstance(elem, h5py.Dataset) else elem["data"]).dtype)
        return np.dtype(self._source.counts.dtype)

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_vars

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def layers(self) -> frozenset[str]:
        """Names of the layers a written copy has (``counts`` once normalised)."""
        return frozenset({COUNTS_LAYER}) if self.normalised else frozenset()

    @property
    def normalised(self) -> bool:
        """Whether ``X`` differs from the raw counts (normalised, or stored so in a processed screen)."""
        return self._library is not None or self._source.has_x

    @property
    def is_view(self) -> bool:
        return False

    @property
    def X(self) -> Any:
        raise AttributeError(
            f"This screen ({self.n_obs:,} cells) is read in blocks and has no X: use .chunks(), or "
            ".to_memory() for an AnnData."
        )

    def __repr__(self) -> str:
        where = f"from '{self.path}'" if self.on_disk else "in memory"
        return f"BlockScreen({self.n_obs:,} cells x {self.n_vars:,} genes {where})"

    def __len__(self) -> int:
        return self.n_obs

    def copy(self) -> BlockScreen:
        """A copy of the in-memory parts (obs, var, uns, obsm); the file is shared."""
        return self._evolve(
            obs=self.obs.copy(),
            var=self.var.copy(),
            uns=copy.deepcopy(self.uns),
            obsm={k: v.copy() if sp.issparse(v) else np.array(v, copy=True) for k, v in self.obsm.items()},
            varm=copy.deepcopy(self.varm),
        )

    def _evolve(self, **changes: Any) -> BlockScreen:
        state = {
            "source": self._source,
            "obs": self.obs,
            "var": self.var,
            "uns": self.uns,
            "obsm": self.obsm,
            "varm": self.varm,
            "rows": self._rows,
            "cols": self._cols,
            "library": self._library,
            "target_sum": self._target_sum,
            "chunk_size": self.chunk_size,
        }
        state.update(changes)
        return BlockScreen(**state)

    # ---------------------------------------------------------- derived screens
    def subset(self, cells: np.ndarray | None = None, genes: np.ndarray | None = None) -> BlockScreen:
        """The screen restricted to boolean masks of its cells and genes (None keeps all)."""
        out = self
        if cells is not None:
            cells = np.asarray(cells, dtype=bool)
            if cells.shape != (self.n_obs,):
                raise ValueError(f"cells mask has shape {cells.shape}, expected ({self.n_obs},)")
            rows = np.flatnonzero(cells) if self._rows is None else self._rows[cells]
            obsm = {k: v[cells] if sp.issparse(v) else np.asarray(v)[cells] for k, v in self.obsm.items()}
            library = None if self._library is None else self._library[cells]
            out = out._evolve(obs=self.obs.iloc[cells].copy(), obsm=obsm, rows=rows, library=library)
        if genes is not None:
            genes = np.asarray(genes, dtype=bool)
            if genes.shape != (self.n_vars,):
                raise ValueError(f"genes mask has shape {genes.shape}, expected ({self.n_vars},)")
            cols = np.flatnonzero(genes) if self._cols is None else self._cols[genes]
            varm = {
                k: v.iloc[genes] if isinstance(v, pd.DataFrame) else np.asarray(v)[genes] for k, v in self.varm.items()
            }
            out = out._evolve(var=out.var.iloc[genes].copy(), varm=varm, cols=cols)
        return out

    def with_normalisation(self, library: np.ndarray, target_sum: float) -> BlockScreen:
        """``X = log1p(counts / library * target_sum)`` per cell (``normalize_total`` + ``log1p``)."""
        return self._evolve(library=np.asarray(library, dtype=np.float64), target_sum=float(target_sum))

    def with_obs(self, obs: pd.DataFrame) -> BlockScreen:
        """The same screen with a new ``obs`` (same cells, same order)."""
        if not obs.index.equals(self.obs.index):
            raise ValueError("with_obs needs the same cells in the same order")
        return self._evolve(obs=obs)

    # ------------------------------------------------------------------ chunks
    def chunks(self, chunk_size: int | None = None, x: bool = False) -> Iterator[Chunk]:
        """Blocks of ``chunk_size`` consecutive cells: raw counts (float32 CSR) and, with ``x``,
        ``X`` (the stored one, the normalised counts, or the counts themselves)."""
        chunk_size = max(1, int(chunk_size or self.chunk_size))
        with self._source.matrices(x) as (counts_ds, x_ds):
            for start in range(0, self.n_obs, chunk_size):
                stop = min(start + chunk_size, self.n_obs)
                counts = self._read(counts_ds, start, stop)
                if not x:
                    block = None
                elif x_ds is not None:
                    block = self._read(x_ds, start, stop)
                elif self._library is not None:
                    block = self._normalise(counts, self._library[start:stop])
                else:
                    block = counts
                yield Chunk(start, stop, counts, block)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw counts of cells ``start:stop`` (float32 CSR)."""
        with self._source.matrices(False) as (counts, _):
            return self._read(counts, start, stop)

    def _read(self, dataset: Any, start: int, stop: int) -> sp.csr_matrix:
        if self._rows is None:
            block = dataset[start:stop]
        else:
            rows = self._rows[start:stop]
            if rows.size == 0:
                return sp.csr_matrix((0, self.n_vars), dtype=np.float32)
            block = dataset[int(rows[0]) : int(rows[-1]) + 1]
            if rows.size != block.shape[0]:
                block = block[rows - rows[0]]
        block = block if sp.issparse(block) and block.format == "csr" else sp.csr_matrix(block)
        if self._cols is not None:
            block = block[:, self._cols]
        return sp.csr_matrix(block, dtype=np.float32)

    def _normalise(self, counts: sp.csr_matrix, library: np.ndarray) -> sp.csr_matrix:
        scale = np.divide(self._target_sum, library, out=np.zeros_like(library), where=library > 0)
        # each row's values scaled in place of a diagonal product, which would reorder every row's column indices:
        # X keeps the counts' non-zero positions (AnnDataDataset.load then holds them once)
        values = counts.data.astype(np.float32) * np.repeat(scale.astype(np.float32), np.diff(counts.indptr))
        np.log1p(values, out=values)
        return sp.csr_matrix((values, counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)

    # ----------------------------------------------------------------- writing
    def to_memory(self) -> ad.AnnData:
        """The whole screen as an in-memory AnnData (counts in ``X``; once normalised, the
        normalised ``X`` and the counts in ``layers["counts"]``)."""
        parts = list(self.chunks(max(self.n_obs, 1), x=True))
        n_genes = self.n_vars
        counts = sp.vstack([p.counts for p in parts], format="csr") if parts else sp.csr_matrix((0, n_genes))
        out = ad.AnnData(obs=self.obs.copy(), var=self.var.copy(), uns=copy.deepcopy(self.uns))
        if self.normalised:
            out.X = sp.vstack([p.x for p in parts], format="csr") if parts else counts.copy()
            out.layers[COUNTS_LAYER] = counts
        else:
            out.X = counts
        for key, value in self.obsm.items():
            out.obsm[key] = value
        for key, value in self.varm.items():
            out.varm[key] = value
        return out

    def write_h5ad(
        self,
        path: str | os.PathLike,
        chunk_size: int | None = None,
        compression: str | None = None,
        compression_opts: int | None = None,
    ) -> None:
        """Write the screen to ``path`` block by block (same layout as ``AnnData.write_h5ad``)."""
        kwargs: dict[str, Any] = {"compression": compression} if compression else {}
        if compression and compression_opts is not None:
            kwargs["compression_opts"] = compression_opts
        # h5py's default chunks for a growing dataset are tiny; appends want large ones
        sparse_kwargs = {**kwargs, "chunks": (1 << 18,)}
        with h5py.File(path, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            write_elem(f, "obs", self.obs, dataset_kwargs=kwargs)
            write_elem(f, "var", self.var, dataset_kwargs=kwargs)
            write_elem(f, "uns", self.uns, dataset_kwargs=kwargs)
            write_elem(f, "obsm", self.obsm, dataset_kwargs=kwargs)
            write_elem(f, "varm", self.varm, dataset_kwargs=kwargs)
            for key in ("obsp", "varp", "layers"):
                write_elem(f, key, {})
            empty = sp.csr_matrix((0, self.n_vars), dtype=np.float32)
            targets = ["X", f"layers/{COUNTS_LAYER}"] if self.normalised else ["X"]
            for key in targets:
                write_elem(f, key, empty, dataset_kwargs=sparse_kwargs)
            stores = [sparse_dataset(f[key]) for key in targets]
            for chunk in self.chunks(chunk_size, x=self.normalised):
                blocks = [chunk.x, chunk.counts] if self.normalised else [chunk.counts]
                for store, block in zip(stores, blocks):
                    if block.shape[0]:
                        store.append(block)


def _obsm_value(value: Any) -> Any:
    """An ``obsm`` entry held by a BlockScreen: sparse matrices stay sparse (guide counts), the rest arrays."""
    if sp.issparse(value):
        return sp.csr_matrix(value)
    return np.asarray(value)


def _csr(matrix: Any) -> sp.csr_matrix:
    """``matrix`` as CSR, without a copy when it already is one (a dense matrix is converted, keeping its dtype)."""
    if sp.issparse(matrix):
        return matrix if matrix.format == "csr" else sp.csr_matrix(matrix)
    return sp.csr_matrix(np.asarray(matrix))
