"""kNN graphs, UMAP and Leiden at the sizes users bring (perturbscope.neighbours).

The graphs are exact (scikit-learn) at every size: scanpy's default switches to pynndescent from 8,192 cells
on, whose compilation cost about 55 s per run, and whose 0.7.0 crashed with scipy 1.17 after every model had
trained. The demo screen (3,375 cells) never reaches that size; this test does.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from perturbscope import neighbours


def test_exact_neighbours_umap_and_leiden_above_scanpys_pynndescent_threshold() -> None:
    n = 8_192 + 8
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 6.0, size=(4, 10))
    truth = rng.integers(0, 4, size=n)
    points = (centres[truth] + rng.normal(size=(n, 10))).astype(np.float32)
    graph = neighbours.neighbour_graph(points, n_neighbors=15, seed=0)
    assert graph.obsp["connectivities"].shape == (n, n)
    distances = graph.obsp["distances"]
    assert distances.getnnz(axis=1).min() >= 10  # every cell has its neighbours
    # exact: the nearest other cell of every cell is sklearn's brute-force one
    exact = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(points).kneighbors(points)[1][:, 1]
    nearest = np.asarray([row.indices[np.argmin(row.data)] for row in distances[:500]])
    assert (nearest == exact[:500]).mean() > 0.99
    again = neighbours.neighbour_graph(points, n_neighbors=15, seed=1)  # no seed in an exact search
    assert (again.obsp["distances"] != distances).nnz == 0
    clusters = neighbours.leiden(graph, resolution=0.1, seed=0)
    assert adjusted_rand_score(truth, clusters) > 0.9  # four well-separated groups are found
    coordinates = neighbours.umap(neighbours.neighbour_graph(points[:2000], 15, 0), min_dist=0.5, seed=0)
    assert coordinates.shape == (2000, 2) and np.isfinite(coordinates).all()
