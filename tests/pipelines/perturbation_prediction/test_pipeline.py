"""The whole pipeline on the demo screen in the `test` environment (small budgets)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from perturbscope.datasets import TorchModelDataset
from perturbscope.pipelines.perturbation_prediction.metrics import METRIC_COLUMNS
from perturbscope.pipelines.perturbation_prediction.pipeline import create_pipeline
from tests.conftest import latest_version

DOUBLES = {"KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"}


def test_pipeline_structure() -> None:
    pipe = create_pipeline()
    names = {n.name for n in pipe.nodes}
    for split in ("held_out_cells", "held_out_perturbations"):
        assert f"{split}.train_cvae" in names and f"{split}.evaluate_predictions" in names
    assert pipe.inputs() >= {"processed_screen", "params:perturbation_prediction.splits.held_out_cells"}
    assert {"prediction_metrics", "prediction_summary", "prediction_mlflow_metrics"} <= pipe.all_outputs()


def test_perturbation_prediction_in_test_env(run_kedro, test_root: Path) -> None:
    run_kedro(["data_processing", "perturbation_prediction"])
    screen = "norman2019_subset"
    report = test_root / "data" / "08_reporting" / screen

    metrics = pd.read_csv(latest_version(report / "prediction_metrics.csv"))
    assert set(metrics["evaluation"]) == {"held_out_cells", "held_out_perturbations"}
    doubles = metrics[metrics["evaluation"] == "held_out_perturbations"]
    assert set(doubles["perturbation"]) == DOUBLES  # default: doubles whose singles are both in the screen
    assert set(doubles["method"]) == {"cvae_prior", "cvae_controls", "no_change", "perturbed_mean", "additive"}
    cells = metrics[metrics["evaluation"] == "held_out_cells"]
    assert cells["perturbation"].nunique() == 33
    # additive: for the doubles whose singles both have training cells
    assert set(cells.loc[cells["method"] == "additive", "perturbation"]) == DOUBLES
    assert (cells.groupby("perturbation")["method"].apply(lambda m: "same_perturbation" in set(m))).all()
    assert doubles["n_true_cells"].min() >= 79  # every cell of a held-out double is a test cell
    for column in METRIC_COLUMNS:
        assert column in metrics
    # 169 genes < 1,000: the L2 runs over every gene, so it is the root of G x MSE
    np.testing.assert_allclose(metrics["l2_top_expressed"], np.sqrt(169 * metrics["mse"]), rtol=1e-9)
    # K = 100 < 169 genes, so J(100) is defined for every method that predicts a change
    assert metrics.loc[metrics["method"] != "no_change", "jaccard_top100"].notna().all()

    summary = pd.read_csv(latest_version(report / "prediction_summary.csv"))
    assert len(summary) == 11  # 6 methods on held-out cells, 5 on held-out doubles
    assert {"pearson_delta_mean", "pearson_delta_sd", "energy_distance_mean"} <= set(summary.columns)

    # figures: at most max_figures (2 in the test env) per split, plus the summary panel
    for split in ("held_out_cells", "held_out_perturbations"):
        assert len(list(latest_version(report / "prediction_figures" / split).glob("*.png"))) == 2
    assert latest_version(report / "prediction_summary.png").stat().st_size > 10_000

    # nothing of a held-out double trained the model
    model_input = test_root / "data" / "05_model_input" / screen
    split_table = pd.read_csv(latest_version(model_input / "held_out_perturbations" / "prediction_split.csv"))
    assert (split_table.loc[split_table["perturbation"].isin(DOUBLES), "role"] == "test").all()
    assert split_table.loc[split_table["role"] == "reference", "is_control"].all()
    model_dir = test_root / "data" / "06_models" / screen / "held_out_perturbations" / "cvae_model.pt"
    model = TorchModelDataset(filepath=str(next(model_dir.iterdir()) / "cvae_model.pt")).load()
    assert not set(model.metadata["train_perturbations"]) & DOUBLES
    assert model.metadata["held_out_perturbations"] == sorted(DOUBLES)
    assert model.can_predict("KLF1+MAP2K6")

    # MLflow: summary means as metrics, tables and figures as artifacts
    mlflow.set_tracking_uri(f"sqlite:///{test_root / 'mlflow.db'}")
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    assert run["metrics.perturbation_prediction.held_out_perturbations.additive.pearson_delta"] > 0.5
    assert "metrics.perturbation_prediction.held_out_cells.cvae_controls.mse" in run.index
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"], "perturbation_prediction")}
    assert {
        "perturbation_prediction/prediction_metrics.csv",
        "perturbation_prediction/prediction_summary.csv",
        "perturbation_prediction/prediction_summary.png",
        "perturbation_prediction/figures",
    } <= artifacts
    # the cVAE training curve of each split, one value per epoch (as for the other two models)
    client = mlflow.MlflowClient()
    for split in ("held_out_cells", "held_out_perturbations"):
        history = pd.read_csv(
            latest_version(test_root / "data" / "06_models" / screen / split / "cvae_training_history.csv")
        )
        losses = client.get_metric_history(run["run_id"], f"perturbation_prediction.{split}.training.train_loss")
        assert [m.step for m in losses] == history["epoch"].tolist()
        assert [m.value for m in losses] == history["train_loss"].tolist()
