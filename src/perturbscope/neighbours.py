"""kNN graphs of an embedding, and the UMAPs and Leiden clusters drawn on them: one implementation for the model
API (UMAPs of the latent spaces), the contrastive evaluation (Leiden, kNN accuracy) and the report.

The neighbours are exact (scikit-learn's ``KNeighborsTransformer`` through scanpy's ``transformer="sklearn"``)
rather than scanpy's default, which switches to pynndescent's approximate search from 8,192 cells on. On these
low-dimensional embeddings (10-30 dimensions) the exact search is fast, its result does not depend on a seed,
and it avoids pynndescent's numba compilation, which cost about 55 s of every run's first kNN graph on 2 cores
(the compiled parallel functions are not cached between processes). The connectivities are scanpy's (umap's
fuzzy simplicial set), as before.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc

__all__ = ["leiden", "neighbour_graph", "umap"]

_REP = "X_space"


def neighbour_graph(points: np.ndarray, n_neighbors: int = 15, seed: int = 0) -> ad.AnnData:
    """An AnnData holding the exact ``n_neighbors``-nearest-neighbour graph of ``points`` (cells x dims):
    ``obsp["distances"]`` and ``obsp["connectivities"]``, ready for :func:`umap` and :func:`leiden`."""
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[0] < 3:
        raise ValueError(f"a kNN graph needs a 2-D array of at least 3 cells, got shape {points.shape}")
    holder = ad.AnnData(np.zeros((points.shape[0], 0), dtype=np.float32))
    holder.obsm[_REP] = points
    k = max(2, min(int(n_neighbors), points.shape[0] - 1))
    sc.pp.neighbors(holder, n_neighbors=k, use_rep=_REP, random_state=seed, transformer="sklearn")
    return holder


def umap(graph: ad.AnnData, min_dist: float = 0.5, seed: int = 0) -> np.ndarray:
    """2-D UMAP coordinates (float32) of the cells of a :func:`neighbour_graph`."""
    sc.tl.umap(graph, min_dist=float(min_dist), random_state=seed)
    return np.asarray(graph.obsm["X_umap"], dtype=np.float32)


def leiden(graph: ad.AnnData, resolution: float, seed: int = 0) -> np.ndarray:
    """Leiden clusters (igraph, 2 iterations, undirected) of a :func:`neighbour_graph` at ``resolution``."""
    sc.tl.leiden(
        graph, resolution=float(resolution), flavor="igraph", n_iterations=2, directed=False, random_state=seed
    )
    return graph.obs["leiden"].to_numpy().astype(str)
