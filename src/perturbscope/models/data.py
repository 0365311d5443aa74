"""Device-resident cell data and minibatch samplers.

:class:`CellData` moves a (sparse) count matrix to the device once, as CSR
tensors, and gathers minibatches with vectorised torch ops. Samplers are
plain iterables of batch dicts:

* :class:`MinibatchSampler` -- random (or sequential) minibatches over an
  index set; yields ``CellData.batch`` dicts.
* :class:`PairedSampler` -- contrastive training: every target cell once per
  epoch, each paired with a control cell; yields
  ``{"background": batch, "target": batch}``.

Both take a ``seed`` and own a CPU :class:`torch.Generator`;
:func:`perturbscope.models.training.fit` re-seeds them from
``TrainConfig.seed`` through :meth:`manual_seed`, so a fit is reproducible.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = [
    "CellData",
    "StreamingCellData",
    "block_shuffle",
    "MinibatchSampler",
    "PairedSampler",
    "concat_batches",
    "batch_to",
    "batch_size_of",
    "as_index",
    "device_bytes",
    "resident_or_streamed",
    "value_chunks",
    "RESERVED_KEYS",
]

Batch = dict[str, Tensor]

#: Keys produced by :meth:`CellData.batch`; per-cell extras may not use them.
RESERVED_KEYS: frozenset[str] = frozenset({"x", "nz_row", "nz_col", "nz_val", "nz_lgamma", "log_library", "idx"})


def as_index(idx: Any, n: int, name: str = "idx") -> Tensor:
    """Convert an index set (ints, boolean mask, tensor, None = all) to a CPU int64 tensor.

    Parameters
    ----------
    idx
        ``None`` (all ``n`` items), a boolean mask of length ``n``, or
        integer positions (array-like or tensor).
    n
        Number of items indexed.
    name
        Argument name for error messages.

    Returns
    -------
    Tensor
        1-D int64 CPU tensor of positions.
    """
    if idx is None:
        return torch.arange(n, dtype=torch.long)
    if isinstance(idx, Tensor):
        arr = idx.detach().cpu().numpy()
    else:
        arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"{name}: boolean mask has shape {arr.shape}, expected ({n},)")
        arr = np.flatnonzero(arr)
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer positions or a boolean mask, got dtype {arr.dtype}")
    out = torch.as_tensor(arr.astype(np.int64, copy=False))
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= n):
        raise ValueError(f"{name}: positions must lie in [0, {n}); got range [{int(out.min())}, {int(out.max())}]")
    return out


def value_chunks(values: np.ndarray, size: int = 1 << 22) -> Iterator[np.ndarray]:
    """``values`` in consecutive parts of ``size``: checks over them make no temporaries the size of the counts."""
    for start in range(0, values.size, size):
        yield values[start : start + size]


def _canonical_csr(counts: Any, dtype: np.dtype) -> sp.csr_matrix:
    """``counts`` as a canonical CSR (sorted indices, no duplicates, no explicit zeros) of ``dtype`` values and
    int32 column indices, checked finite and non-negative; the given arrays themselves when they already are
    one (no copy), else a converted copy."""
    if sp.issparse(counts):
        csr = sp.csr_matrix(counts)
    else:
        arr = np.asarray(counts)
        if arr.ndim != 2:
            raise ValueError(f"counts must be 2-D (cells x genes), got shape {arr.shape}")
        csr = sp.csr_matrix(arr)
    explicit_zeros = False
    for part in value_chunks(csr.data):
        if not np.all(np.isfinite(part)):
            raise ValueError("counts contain NaN or inf; clean the matrix before building CellData")
        if part.min() < 0:
            raise ValueError("counts contain negative values; the count models need raw (non-negative) counts")
        explicit_zeros = explicit_zeros or not np.all(part)
    if explicit_zeros or not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
        csr.eliminate_zeros()
    if csr.data.dtype != dtype:
        csr = sp.csr_matrix((csr.data.astype(dtype), csr.indices, csr.indptr), shape=csr.shape)
    if csr.indices.dtype != np.int32:
        csr = sp.csr_matrix((csr.data, csr.indices.astype(np.int32), csr.indptr), shape=csr.shape)
    return csr


def _to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``array`` as a tensor on ``device`` (converted to ``dtype`` on the host first; on the CPU the same
    memory when no conversion is needed). To a GPU the copy goes from pinned (page-locked) host memory and
    does not block the host: a streamed block is uploaded while the previous steps still run; the stream
    orders it before the kernels that read it."""
    with warnings.catch_warnings():  # a read-only array (e.g. memory-mapped) is only ever read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.as_tensor(array)
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class CellData:
    """A count matrix (plus per-cell covariates) resident on one device.

    The counts are stored as CSR tensors (``indptr``, ``indices``, ``values``)
    and never densified as a whole; :meth:`batch` densifies one minibatch.
    Each cell's log library size is precomputed once. On the CPU, ``indices``
    and ``values`` share memory with the given matrix when it already is a
    canonical CSR of ``dtype`` values (an AnnData's ``layers["counts"]``):
    the counts are not held twice. Nothing here writes to them.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, scipy.sparse (any format) or a
        dense numpy array. Must be finite and non-negative.
    obs
        Optional per-cell arrays, ``name -> array`` of length ``n_cells``
        (1-D, e.g. integer batch codes, or 2-D, e.g. a condition multi-hot).
        Integer arrays become int64 tensors, float/bool arrays float32.
        Names may not clash with :data:`RESERVED_KEYS`.
    device
        Torch device for all tensors.
    dtype
        Floating dtype of counts and float extras.

    Attributes
    ----------
    n_cells, n_genes : int
    indptr, indices, values : Tensor
        CSR storage on ``device`` (int64 ``indptr``, int32 ``indices``).
    log_library : Tensor
        ``(n_cells,)`` log total counts (library sizes < 1 are clamped to 1).
    obs : dict[str, Tensor]
        Per-cell extras on ``device``.
    row_nnz : numpy.ndarray
        CPU copy of nonzeros per row (lets :meth:`batch` size its outputs
        without a device synchronisation).
    """

    def __init__(
        self,
        counts: sp.spmatrix | sp.sparray | np.ndarray,
        obs: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        csr = _canonical_csr(counts, torch.empty(0, dtype=dtype).numpy().dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_cells, self.n_genes = (int(s) for s in csr.shape)
        self.row_nnz: np.ndarray = np.diff(csr.indptr).astype(np.int64)
        dev = self.device
        self.indptr = _to_device(csr.indptr.astype(np.int64), dev)
        # on the CPU these share memory with ``csr`` (nothing writes to them): no second copy of the counts
        self.indices = _to_device(csr.indices, dev)
        self.values = _to_device(csr.data, dev, dtype)
        lib = np.asarray(csr.sum(axis=1, dtype=np.float64)).reshape(-1)
        self.library = lib
        self.log_library = _to_device(np.log(np.maximum(lib, 1.0)), dev, dtype)
        self.obs: dict[str, Tensor] = {}
        for key, val in (obs or {}).items():
            self.obs[key] = self._convert_obs(key, val)

    def _convert_obs(self, key: str, val: Any) -> Tensor:
        if key in RESERVED_KEYS:
            raise ValueError(f"obs key {key!r} is reserved (reserved: {sorted(RESERVED_KEYS)}); rename it")
        arr = val.detach().cpu().numpy() if isinstance(val, Tensor) else np.asarray(val)
        if arr.shape[:1] != (self.n_cells,):
            raise ValueError(f"obs[{key!r}] has shape {arr.shape}; its first dimension must be n_cells={self.n_cells}")
        if np.issubdtype(arr.dtype, np.integer):
            return torch.as_tensor(arr.astype(np.int64)).to(self.device)
        if arr.dtype == bool or np.issubdtype(arr.dtype, np.floating):
            return torch.as_tensor(arr.astype(np.float32)).to(device=self.device, dtype=self.dtype)
        raise ValueError(
            f"obs[{key!r}] has dtype {arr.dtype}; encode categories as integer codes "
            "(e.g. pandas.Categorical(...).codes) or floats first"
        )

    # ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        return (
            f"CellData(n_cells={self.n_cells}, n_genes={self.n_genes}, nnz={int(self.row_nnz.sum())}, "
            f"obs={list(self.obs)}, device={self.device})"
        )

    @property
    def nnz(self) -> int:
        """Number of stored nonzero counts."""
        return int(self.row_nnz.sum())

    def to(self, device: str | torch.device) -> CellData:
        """Move all tensors to ``device`` in place (no-op if already there); returns ``self``."""
        device = torch.device(device)
        if device == self.device:
            return self
        for name in ("indptr", "indices", "values", "log_library"):
            setattr(self, name, getattr(self, name).to(device))
        self.obs = {k: v.to(device) for k, v in self.obs.items()}
        self.device = device
        return self

    def batch(self, idx: Tensor | np.ndarray | Sequence[int]) -> Batch:
        """Gather cells ``idx`` into a minibatch dict.

        Vectorised: the rows' CSR segments are expanded with
        ``repeat_interleave``; only the minibatch is densified. If ``idx`` is
        a CPU tensor (samplers produce those) the output size is computed on
        the CPU, so no device synchronisation happens.

        Parameters
        ----------
        idx
            Cell positions (int64), length ``B >= 1``.

        Returns
        -------
        dict[str, Tensor]
            ``x`` (B, G) dense counts; ``nz_row``, ``nz_col`` (nnz,) int64
            coordinates of the nonzeros (row = position in the batch);
            ``nz_val`` (nnz,) values; ``nz_lgamma`` (nnz,) ``lgamma(val+1)``;
            ``log_library`` (B,); ``idx`` (B,) int64 positions in the data;
            plus every ``obs`` entry gathered to ``(B, ...)``.
        """
        if not isinstance(idx, Tensor):
            idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        if idx.device.type == "cpu":
            nnz = int(self.row_nnz[idx.numpy()].sum())
            idx = idx.to(self.device, non_blocking=True)
        else:
            idx = idx.to(self.device)
            nnz = None
        n = idx.shape[0]
        starts = self.indptr.index_select(0, idx)
        counts = self.indptr.index_select(0, idx + 1) - starts
        if nnz is None:
            nnz = int(counts.sum())  # syncs; pass CPU indices to avoid
        rows = torch.arange(n, device=self.device)
        nz_row = torch.repeat_interleave(rows, counts, output_size=nnz)
        # position in the CSR arrays: start of the row + offset within the row
        seg_start_out = torch.cumsum(counts, 0) - counts
        src = torch.arange(nnz, device=self.device) + torch.repeat_interleave(
            starts - seg_start_out, counts, output_size=nnz
        )
        nz_col = self.indices.index_select(0, src).long()
        nz_val = self.values.index_select(0, src)
        x = torch.zeros(n * self.n_genes, device=self.device, dtype=self.dtype)
        x.index_copy_(0, nz_row * self.n_genes + nz_col, nz_val)
        out: Batch = {
            "x": x.view(n, self.n_genes),
            "nz_row": nz_row,
            "nz_col": nz_col,
            "nz_val": nz_val,
            "nz_lgamma": torch.lgamma(nz_val + 1.0),
            "log_library": self.log_library.index_select(0, idx),
            "idx": idx,
        }
        for key, val in self.obs.items():
            out[key] = val.index_select(0, idx)
        return out

    def library_prior(
        self, idx: Any = None, batch_key: str | None = None, n_batch: int = 0
    ) -> tuple[list[float], list[float]]:
        """Empirical mean and variance of log library size (prior for a learned library).

        Parameters
        ----------
        idx
            Cells to use (default all).
        batch_key
            Optional ``obs`` key of integer batch codes; statistics are then
            per batch category.
        n_batch
            Number of batch categories (needed with ``batch_key``).

        Returns
        -------
        (list[float], list[float])
            Means and variances, one entry per batch category (one entry if
            ``batch_key`` is None). Variances are floored at 1e-4.
        """
        codes = None if batch_key is None else self.obs[batch_key].cpu().numpy()
        return _library_prior(self.library, codes, as_index(idx, self.n_cells).numpy(), n_batch)


def _library_prior(
    library: np.ndarray, codes: np.ndarray | None, pos: np.ndarray, n_batch: int
) -> tuple[list[float], list[float]]:
    """Mean and variance of the log library of cells ``pos``, per batch code when ``codes`` is given."""
    loglib = np.log(np.maximum(library[pos], 1.0))
    if codes is None:
        groups = [loglib]
    else:
        codes = np.asarray(codes)[pos]
        groups = [loglib[codes == b] for b in range(max(n_batch, 1))]
    means, vars_ = [], []
    for g in groups:
        means.append(float(g.mean()) if g.size else float(loglib.mean()))
        vars_.append(max(float(g.var()) if g.size > 1 else 1.0, 1e-4))
    return means, vars_


class StreamingCellData:
    """Cells read in contiguous blocks from a row source, a few blocks resident at a time.

    For count matrices that do not fit the device (or the memory budget): ``read_rows(start,
    stop)`` returns raw counts of cells ``start:stop`` (scipy CSR); blocks of ``block_size``
    cells are turned into :class:`CellData` on first use and the last ``cache_blocks`` of them
    are kept. :meth:`batch` has :class:`CellData`'s contract, so the samplers and the models use
    either. The samplers shuffle a streaming source with :func:`block_shuffle` (blocks in random
    order, cells shuffled within a window of ``cache_blocks // 2`` blocks), so every block is read
    about once per pass over the cells.
    """

    def __init__(
        self,
        read_rows: Any,
        n_cells: int,
        n_genes: int,
        obs: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        block_size: int = 16384,
        cache_blocks: int = 4,
    ) -> None:
        self._read_rows = read_rows
        self.n_cells, self.n_genes = int(n_cells), int(n_genes)
        self.device, self.dtype = torch.device(device), dtype
        self.block_size = max(1, int(block_size))
        self.cache_blocks = max(2, int(cache_blocks))
        self._obs = {key: np.asarray(val) for key, val in (obs or {}).items()}
        for key, val in self._obs.items():
            if key in RESERVED_KEYS or val.shape[:1] != (self.n_cells,):
                raise ValueError(f"obs[{key!r}]: a per-cell array of length n_cells={self.n_cells} with a free name")
        self._cache: dict[int, CellData] = {}
        self.blocks_read = 0

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        return (
            f"StreamingCellData(n_cells={self.n_cells}, n_genes={self.n_genes}, block_size={self.block_size}, "
            f"cache_blocks={self.cache_blocks}, device={self.device})"
        )

    def to(self, device: str | torch.device) -> StreamingCellData:
        """Blocks are read to ``device`` from now on (the cache is emptied); returns ``self``."""
        device = torch.device(device)
        if device != self.device:
            self.device, self._cache = device, {}
        return self

    def _block_rows(self, block: int) -> tuple[int, int, Any]:
        """``(start, stop, raw counts)`` of block ``block``, read from the source (not cached)."""
        start, stop = block * self.block_size, min((block + 1) * self.block_size, self.n_cells)
        return start, stop, self._read_rows(start, stop)

    def _block(self, block: int) -> CellData:
        data = self._cache.pop(block, None)
        if data is None:
            start, stop, rows = self._block_rows(block)
            obs = {key: val[start:stop] for key, val in self._obs.items()}
            data = CellData(rows, obs=obs, device=self.device, dtype=self.dtype)
            self.blocks_read += 1
            while len(self._cache) >= self.cache_blocks:
                self._cache.pop(next(iter(self._cache)))
        self._cache[block] = data  # most recently used last
        return data

    def batch(self, idx: Tensor | np.ndarray | Sequence[int]) -> Batch:
        """:meth:`CellData.batch` of cells ``idx`` (read from their blocks; rows in ``idx`` order)."""
        pos = idx.cpu().numpy() if isinstance(idx, Tensor) else np.asarray(idx, dtype=np.int64)
        blocks = pos // self.block_size
        if blocks.size and (blocks == blocks[0]).all():
            out = self._block(int(blocks[0])).batch(torch.as_tensor(pos - blocks[0] * self.block_size))
        else:
            order = np.argsort(blocks, kind="stable")
            parts = [
                self._block(int(b)).batch(torch.as_tensor(pos[order][blocks[order] == b] - b * self.block_size))
                for b in np.unique(blocks)
            ]
            out = concat_batches(parts)
            if not np.array_equal(order, np.arange(order.size)):
                # rows came grouped by block: put them back in the order of idx
                back = torch.as_tensor(np.argsort(order), device=self.device)
                rows = torch.as_tensor(order, device=self.device)
                out = {
                    key: (
                        rows.index_select(0, val)
                        if key == "nz_row"
                        else val
                        if key.startswith("nz_")
                        else val.index_select(0, back)
                    )
                    for key, val in out.items()
                }
        out["idx"] = torch.as_tensor(pos, device=self.device)
        return out

    def materialise(self, positions: Any) -> CellData:
        """The cells ``positions`` (in that order) as an in-memory :class:`CellData`, read block by block."""
        pos = as_index(positions, self.n_cells).numpy()
        blocks = pos // self.block_size
        order = np.argsort(pos, kind="stable")
        parts = []
        for b in np.unique(blocks):
            start, _, rows = self._block_rows(int(b))
            parts.append(sp.csr_matrix(rows)[np.sort(pos[blocks == b]) - start])
        counts = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.n_genes))
        counts = counts[np.argsort(order)]  # back to the order of positions
        return CellData(counts, obs={k: v[pos] for k, v in self._obs.items()}, device=self.device, dtype=self.dtype)

    @property
    def library(self) -> np.ndarray:
        """Each cell's total counts (one pass over the blocks, then kept)."""
        if not hasattr(self, "_library"):
            n_blocks = -(-self.n_cells // self.block_size)
            self._library = (
                np.concatenate([np.asarray(self._block_rows(b)[2].sum(axis=1)).ravel() for b in range(n_blocks)])
                if self.n_cells
                else np.zeros(0)
            )
        return self._library

    def library_prior(
        self, idx: Any = None, batch_key: str | None = None, n_batch: int = 0
    ) -> tuple[list[float], list[float]]:
        """:meth:`CellData.library_prior` (reads every block once)."""
        codes = None if batch_key is None else self._obs[batch_key]
        return _library_prior(self.library, codes, as_index(idx, self.n_cells).numpy(), n_batch)


class RowsOf:
    """``read_rows`` of a :class:`StreamingCellData` over an in-memory matrix (picklable, unlike a lambda)."""

    def __init__(self, matrix: Any) -> None:
        self.matrix = matrix

    def __call__(self, start: int, stop: int) -> Any:
        return self.matrix[start:stop]


def device_bytes(counts: Any) -> int:
    """Bytes a count matrix takes on the device as :class:`CellData`: int32 column index and value per
    non-zero (8 bytes with float32 values) and the per-cell terms."""
    return int(counts.nnz) * 8 + int(counts.shape[0]) * 16


def resident_or_streamed(
    counts: Any,
    obs: Mapping[str, Any] | None,
    device: str | torch.device,
    memory_budget_gb: float | None,
    block_size: int,
) -> CellData | StreamingCellData:
    """``counts`` (scipy sparse, cells x genes) on ``device``: as :class:`CellData` when they fit
    ``memory_budget_gb`` (None = no limit), else as :class:`StreamingCellData` read in blocks of
    ``block_size`` cells."""
    if memory_budget_gb is None or device_bytes(counts) <= float(memory_budget_gb) * 1e9:
        return CellData(counts, obs=obs, device=device)
    return StreamingCellData(
        RowsOf(counts), counts.shape[0], counts.shape[1], obs=obs, device=device, block_size=block_size
    )


def block_shuffle(positions: Tensor, block_size: int, window: int, generator: torch.Generator) -> Tensor:
    """A random order of ``positions`` that reads a streaming source block by block: the blocks
    (``position // block_size``) in random order, and the cells of every ``window`` consecutive
    blocks shuffled together."""
    blocks = positions // block_size
    unique = torch.unique(blocks)
    shuffled = unique[torch.randperm(unique.numel(), generator=generator)]
    rank = torch.empty(int(unique.max()) + 1 if unique.numel() else 0, dtype=torch.long)
    rank[shuffled] = torch.arange(shuffled.numel())
    group = rank[blocks] // max(1, int(window))
    keys = group.to(torch.float64) + torch.rand(positions.numel(), generator=generator, dtype=torch.float64) * 0.5
    return positions[torch.argsort(keys)]


def _shuffled(positions: Tensor, data: Any, generator: torch.Generator) -> Tensor:
    """A random order of ``positions``: a permutation, or :func:`block_shuffle` for a streaming source."""
    if isinstance(data, StreamingCellData):
        return block_shuffle(positions, data.block_size, max(1, data.cache_blocks // 2), generator)
    return positions[torch.randperm(positions.numel(), generator=generator)]


# --------------------------------------------------------------------------
# batch helpers
# --------------------------------------------------------------------------
def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Concatenate ``CellData.batch`` dicts along the cell axis.

    ``nz_row`` is offset so that it indexes rows of the concatenated ``x``.
    Only keys present in every batch are kept.

    Parameters
    ----------
    batches
        Batch dicts (same genes, same device).

    Returns
    -------
    dict[str, Tensor]
    """
    keys = [k for k in batches[0] if all(k in b for b in batches)]
    out: Batch = {}
    offset = 0
    rows = []
    for b in batches:
        rows.append(b["nz_row"] + offset if offset else b["nz_row"])
        offset += b["x"].shape[0]
    for k in keys:
        out[k] = torch.cat(rows) if k == "nz_row" else torch.cat([b[k] for b in batches])
    return out


def batch_to(batch: Any, device: torch.device) -> Any:
    """Move a (possibly nested) batch dict to ``device``; tensors already there are untouched."""
    if isinstance(batch, Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    return batch


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Number of cells in a (possibly nested) batch dict (sum over nested groups)."""
    if "x" in batch:
        return int(batch["x"].shape[0])
    return sum(batch_size_of(v) for v in batch.values() if isinstance(v, Mapping))


def shard_index(idx: Tensor, rank: int, world: int, equal: bool) -> Tensor:
    """Every ``world``-th position from ``rank`` (a rank's shard of a distributed fit); ``equal``
    cuts every shard to the shortest one's length, so all ranks take the same number of steps."""
    part = idx[rank::world]
    return part[: idx.numel() // world] if equal else part


def _shard_batch(batch_size: int, world: int) -> int:
    return max(1, batch_size // world)


# --------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------
class MinibatchSampler:
    """Minibatches of ``CellData.batch`` dicts over an index set.

    Parameters
    ----------
    data
        The cells.
    idx
        Cells to iterate (positions or boolean mask; default all).
    batch_size
        Cells per batch. The last batch may be smaller (even one cell)
        unless ``drop_last``.
    shuffle
        Shuffle the order every epoch (training) or iterate in order.
    seed
        Seed of the sampler's own CPU generator.
    drop_last
        Drop a final incomplete batch.
    """

    def __init__(
        self,
        data: CellData,
        idx: Any = None,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.idx = as_index(idx, data.n_cells)
        if self.idx.numel() == 0:
            raise ValueError("MinibatchSampler got an empty index set")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator()
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> None:
        """Reset the sampler's random state."""
        self.generator.manual_seed(int(seed))

    def shard(self, rank: int, world: int, equal: bool = True) -> MinibatchSampler:
        """This rank's sampler in a distributed fit: its shard of the cells, ``batch_size / world``
        cells per batch (the global batch stays ``batch_size``)."""
        return MinibatchSampler(
            self.data,
            shard_index(self.idx, rank, world, equal),
            _shard_batch(self.batch_size, world),
            self.shuffle,
            drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        n = self.idx.numel()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def cells_per_epoch(self) -> int:
        """Cells one pass yields (``TrainConfig.reference_epoch_cells`` compares it)."""
        n = self.idx.numel()
        return n - n % self.batch_size if self.drop_last else n

    def __iter__(self) -> Iterator[Batch]:
        order = self.idx
        if self.shuffle:
            order = _shuffled(order, self.data, self.generator)
        for i in range(len(self)):
            yield self.data.batch(order[i * self.batch_size : (i + 1) * self.batch_size])


class PairedSampler:
    """Target/control paired minibatches for contrastive training.

    One epoch visits every target cell exactly once (in ``ceil(n_target /
    batch_size)`` batches; the last may hold a single cell). Each target cell
    is paired with a control cell drawn by cycling through a shuffled
    permutation of the controls; when the permutation is exhausted a fresh
    one is drawn (controls are sampled with replacement across epochs, and
    the control stream continues across epochs, so all controls are used
    evenly). With ``shuffle=False`` (validation) target order is fixed and
    the control stream restarts at the same fixed order each epoch, so the
    batches are identical every epoch.

    Parameters
    ----------
    data
        All cells (controls and targets).
    background_idx
        Control (background) cells: positions or boolean mask.
    target_idx
        Target (perturbed) cells: positions or boolean mask.
    batch_size
        Target cells per batch (each batch also holds as many controls).
    shuffle
        Random order (training) or fixed order (validation).
    seed
        Seed of the sampler's CPU generator.
    background_data
        Where the background cells are (``background_idx`` then indexes it); default ``data``.
        With a :class:`StreamingCellData` target source, the controls are kept in memory here.

    Yields
    ------
    dict
        ``{"background": CellData.batch(...), "target": CellData.batch(...)}``
        with the same number of cells in both.
    """

    def __init__(
        self,
        data: CellData,
        background_idx: Any,
        target_idx: Any,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        background_data: CellData | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.background_data = data if background_data is None else background_data
        self.background_idx = as_index(background_idx, self.background_data.n_cells, "background_idx")
        self.target_idx = as_index(target_idx, data.n_cells, "target_idx")
        if self.background_idx.numel() == 0:
            raise ValueError("PairedSampler needs at least one background (control) cell")
        if self.target_idx.numel() == 0:
            raise ValueError("PairedSampler needs at least one target cell")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = torch.Generator()
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> None:
        """Reset the random state (target order and the control stream)."""
        self.generator.manual_seed(int(seed))
        self._bg_perm = torch.empty(0, dtype=torch.long)
        self._bg_pos = 0

    def shard(self, rank: int, world: int, equal: bool = True) -> PairedSampler:
        """This rank's sampler in a distributed fit: its shards of the targets and of the controls,
        ``batch_size / world`` targets per batch (the global batch stays ``batch_size``)."""
        return PairedSampler(
            self.data,
            shard_index(self.background_idx, rank, world, False),
            shard_index(self.target_idx, rank, world, equal),
            _shard_batch(self.batch_size, world),
            self.shuffle,
            background_data=self.background_data,
        )

    def __len__(self) -> int:
        return math.ceil(self.target_idx.numel() / self.batch_size)

    @property
    def cells_per_epoch(self) -> int:
        """Target cells one pass yields, each with a control (``TrainConfig.reference_epoch_cells``)."""
        return int(self.target_idx.numel())

    def _new_bg_perm(self) -> Tensor:
        if self.shuffle:
            return _shuffled(self.background_idx, self.background_data, self.generator)
        return self.background_idx

    def _take_background(self, k: int) -> Tensor:
        parts = []
        while k > 0:
            if self._bg_pos >= self._bg_perm.numel():
                self._bg_perm = self._new_bg_perm()
                self._bg_pos = 0
            take = self._bg_perm[self._bg_pos : self._bg_pos + k]
            self._bg_pos += take.numel()
            k -= take.numel()
            parts.append(take)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __iter__(self) -> Iterator[dict[str, Batch]]:
        targets = self.target_idx
        if self.shuffle:
            targets = _shuffled(targets, self.data, self.generator)
        else:
            self._bg_perm = torch.empty(0, dtype=torch.long)
            self._bg_pos = 0
        for i in range(len(self)):
            tg = targets[i * self.batch_size : (i + 1) * self.batch_size]
            bg = self._take_background(tg.numel())
            yield {"background": self.background_data.batch(bg), "target": self.data.batch(tg)}
