from __future__ import annotations

from pathlib import Path

import anndata as ad
import mlflow
import pandas as pd

from tests.conftest import PROJECT, latest_version


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def test_data_processing_in_test_env(run_kedro, test_root: Path) -> None:
    project_db = PROJECT / "mlflow.db"
    before = _mtime(project_db)
    run_kedro(["data_processing"])

    processed_dir = test_root / "data" / "03_primary" / "norman2019_subset" / "processed_screen.h5ad"
    versions = list(processed_dir.iterdir())
    assert len(versions) == 1  # versioned: one timestamped folder
    processed = ad.read_h5ad(versions[0] / "processed_screen.h5ad")
    assert "counts" in processed.layers
    for column in ("is_control", "split", "phase", "n_perturbed_genes", "cell_group"):
        assert column in processed.obs
    assert processed.obs["is_control"].sum() > 0
    # X is log-normalised, the counts layer holds integers
    assert processed.X.max() < 15 and (processed.layers["counts"].data % 1 == 0).all()

    summary = pd.read_csv(
        latest_version(test_root / "data" / "08_reporting" / "norman2019_subset" / "screen_summary.csv")
    )
    assert summary["cells_raw"].sum() == 3375
    assert summary.loc[summary["is_control"], "perturbation"].tolist() == ["control"]
    assert summary["cells_kept"].sum() == processed.n_obs
    qc = pd.read_csv(latest_version(test_root / "data" / "08_reporting" / "norman2019_subset" / "qc_summary.csv"))
    assert qc["genes_left"].iloc[-1] == processed.n_vars

    # MLflow went to the temporary store, tagged with the screen, parameters flattened
    assert _mtime(project_db) == before
    mlflow.set_tracking_uri(f"sqlite:///{test_root / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.screen"] == "norman2019_subset"
    assert run["params.data_processing.qc.min_cells_per_gene"] == "3"


def test_screen_param_selects_file_and_output_folder(run_kedro, test_root: Path) -> None:
    raw = test_root / "data" / "01_raw"
    (raw / "norman2019_subset.h5ad").rename(raw / "other_screen.h5ad")
    run_kedro(["data_processing"], screen="other_screen")
    assert latest_version(test_root / "data" / "08_reporting" / "other_screen" / "screen_summary.csv").exists()
    assert not (test_root / "data" / "08_reporting" / "norman2019_subset").exists()
