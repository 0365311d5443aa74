"""Scheduled retraining: screens registry -> Kedro sessions -> MLflow registry, compare, promote.

The ``test`` environment registers two simulated screens (conf/test/screens.yml):
``sim_a`` with the default columns and ``sim_b`` whose labels live in ``guide`` with
``NTC`` controls. The retrain configuration is conf/base's (every pipeline, then the report);
the tests of the registry's compare-and-promote steps trim it to data_processing +
contrastive_model (``CONTRASTIVE_ONLY``), and one test runs it untrimmed. Everything goes
under ``test_root``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from perturbscope.models import ContrastiveVAE, load_model
from perturbscope.models.model import ContrastiveVI
from perturbscope.ops.registry import load_registered_model
from perturbscope.ops.retrain import main, retrain
from perturbscope.simulation import simulate_screen
from tests.conftest import PROJECT, SMALL_SCREEN

NAME = "perturbscope-contrastive-{}"


def write_screen(root: Path, screen: str, seed: int) -> Path:
    """A simulated screen in data/01_raw; sim_b's labels are in ``guide`` with ``NTC`` controls."""
    adata = simulate_screen(**SMALL_SCREEN, seed=seed)
    if screen == "sim_b":
        adata.obs["guide"] = adata.obs.pop("perturbation").astype(str).replace({"control": "NTC"})
    path = root / "data" / "01_raw" / f"{screen}.h5ad"
    adata.write_h5ad(path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def comparison(root: Path, screen: str) -> pd.DataFrame:
    """The latest retrain_comparison table of a screen (a versioned CSV)."""
    folder = root / "data" / "08_reporting" / screen / "retrain_comparison.csv"
    latest = sorted(folder.iterdir())[-1]
    return pd.read_csv(latest / "retrain_comparison.csv")


CONTRASTIVE_ONLY = {"pipelines": ["data_processing", "contrastive_model"], "report_pipelines": []}
"""The retrain configuration trimmed to the contrastive model (the registry tests; the default runs elsewhere)."""


def margins(value: float) -> dict:
    """Runtime parameters giving every key metric of the contrastive model the same margin."""
    keys = ("ari_salient", "knn_accuracy_salient", "phase_leakage_salient")
    metrics = {key: {"margin": value} for key in keys}
    return {"retrain": {**CONTRASTIVE_ONLY, "models": {"contrastive": {"metrics": metrics}}}}


@pytest.fixture
def client(test_root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{test_root / 'mlflow.db'}")


def versions(client: MlflowClient, screen: str) -> list[int]:
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{NAME.format(screen)}'"))


def champion(client: MlflowClient, screen: str) -> int:
    return int(client.get_model_version_by_alias(NAME.format(screen), "champion").version)


def run(**kwargs) -> dict[str, pd.Series]:
    status = retrain(env="test", project_path=PROJECT, **kwargs)
    assert mlflow.active_run() is None  # every session's run is closed
    return {row.screen: row for row in status.itertuples(index=False)}


def test_retrain_only_changed_screens_register_compare_and_promote(test_root: Path, client: MlflowClient) -> None:
    path_a = write_screen(test_root, "sim_a", seed=0)
    path_b = write_screen(test_root, "sim_b", seed=1)

    # 1. both screens are new: trained, registered as version 1, promoted (no champion yet)
    status = run(extra_params={"retrain": CONTRASTIVE_ONLY})
    assert {s: r.status for s, r in status.items()} == {"sim_a": "retrained", "sim_b": "retrained"}
    saved = {}
    for screen, path in (("sim_a", path_a), ("sim_b", path_b)):
        assert versions(client, screen) == [1] and champion(client, screen) == 1
        version = client.get_model_version(NAME.format(screen), "1")
        # the data version: the file's hash and the Kedro save version of the trained model
        assert version.tags["data_sha256"] == sha256(path) == status[screen].data_sha256
        saved[screen] = (
            test_root
            / "data"
            / "06_models"
            / screen
            / "contrastive_model.pt"
            / version.tags["kedro_save_version"]
            / "contrastive_model.pt"
        )
        assert saved[screen].exists()
        assert version.run_id == status[screen].mlflow_run_id
        run_info = client.get_run(version.run_id)
        assert run_info.info.status == "FINISHED" and run_info.data.tags["screen"] == screen
        # parameters and key metrics travel with the version, equal to the run's
        assert '"n_salient": 10' in version.tags["hparams"]
        metric = "contrastive.evaluation.knn_accuracy.salient"
        assert float(version.tags[f"metric.{metric}"]) == pytest.approx(run_info.data.metrics[metric])
        table = comparison(test_root, screen)
        assert set(table["verdict"]) == {"no champion"} and set(table["decision"]) == {"promoted"}
    # sim_b's own column names came from the registry: its processed screen has its controls
    processed_b = next((test_root / "data" / "03_primary" / "sim_b" / "processed_screen.h5ad").iterdir())
    processed_b = ad.read_h5ad(processed_b / "processed_screen.h5ad")
    assert processed_b.obs["is_control"].sum() == (processed_b.obs["guide"] == "NTC").sum() > 0

    # the champion loads back by name and alias as our nn.Module, identical to the saved
    # one, and embeds another screen
    model = load_registered_model(NAME.format("sim_a"), "champion", tracking_uri=client.tracking_uri)
    assert isinstance(model, ContrastiveVAE)
    for key, tensor in load_model(saved["sim_a"]).state_dict().items():
        assert torch.equal(tensor, model.state_dict()[key])
    embedded = ContrastiveVI(model).embed(processed_b, fill_missing=True)
    assert embedded.obsm["X_salient"].shape == (processed_b.n_obs, model.hparams["n_salient"])
    assert load_registered_model(NAME.format("sim_a"), 1, tracking_uri=client.tracking_uri).hparams == model.hparams

    # 2. nothing changed: nothing retrains
    status = run(extra_params={"retrain": CONTRASTIVE_ONLY})
    assert {s: r.status for s, r in status.items()} == {"sim_a": "up_to_date", "sim_b": "up_to_date"}
    assert versions(client, "sim_a") == versions(client, "sim_b") == [1]

    # 3. sim_b's file changes; with generous margins the new version is promoted
    write_screen(test_root, "sim_b", seed=2)
    status = run(extra_params=margins(10.0))
    assert {s: r.status for s, r in status.items()} == {"sim_a": "up_to_date", "sim_b": "retrained"}
    assert versions(client, "sim_a") == [1] and champion(client, "sim_a") == 1
    assert versions(client, "sim_b") == [1, 2] and champion(client, "sim_b") == 2
    table = comparison(test_root, "sim_b")
    assert (table["champion_version"] == 1).all() and (table["candidate_version"] == 2).all()
    assert table["champion_value"].notna().all() and set(table["decision"]) == {"promoted"}
    assert set(table["verdict"]) <= {"better", "equal", "within margin"}

    # 4. it changes again; margins no model can meet (improve every metric by 10) keep v2
    write_screen(test_root, "sim_b", seed=3)
    status = run(extra_params=margins(-10.0))
    assert status["sim_b"].status == "retrained" and status["sim_a"].status == "up_to_date"
    assert versions(client, "sim_b") == [1, 2, 3] and champion(client, "sim_b") == 2
    table = comparison(test_root, "sim_b")
    assert set(table["decision"]) == {"not promoted"} and (table["champion_version"] == 2).all()
    assert set(table["verdict"]) <= {"worse", "not better enough"}
    v3 = client.get_model_version(NAME.format("sim_b"), "3")
    assert v3.tags["promotion"].startswith("not promoted, @champion stays version 2")

    # 5. a half-copied file for sim_a: reported and skipped; no run, nothing written,
    # registered models untouched; the command exits with 1
    experiment = client.get_experiment_by_name("perturbscope-test")
    n_runs = len(client.search_runs([experiment.experiment_id]))
    data = path_a.read_bytes()
    path_a.write_bytes(data[: len(data) // 2])
    before = files(test_root / "data")
    trimmed = "retrain.pipelines=[data_processing,contrastive_model],retrain.report_pipelines=[]"
    assert main(["--env", "test", "--project-path", str(PROJECT), "--params", trimmed]) == 1
    after = files(test_root / "data")
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert all(p.startswith("08_reporting/retrain_status.csv/") for p in changed)  # the status only
    latest = sorted((test_root / "data" / "08_reporting" / "retrain_status.csv").iterdir())[-1]
    table = pd.read_csv(latest / "retrain_status.csv").set_index("screen")
    assert table.loc["sim_a", "status"] == "invalid" and "half-copied" in table.loc["sim_a", "detail"]
    assert table.loc["sim_b", "status"] == "up_to_date"
    assert len(client.search_runs([experiment.experiment_id])) == n_runs
    assert versions(client, "sim_a") == [1] and champion(client, "sim_a") == 1
    assert mlflow.active_run() is None


MODELS = ("contrastive", "linear", "cvae_held_out_cells", "cvae_held_out_perturbations")


def test_the_default_retrain_config_registers_and_promotes_only_after_the_whole_run(
    test_root: Path, client: MlflowClient
) -> None:
    """conf/base's retrain configuration as it is (every pipeline, then the report), next to a corrupt screen."""
    write_screen(test_root, "sim_a", seed=0)
    corrupt = write_screen(test_root, "sim_b", seed=1)
    corrupt.write_bytes(corrupt.read_bytes()[:4000])
    names = [f"perturbscope-{model}-sim_a" for model in MODELS]

    # 1. the report fails (an invalid figure resolution) after every model trained: nothing registered
    status = run(extra_params={"reporting": {"figure_dpi": -1}})
    assert status["sim_a"].status == "failed" and "dpi" in status["sim_a"].detail
    assert status["sim_b"].status == "invalid"
    assert not status["sim_a"].registered and not status["sim_a"].promoted
    assert not [v for name in names for v in client.search_model_versions(f"name='{name}'")]
    assert client.get_run(status["sim_a"].mlflow_run_id).info.status == "FAILED"

    # 2. the same, untouched: retrained, reported, every applicable model registered and promoted
    status = run()
    assert status["sim_a"].status == "retrained" and status["sim_b"].status == "invalid"
    report = test_root / "data" / "08_reporting" / "sim_a" / "report.html"
    assert len(list(report.iterdir())) == 1  # the failed run left no report version behind
    html = (next(report.iterdir()) / "report.html").read_text()
    assert "perturbation_effects" in html or "Perturbation effects" in html
    for model, name in zip(MODELS, names, strict=True):
        if model == "cvae_held_out_perturbations":  # a singles-only screen: nothing to hold out
            assert not client.search_model_versions(f"name='{name}'")
            continue
        assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    table = comparison(test_root, "sim_a")
    assert set(table.loc[table["model"] != "cvae_held_out_perturbations", "decision"]) == {"promoted"}


def test_bad_screens_are_reported_and_skipped_before_any_session(test_root: Path, client: MlflowClient) -> None:
    raw = test_root / "data" / "01_raw"
    (raw / "sim_a.h5ad").write_bytes(b"not an h5ad file" * 64)  # unreadable
    adata = simulate_screen(**SMALL_SCREEN, seed=0)  # default columns, but sim_b's schema wants `guide`
    adata.write_h5ad(raw / "sim_b.h5ad")
    before = files(test_root / "data")

    status = run(screens=["sim_a", "sim_b", "not_registered"])
    assert status["sim_a"].status == "invalid" and "not a readable .h5ad" in status["sim_a"].detail
    assert status["sim_b"].status == "invalid" and "no obs column 'guide'" in status["sim_b"].detail
    assert status["not_registered"].status == "failed"
    assert "sim_a" in status["not_registered"].detail  # lists the registered screens
    after = files(test_root / "data")
    assert {p for p in after if p not in before} == {
        p for p in after if p.startswith("08_reporting/retrain_status.csv/")
    }
    assert not client.search_registered_models()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    # nothing at all for a rejected screen: not even an empty experiment (mlflow's own Default aside)
    assert {e.name for e in client.search_experiments()} <= {"Default"}

    # a registered screen without a file yet is skipped, not an error; a dry run writes nothing
    (raw / "sim_a.h5ad").unlink()
    status = run(screens=["sim_a"])
    assert status["sim_a"].status == "skipped"
    write_screen(test_root, "sim_a", seed=0)
    before = files(test_root / "data")
    status = run(dry_run=True)
    assert status["sim_a"].status == "would_retrain" and status["sim_b"].status == "invalid"
    assert files(test_root / "data") == before


def test_retrain_parameters_are_checked() -> None:
    from perturbscope.ops.registry import RegistryConfigError
    from perturbscope.ops.retrain import RetrainConfig

    params = {
        "pipelines": ["data_processing", "contrastive_model"],
        "preflight_cells": None,
        "models": {
            "contrastive": {
                "pipeline": "contrastive_model",
                "dataset": "contrastive_model",
                "metrics": {"ari": {"metric": "m.ari", "margin": 0.1}},
            }
        },
    }
    config = RetrainConfig.from_params(params)
    assert config.name("contrastive", "sim_a") == "perturbscope-contrastive-sim_a"
    assert config.alias == "champion" and config.preflight_cells is None
    assert config.models[0].rules[0].margin == 0.1
    with pytest.raises(RegistryConfigError, match=r"needs \['dataset'\]"):
        RetrainConfig.from_params({"models": {"m": {"pipeline": "p"}}})
    with pytest.raises(RegistryConfigError, match="must contain"):
        RetrainConfig.from_params({**params, "model_name": "perturbscope-{model}"})


def test_command_line_params() -> None:
    from perturbscope.ops.retrain import _parse_params

    assert _parse_params(
        "retrain.pipelines=[data_processing,contrastive_model],retrain.preflight_cells=null,a=0.5"
    ) == {
        "retrain": {"pipelines": ["data_processing", "contrastive_model"], "preflight_cells": None},
        "a": 0.5,
    }
    with pytest.raises(SystemExit):
        _parse_params("retrain.force")


def test_command_line_under_python_m_logs_its_summary(
    test_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`python -m perturbscope.ops.retrain`, started outside the project, prints what it would do."""
    import os
    import subprocess
    import sys

    write_screen(test_root, "sim_a", seed=0)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "perturbscope.ops.retrain",
            "--env",
            "test",
            "--project-path",
            str(PROJECT),
            "--dry-run",
            "--screens",
            "sim_a",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PERTURBSCOPE_TEST_ROOT": str(test_root), "COLUMNS": "200"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "would_retrain" in output and "sim_a" in output
    assert not list(elsewhere.iterdir())  # nothing written where it was started
