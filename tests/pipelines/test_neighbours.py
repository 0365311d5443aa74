"""kNN graphs, UMAP and Leiden at the sizes users bring.

From 8,192 cells on scanpy finds neighbours with pynndescent instead of an exact search;
pynndescent 0.7.0 crashed there with scipy 1.17 (`csr_array` has no `getnnz`), after every
model had trained. The demo screen (3,375 cells) never reaches that path.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc


def test_neighbours_umap_and_leiden_above_the_pynndescent_threshold() -> None:
    n = 8_192 + 8
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 6.0, size=(4, 10))
    truth = rng.integers(0, 4, size=n)
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
    adata.obsm["X_emb"] = (centres[truth] + rng.normal(size=(n, 10))).astype(np.float32)
    sc.pp.neighbors(adata, use_rep="X_emb", n_neighbors=15, random_state=0)
    assert adata.obsp["connectivities"].shape == (n, n)
    assert adata.obsp["distances"].getnnz(axis=1).min() >= 10  # every cell has its neighbours
    sc.tl.umap(adata, random_state=0, maxiter=20)
    assert adata.obsm["X_umap"].shape == (n, 2) and np.isfinite(adata.obsm["X_umap"]).all()
    sc.tl.leiden(adata, resolution=0.1, random_state=0, flavor="igraph", n_iterations=2, directed=False)
    clusters = adata.obs["leiden"].astype(int).to_numpy()
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, clusters) > 0.9  # four well-separated groups are found
