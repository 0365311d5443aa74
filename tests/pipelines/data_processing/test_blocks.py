"""data_processing runs one implementation over blocks of cells: from memory and from disk it gives scanpy's result."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from perturbscope.blocks import BlockScreen
from perturbscope.pipelines.data_processing import nodes
from perturbscope.schema import COUNTS_LAYER, PHASE, ScreenValidationError
from perturbscope.simulation import load_cell_cycle_genes, simulate_screen

SCHEMA = {"perturbation_key": "perturbation", "control_labels": ["control"], "batch_key": None}
QC = {
    "min_genes_per_cell": 20,
    "min_cells_per_gene": 3,
    "max_mito_fraction": 0.2,
    "mito_prefix": "MT-",
    "min_cells_per_perturbation": 10,
}


def _raw(tmp_path, n_cells=1500, n_genes=400, batches=1, seed=3) -> tuple[ad.AnnData, str]:
    screen = simulate_screen(n_cells=n_cells, n_genes=n_genes, n_batches=batches, seed=seed)
    # a few mitochondrial genes, with some cells above the threshold, and one dead gene
    names = screen.var_names.to_numpy().copy()
    names[-4:] = ["MT-CO1", "MT-CO2", "MT-ND1", "MT-ATP6"]
    screen.var_names = names
    counts = screen.X.tolil()
    rng = np.random.default_rng(seed)
    for cell in rng.choice(screen.n_obs, 40, replace=False):
        counts[cell, screen.n_vars - 1] = 5000
    counts[:, 5] = 0
    for cell in rng.choice(screen.n_obs, 7, replace=False):  # cells with too few genes
        counts[cell, 10:] = 0
    screen.X = sp.csr_matrix(counts)
    path = str(tmp_path / "raw.h5ad")
    screen.write_h5ad(path)
    return ad.read_h5ad(path), path


def _process(screen, hvg, batch_key=None):
    validated = nodes.validate_screen(screen, {**SCHEMA, "batch_key": batch_key}, "s")
    qc, table = nodes.quality_control(validated, QC)
    normalised = nodes.normalise(qc, {"target_sum": 1e4})
    phased = nodes.score_cell_cycle(normalised, {"min_genes_per_phase": 5, "n_bins": 25}, seed=0)
    selected = nodes.select_highly_variable_genes(phased, hvg, batch_key)
    return nodes.label_cells(selected, {**SCHEMA, "batch_key": batch_key}, {"validation_fraction": 0.1}, seed=0), table


def _scanpy(raw: ad.AnnData, n_top_genes: int, batch_key: str | None) -> ad.AnnData:
    """The reference: the same steps with scanpy on the whole matrix in memory."""
    out = raw.copy()
    out.X = sp.csr_matrix(out.X, dtype=np.float32)
    sc.pp.filter_cells(out, min_genes=QC["min_genes_per_cell"])
    out.var["mt"] = out.var_names.str.upper().str.startswith("MT-")
    sc.pp.calculate_qc_metrics(out, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    out = out[out.obs["pct_counts_mt"].to_numpy() <= 100.0 * QC["max_mito_fraction"]].copy()
    sc.pp.filter_genes(out, min_cells=QC["min_cells_per_gene"])
    out.layers["counts"] = out.X.copy()
    out.obs["total_counts"] = np.asarray(out.X.sum(axis=1)).ravel()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    s_genes, g2m_genes = nodes.tirosh_cell_cycle_genes()
    present = set(out.var_names)
    sc.tl.score_genes_cell_cycle(
        out,
        s_genes=[g for g in s_genes if g in present],
        g2m_genes=[g for g in g2m_genes if g in present],
        n_bins=25,
        random_state=0,
    )
    sc.pp.highly_variable_genes(
        out, flavor="seurat_v3", n_top_genes=n_top_genes, layer="counts", batch_key=batch_key, span=0.3
    )
    return out[:, out.var["highly_variable"].to_numpy()].copy()


@pytest.mark.parametrize("batches", [1, 3])
def test_processing_in_blocks_gives_scanpys_result_from_memory_and_from_disk(tmp_path, batches) -> None:
    memory, path = _raw(tmp_path, batches=batches)
    batch_key = "batch" if batches > 1 else None
    hvg = {"n_top_genes": 150, "span": 0.3}
    expected = _scanpy(memory, 150, batch_key)
    in_memory, expected_table = _process(memory, hvg, batch_key)
    lazy, table = _process(BlockScreen.open(path, chunk_size=97), hvg, batch_key)
    assert isinstance(lazy, BlockScreen) and lazy.on_disk and not in_memory.on_disk

    pd.testing.assert_frame_equal(table, expected_table)
    for screen in (lazy, in_memory):
        assert list(screen.var_names) == list(expected.var_names)
        assert list(screen.obs_names) == list(expected.obs_names)
        for column in ("total_counts", "n_genes", "phase"):
            pd.testing.assert_series_equal(
                screen.obs[column], expected.obs[column], check_dtype=False, check_categorical=False
            )
        np.testing.assert_allclose(
            screen.obs[["S_score", "G2M_score"]], expected.obs[["S_score", "G2M_score"]], rtol=0, atol=2e-6
        )  # float32 normalised values
        np.testing.assert_allclose(screen.var["variances_norm"], expected.var["variances_norm"], rtol=2e-5)
        np.testing.assert_array_equal(screen.var["highly_variable_rank"], expected.var["highly_variable_rank"])
    expected = in_memory.to_memory()  # the labels: the same nodes from memory
    removed = table.set_index("step")
    assert removed.loc["min_genes_per_cell=20", "cells_removed"] >= 7
    assert removed.loc["max_mito_fraction=0.2", "cells_removed"] >= 30
    assert removed.loc["min_cells_per_gene=3", "genes_removed"] >= 1
    assert list(lazy.var_names) == list(expected.var_names)
    assert list(lazy.obs_names) == list(expected.obs_names)
    for column in ("perturbation", "split", "is_control", "perturbed_genes", PHASE, "total_counts", "n_genes"):
        pd.testing.assert_series_equal(lazy.obs[column], expected.obs[column], check_dtype=False)

    written = tmp_path / "processed.h5ad"
    lazy.write_h5ad(written, chunk_size=113, compression="gzip")
    back = ad.read_h5ad(written)
    assert back.shape == expected.shape and set(back.layers) == {COUNTS_LAYER}
    assert abs(back.layers[COUNTS_LAYER] - expected.layers[COUNTS_LAYER]).max() == 0
    assert abs(back.X - expected.X).max() < 1e-5
    pd.testing.assert_frame_equal(back.obs[["perturbation", "split"]], expected.obs[["perturbation", "split"]])


def test_cell_cycle_genes_are_scored() -> None:
    # the simulated screens carry the Tirosh genes, so the scores above are real scores
    s_genes, g2m_genes = load_cell_cycle_genes()
    screen = simulate_screen(n_cells=50, n_genes=400, seed=3)
    assert len(set(screen.var_names) & set(s_genes)) >= 5 and len(set(screen.var_names) & set(g2m_genes)) >= 5


def test_bad_counts_on_disk_name_the_cells(tmp_path) -> None:
    memory, path = _raw(tmp_path, n_cells=300)
    memory.X = memory.X.astype(np.float32)
    memory.X.data[memory.X.indptr[250]] = 0.5
    memory.write_h5ad(path)
    with pytest.raises(ScreenValidationError, match=r"Cells 200-299: X holds 1 non-integer value"):
        nodes.validate_screen(BlockScreen.open(path, chunk_size=100), SCHEMA, "s")


def test_qc_guard_on_disk_names_the_step(tmp_path) -> None:
    _, path = _raw(tmp_path, n_cells=300)
    validated = nodes.validate_screen(BlockScreen.open(path, chunk_size=64), SCHEMA, "s")
    with pytest.raises(ScreenValidationError, match="min_genes_per_cell=100000 removed 300 of 300 cells"):
        nodes.quality_control(validated, {**QC, "min_genes_per_cell": 100000})
