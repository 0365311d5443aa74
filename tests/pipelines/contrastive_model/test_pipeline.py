"""The whole pipeline in the test environment, on the demo screen."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
from kedro.framework.session import KedroSession
from mlflow.tracking import MlflowClient

from perturbscope.models.model import ContrastiveVI
from tests.conftest import PROJECT, latest_version


def test_pipeline_outputs_and_mlflow_run(run_kedro, test_root: Path) -> None:
    run_kedro(["data_processing", "contrastive_model"])
    data = test_root / "data"
    screen = "norman2019_subset"

    model_file = latest_version(data / "06_models" / screen / "contrastive_model.pt")
    assert model_file.stat().st_size > 0
    embedded = ad.read_h5ad(latest_version(data / "07_model_output" / screen / "contrastive_embedded_screen.h5ad"))
    for key, width in (("X_salient", 10), ("X_background", 10), ("X_umap_salient", 2), ("X_umap_background", 2)):
        assert embedded.obsm[key].shape == (embedded.n_obs, width)
        assert np.isfinite(embedded.obsm[key]).all()

    history = pd.read_csv(latest_version(data / "08_reporting" / screen / "contrastive_training_history.csv"))
    assert len(history) == 4 and history["best"].sum() == 1  # conf/test: max_epochs 4

    evaluation = pd.read_csv(latest_version(data / "08_reporting" / screen / "contrastive_evaluation.csv"))
    program = evaluation[(evaluation["key"] == "gene_program") & (evaluation["cells"] == "perturbed")]
    # the escape mixture is on by default: the program scores again over the cells called perturbed
    assert (evaluation["cells"] == "called_perturbed").any()
    assert set(program["space"]) == {"salient", "background", "pca"}
    assert set(program["metric"]) == {"ari", "nmi", "silhouette", "knn_accuracy"}
    assert (program["n_classes"] == 5).all()  # 'unassigned' and controls left out
    # the demo screen has no Tirosh genes: phase is unknown and skipped with a note
    phase = evaluation[evaluation["key"] == "phase"]
    assert len(phase) == 1 and "unknown" in phase["note"].iloc[0]

    genes = pd.read_csv(latest_version(data / "07_model_output" / screen / "contrastive_salient_genes.csv"))
    assert genes["perturbation"].nunique() == 33 and "control" not in set(genes["perturbation"])
    assert (genes.groupby("perturbation")["rank"].min() == 1).all()
    assert genes.groupby("perturbation")["mean_log2fc"].apply(lambda s: s.abs().is_monotonic_decreasing).all()
    assert latest_version(data / "08_reporting" / screen / "contrastive_umaps.png").stat().st_size > 10_000

    # MLflow: parameters, the metric history per epoch, the evaluation metrics and the artifacts
    mlflow.set_tracking_uri(f"sqlite:///{test_root / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["params.contrastive_model.model.n_salient"] == "10"
    client = MlflowClient()
    train_loss = client.get_metric_history(run["run_id"], "contrastive.training.train_loss")
    assert [m.step for m in train_loss] == [0, 1, 2, 3]
    assert [m.value for m in train_loss] == list(history["train_loss"])
    assert len(client.get_metric_history(run["run_id"], "contrastive.training.val_loss")) == 4
    ari = program.set_index(["metric", "space"]).loc[("ari", "salient"), "value"]
    assert run["metrics.contrastive.evaluation.ari.salient"] == ari
    artifacts = {a.path for a in client.list_artifacts(run["run_id"], "contrastive_model")}
    assert {
        "contrastive_model/contrastive_model.pt",
        "contrastive_model/contrastive_evaluation.csv",
        "contrastive_model/contrastive_salient_genes.csv",
        "contrastive_model/contrastive_training_history.csv",
        "contrastive_model/contrastive_umaps.png",
        "contrastive_model/contrastive_escape_mixture.json",
    } <= artifacts

    # a user loads the model from the catalog and embeds a screen with it
    with KedroSession.create(project_path=PROJECT, env="test") as session:
        catalog = session.load_context().catalog
        model = catalog.load("contrastive_model")
        processed = catalog.load("processed_screen")
    again = ContrastiveVI(model).embed(processed)
    np.testing.assert_array_equal(again.obsm["X_salient"], embedded.obsm["X_salient"])
    np.testing.assert_array_equal(again.obsm["X_background"], embedded.obsm["X_background"])
