"""The linear_model pipeline end to end in the test environment: the demo screen and a plain count matrix."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
from kedro.framework.session import KedroSession
from mlflow.tracking import MlflowClient

from perturbscope.models.linear import LinearVAE
from perturbscope.pipelines.linear_model.nodes import EFFECT_COLUMNS, TOP_GENE_COLUMNS
from tests.conftest import PROJECT, latest_version

PBMC = PROJECT / "tests" / "data" / "pbmc1k_v3.h5ad"


def test_demo_screen_outputs_and_mlflow_run(run_kedro, test_root: Path) -> None:
    run_kedro(["data_processing", "linear_model"])
    data, screen = test_root / "data", "norman2019_subset"

    model_file = latest_version(data / "06_models" / screen / "linear_model.pt")
    assert model_file.stat().st_size > 0
    embedded = ad.read_h5ad(latest_version(data / "07_model_output" / screen / "linear_embedded_screen.h5ad"))
    assert embedded.obsm["X_ldvae"].shape == (embedded.n_obs, 10)
    assert np.isfinite(embedded.obsm["X_ldvae"]).all()
    assert embedded.varm["ldvae_loadings"].shape == (embedded.n_vars, 10)

    loadings = pd.read_csv(latest_version(data / "07_model_output" / screen / "linear_loadings.csv"))
    assert list(loadings.columns) == ["gene"] + [f"factor_{k}" for k in range(1, 11)]
    assert loadings["gene"].tolist() == embedded.var_names.tolist()
    np.testing.assert_allclose(loadings.iloc[:, 1:].to_numpy(), embedded.varm["ldvae_loadings"], rtol=1e-5, atol=1e-6)

    top = pd.read_csv(latest_version(data / "08_reporting" / screen / "linear_factor_top_genes.csv"))
    assert list(top.columns) == TOP_GENE_COLUMNS
    assert set(top["direction"]) == {"positive", "negative"} and top["rank"].max() == 20

    effects = pd.read_csv(latest_version(data / "08_reporting" / screen / "linear_factor_effects.csv"))
    assert list(effects.columns) == EFFECT_COLUMNS
    n_perturbations = embedded.obs.loc[~embedded.obs["is_control"], "perturbation"].nunique()
    assert len(effects) == 10 * n_perturbations
    assert (effects["ci_low"] <= effects["effect"]).all() and (effects["effect"] <= effects["ci_high"]).all()
    assert (effects.groupby("perturbation")["rank"].min() == 1).all()
    klf1 = effects[(effects["perturbation"] == "KLF1") & (effects["rank"] == 1)].iloc[0]
    assert klf1["program"] == "Pro-growth" and klf1["reading"].startswith("KLF1 ")
    assert latest_version(data / "08_reporting" / screen / "linear_factor_effects_heatmap.png").stat().st_size > 0

    history = pd.read_csv(latest_version(data / "08_reporting" / screen / "linear_training_history.csv"))
    assert len(history) == 6 and history["best"].sum() == 1  # conf/test: max_epochs 6

    # the catalog gives back a ready model that reproduces the loadings
    with KedroSession.create(project_path=PROJECT, env="test") as session:
        model = session.load_context().catalog.load("linear_model")
    assert isinstance(model, LinearVAE) and not model.training
    np.testing.assert_allclose(model.loadings().to_numpy(), loadings.iloc[:, 1:].to_numpy(), rtol=1e-5, atol=1e-6)

    # MLflow: artifacts and metric histories went to the temporary store
    mlflow.set_tracking_uri(f"sqlite:///{test_root / 'mlflow.db'}")
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    client = MlflowClient()
    logged = {a.path for a in client.list_artifacts(run["run_id"], "linear_model")}
    for name in (
        "linear_model.pt",
        "linear_loadings.csv",
        "linear_factor_top_genes.csv",
        "linear_factor_effects.csv",
        "linear_training_history.csv",
        "linear_factor_effects_heatmap.png",
    ):
        assert f"linear_model/{name}" in logged, logged
    assert len(client.get_metric_history(run["run_id"], "linear.training.train_loss")) == 6
    assert "metrics.linear.evaluation.validation_reconstruction_log_likelihood" in run.index
    assert run["params.linear_model.model.n_latent"] == "10"


def test_plain_count_matrix_skips_the_perturbation_table(run_kedro, test_root: Path) -> None:
    """The 10x PBMC 1k counts (no perturbations): factors and loadings, an empty effects table."""
    shutil.copy(PBMC, test_root / "data" / "01_raw" / "pbmc1k_v3.h5ad")
    run_kedro(
        ["data_processing", "linear_model"],
        screen="pbmc1k_v3",
        schema={"perturbation_key": None, "program_key": None},  # runtime params merge into parameters.yml
    )
    data, screen = test_root / "data", "pbmc1k_v3"
    loadings = pd.read_csv(latest_version(data / "07_model_output" / screen / "linear_loadings.csv"))
    assert len(loadings) == 2000 and loadings.shape[1] == 11  # HVGs x (gene + 10 factors)
    assert np.isfinite(loadings.iloc[:, 1:].to_numpy()).all()
    effects = pd.read_csv(latest_version(data / "08_reporting" / screen / "linear_factor_effects.csv"))
    assert list(effects.columns) == EFFECT_COLUMNS and len(effects) == 0
    embedded = ad.read_h5ad(latest_version(data / "07_model_output" / screen / "linear_embedded_screen.h5ad"))
    assert embedded.obsm["X_ldvae"].shape == (embedded.n_obs, 10) and embedded.n_obs > 800  # 841 after QC
    assert (embedded.obs["perturbation"] == "unperturbed").all()
    assert latest_version(data / "08_reporting" / screen / "linear_factor_effects_heatmap.png").exists()
