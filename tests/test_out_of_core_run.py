"""`kedro run` on a screen read from disk in blocks (on_disk_above_gb=0): the processed screen is the
in-memory run's, contrastiveVI trains and embeds streaming, and a run with nodes that need memory
stops before it starts."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbscope.schema import ScreenValidationError
from tests.conftest import latest_version

SCREEN = "norman2019_subset"


def test_on_disk_run_matches_the_in_memory_processing_and_trains(run_kedro, test_root: Path) -> None:
    data = test_root / "data"
    run_kedro(["data_processing"])
    in_memory = ad.read_h5ad(latest_version(data / "03_primary" / SCREEN / "processed_screen.h5ad"))
    run_kedro(["data_processing", "contrastive_model"], on_disk_above_gb=0, chunk_size=500)
    versions = sorted((data / "03_primary" / SCREEN / "processed_screen.h5ad").iterdir())
    assert len(versions) == 2
    on_disk = ad.read_h5ad(versions[-1] / "processed_screen.h5ad")

    assert list(on_disk.obs_names) == list(in_memory.obs_names)
    assert list(on_disk.var_names) == list(in_memory.var_names)
    assert abs(on_disk.layers["counts"] - in_memory.layers["counts"]).max() == 0
    assert abs(on_disk.X - in_memory.X).max() < 1e-5
    for column in ("perturbation", "split", "is_control", "phase", "n_perturbed_genes"):
        pd.testing.assert_series_equal(on_disk.obs[column], in_memory.obs[column], check_dtype=False)
    common = [c for c in in_memory.var.columns if c in on_disk.var.columns]
    assert "highly_variable" in common and "n_cells" in common
    pd.testing.assert_frame_equal(on_disk.var[common], in_memory.var[common], check_dtype=False)

    embedded = ad.read_h5ad(latest_version(data / "07_model_output" / SCREEN / "contrastive_embedded_screen.h5ad"))
    for key in ("X_salient", "X_background", "X_pca_baseline", "X_umap_salient"):
        assert np.isfinite(embedded.obsm[key]).all()
    history = pd.read_csv(latest_version(data / "08_reporting" / SCREEN / "contrastive_training_history.csv"))
    assert len(history) == 4 and np.isfinite(history["val_loss"]).all()
    genes = pd.read_csv(latest_version(data / "07_model_output" / SCREEN / "contrastive_salient_genes.csv"))
    assert genes["perturbation"].nunique() == 33


def test_a_run_that_needs_memory_stops_before_it_starts(run_kedro, test_root: Path) -> None:
    with pytest.raises(ScreenValidationError, match=r"need it in memory: .*train_linear_model"):
        run_kedro(["data_processing", "linear_model"], on_disk_above_gb=0)
    assert not (test_root / "data" / "03_primary").exists()  # nothing was written
