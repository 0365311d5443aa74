"""Runs that cannot hurt each other: two at once, one that writes the same screen while another runs, one
killed with SIGKILL, hostile screen names and labels, and the MLflow store they share."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import pytest
from kedro.framework.hooks import hook_impl
from mlflow import MlflowClient

from perturbscope.names import ScreenNameError, check_screen_name, file_names
from perturbscope.runs import RUNS_FOLDER, RunLedger
from perturbscope.store import MlflowStoreError, open_store, repair_store
from tests.conftest import PROJECT

SCREEN = "norman2019_subset"


def _kedro(root: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PERTURBSCOPE_TEST_ROOT": str(root),
        "KEDRO_DISABLE_TELEMETRY": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "COLUMNS": "200",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "kedro", "run", "--env", "test", *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _records(root: Path) -> dict[str, dict]:
    folder = root / "data" / RUNS_FOLDER / SCREEN
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if ".running" not in p.name}


def _processed_versions(root: Path) -> list[str]:
    folder = root / "data" / "03_primary" / SCREEN / "processed_screen.h5ad"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("screen", ["../x", "a/b", ".hidden", "a b", ""])
def test_a_screen_name_that_is_not_a_folder_name_is_refused_before_anything_is_written(
    run_kedro, test_root: Path, screen: str
) -> None:
    with pytest.raises(ScreenNameError, match=r"letters, digits, '_' and '-'"):
        run_kedro(["data_processing"], screen=screen)
    written = sorted(str(p.relative_to(test_root)) for p in test_root.rglob("*") if p.is_file())
    assert written == [f"data/01_raw/{SCREEN}.h5ad"]  # no output, no MLflow store, nothing outside data/
    assert check_screen_name("screen_1-b") == "screen_1-b"


def test_perturbation_labels_become_distinct_visible_file_names() -> None:
    labels = ["STAT1", "A+B", "../../evil+A/B", "../../evil+A B", "../x", ".hidden", "a" * 300, "stat1", "x\ny"]
    names = file_names(labels, ".png")
    assert names["STAT1"] == "STAT1.png" and names["A+B"] == "A+B.png"  # safe labels keep their name
    assert len(set(names.values())) == len(labels)
    assert len({n.lower() for n in names.values()}) == len(labels)  # distinct on case-insensitive disks too
    for name in names.values():
        assert "/" not in name and "\n" not in name and not name.startswith(".") and len(name) < 120
    assert names["../../evil+A/B"].startswith("evil+A_B-")


# ------------------------------------------------------------------------------------------ store
def test_two_runs_started_together_on_a_new_store_both_finish(test_root: Path) -> None:
    """No mlflow.db yet; two runs of the same screen start at once: the store is created once, both finish."""
    runs = [_kedro(test_root, "--pipelines", "data_processing", "--params", f"seed={seed}") for seed in (0, 1)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    records = _records(test_root)
    assert len(records) == 2 and len(_processed_versions(test_root)) == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{test_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("perturbscope-test")
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert {record["mlflow_run_id"] for record in records.values()} == set(statuses)
    assert set(statuses.values()) == {"FINISHED"}


def _claim(folder: str, version: str, start: float) -> str:
    while time.time() < start:  # every process claims at the same moment
        pass
    return RunLedger(Path(folder)).claim(version, {"screen": SCREEN})


def test_runs_started_in_the_same_millisecond_claim_distinct_save_versions(tmp_path: Path) -> None:
    """Kedro's save version is the start time to the millisecond: of runs racing for one, exactly one gets
    it and each other run the next free millisecond, also once a run with that version has finished."""
    from concurrent.futures import ProcessPoolExecutor

    version = "2026-12-05T07.45.02.999Z"
    start = time.time() + 1.0
    with ProcessPoolExecutor(6) as pool:
        claimed = list(pool.map(_claim, [str(tmp_path)] * 6, [version] * 6, [start] * 6))
    assert sorted(claimed) == [version] + [f"2026-12-05T07.45.03.00{i}Z" for i in range(5)]
    ledger = RunLedger(tmp_path)
    assert {run.save_version for run in ledger.unfinished()} == set(claimed)
    second = sorted(claimed)[1]
    ledger.finish(version, {"session_id": "s0", "mlflow_run_id": "r0"})  # its record stays, its marker goes
    ledger.finish(second, {"session_id": "s0", "mlflow_run_id": "r1"})  # same session id, another MLflow run
    assert ledger.claim(version, {}) == "2026-12-05T07.45.03.005Z"
    assert ledger.version_of_session("s0", "r0") == version and ledger.version_of_session("s0", "r1") == second
    assert ledger.version_of_session("s1") is None and ledger.version_of_session("s0") == second  # the latest
    assert RunLedger(tmp_path / "other").claim("by-hand", {}) == "by-hand"
    assert RunLedger(tmp_path / "other").claim("by-hand", {}) == "by-hand-2"
    assert not list(tmp_path.rglob("*.tmp"))


def test_save_versions_are_claimed_on_a_file_system_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    ledger = RunLedger(tmp_path)
    version = "2026-12-05T07.45.02.464Z"
    assert [ledger.claim(version, {"screen": SCREEN}) for _ in range(2)] == [version, "2026-12-05T07.45.02.465Z"]
    assert [run.marker["screen"] for run in ledger.unfinished()] == [SCREEN, SCREEN]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_run_given_a_finished_runs_save_version_writes_its_own(
    run_kedro, test_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sessions with the same id (started in the same millisecond): the second writes the next
    millisecond's version, reads its own outputs, and both runs stay complete."""
    import kedro.framework.session.session as kedro_session

    version = "2026-12-05T07.45.02.464Z"
    monkeypatch.setattr(kedro_session, "generate_timestamp", lambda: version)
    run_kedro(["data_processing"])
    run_kedro(["data_processing"], seed=1)
    later = "2026-12-05T07.45.02.465Z"
    assert _processed_versions(test_root) == [version, later]
    records = _records(test_root)
    assert sorted(records) == [version, later] and {r["session_id"] for r in records.values()} == {version}
    assert set(records[later]["saved"].values()) == {later}
    assert RunLedger.of(test_root / "data", SCREEN).unfinished() == []
    folder = test_root / "data/03_primary" / SCREEN / "processed_screen.h5ad"
    first, second = (ad.read_h5ad(folder / v / "processed_screen.h5ad", backed="r") for v in (version, later))
    assert (first.obs["split"] != second.obs["split"]).any()  # each file is its own run's (seeds 0 and 1)


def test_a_half_migrated_store_is_refused_with_its_repair_and_repaired(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_store(uri, "perturbscope-x")
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.get_experiment_by_name("perturbscope-x").experiment_id)
    client.log_metric(run.info.run_id, "ari", 0.9)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # what an interrupted migration leaves
        db.execute("CREATE TABLE _alembic_tmp_metrics AS SELECT * FROM metrics")
        db.execute("ALTER TABLE latest_metrics RENAME TO _alembic_tmp_latest_metrics")
    with pytest.raises(MlflowStoreError, match="perturbscope repair-store"):
        open_store(uri, "perturbscope-x")
    done = repair_store(uri)
    assert any("dropped _alembic_tmp_metrics" in line for line in done)
    assert any("renamed _alembic_tmp_latest_metrics" in line for line in done)
    open_store(uri, "perturbscope-x")
    assert MlflowClient(tracking_uri=uri).get_run(run.info.run_id).data.metrics == {"ari": 0.9}


# ------------------------------------------------------------------------------------------ versions
class _WriteTheScreenMeanwhile:
    """Once run A has saved its processed screen, run B processes the same screen (seed 1) to the end."""

    def __init__(self, root: Path) -> None:
        self.root, self.done = root, None

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        if dataset_name == "processed_screen" and self.done is None:
            other = _kedro(self.root, "--pipelines", "data_processing", "--params", "seed=1")
            self.done = (other.communicate(timeout=600)[0], other.returncode)


def test_a_run_reads_its_own_outputs_while_another_run_writes_the_same_screen(test_root: Path) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT)
    meanwhile = _WriteTheScreenMeanwhile(test_root)
    no_umap = {"contrastive_model": {"embedding": {"umap": False}}}  # not what is tested here; it takes seconds
    with KedroSession.create(project_path=PROJECT, env="test", runtime_params=no_umap) as session:
        session._hook_manager.register(meanwhile)
        session.run(pipeline_names=["data_processing", "contrastive_model"], to_nodes=["embed_cells"])
        own = session.session_id
    log, code = meanwhile.done
    assert code == 0, log[-3000:]
    versions = _processed_versions(test_root)
    assert len(versions) == 2 and versions[0] == own  # B's processed screen is the newer one
    mine = ad.read_h5ad(
        test_root / "data/03_primary" / SCREEN / "processed_screen.h5ad" / own / "processed_screen.h5ad"
    )
    theirs = ad.read_h5ad(
        test_root / "data/03_primary" / SCREEN / "processed_screen.h5ad" / versions[1] / "processed_screen.h5ad"
    )
    assert (mine.obs["split"] != theirs.obs["split"]).any()  # seeds 0 and 1 split the cells differently
    embedded = ad.read_h5ad(
        test_root
        / "data/07_model_output"
        / SCREEN
        / "contrastive_embedded_screen.h5ad"
        / own
        / "contrastive_embedded_screen.h5ad"
    )
    assert (embedded.obs["split"] == mine.obs.loc[embedded.obs_names, "split"]).all()
    record = _records(test_root)[own]
    assert record["saved"]["processed_screen"] == own
    rows = {row["dataset"]: row for row in record["datasets"]}
    assert rows["processed_screen"]["version"] == own and rows["processed_screen"]["written by"] == "this run"


def test_a_killed_run_is_ignored_by_the_next_and_cleaned_up(run_kedro, test_root: Path) -> None:
    from perturbscope.ops.maintenance import main as maintenance

    run_kedro(["data_processing"])  # a complete run
    complete = _processed_versions(test_root)
    assert len(complete) == 1
    ledger = RunLedger.of(test_root / "data", SCREEN)
    killed = _kedro(
        test_root,
        "--pipelines",
        "data_processing,contrastive_model",
        "--params",
        "seed=1,contrastive_model.training.max_epochs=100000,contrastive_model.training.patience=100000",
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (
        len(_processed_versions(test_root)) == 2 and any(run.marker.get("mlflow_run_id") for run in ledger.unfinished())
    ):
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        time.sleep(0.5)
    time.sleep(3)  # well inside contrastiveVI's training
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    (dead,) = ledger.unfinished()
    assert dead.killed and len(_processed_versions(test_root)) == 2

    from kedro.framework.session import KedroSession

    no_umap = {"contrastive_model": {"embedding": {"umap": False}}}
    with KedroSession.create(project_path=PROJECT, env="test", runtime_params=no_umap) as session:
        # the next run reads the complete run's processed screen
        session.run(pipeline_names=["contrastive_model"], to_nodes=["embed_cells"])
    latest = max(_records(test_root).values(), key=lambda record: record["save_version"])
    assert latest["inputs"]["processed_screen"] == complete[0]
    rows = {row["dataset"]: row for row in latest["datasets"]}
    assert rows["processed_screen"]["written by"].startswith(f"run {complete[0]}")

    assert maintenance(["clean", "--env", "test", "--project-path", str(PROJECT)]) == 0
    assert _processed_versions(test_root) == complete and ledger.unfinished() == []
    client = MlflowClient(tracking_uri=f"sqlite:///{test_root / 'mlflow.db'}")
    assert client.get_run(dead.marker["mlflow_run_id"]).info.status == "KILLED"
    assert not list((test_root / "data").rglob(dead.save_version))  # nothing of it is left


HOSTILE = ["../../evil", "../../evil+A/B", "../../evil+A B", "A/B", ".hidden", "x" * 150, "naïve gene", "semi;colon"]


def test_hostile_labels_run_through_the_default_run(run_kedro, test_root: Path) -> None:
    """Labels with slashes, dots, spaces and 150 characters: every output stays under data/, and every
    perturbation drawn gets its own visible figure, mapped back to its label."""
    import pandas as pd

    from perturbscope.simulation import simulate_screen

    adata = simulate_screen(
        n_cells=900,
        n_genes=300,
        n_programs=2,
        perturbations_per_program=4,
        n_null_perturbations=0,
        genes_per_program=15,
        seed=0,
    )
    labels = sorted(set(adata.obs["perturbation"].astype(str)) - {"control"})
    rename = dict(zip(labels, HOSTILE, strict=True))
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).replace(rename).astype("category")
    adata.write_h5ad(test_root / "data" / "01_raw" / "sim_a.h5ad")
    before = set(test_root.parent.rglob("*"))

    run_kedro(perturbation_prediction={"figures": {"max_figures": 50}}, screen="sim_a")

    outside = set(test_root.parent.rglob("*")) - before
    assert all(test_root in p.parents for p in outside)  # nothing outside the run's folder
    assert {p.name for p in test_root.iterdir()} <= {"data", "mlflow.db", "mlflow.db.lock", "mlruns"}
    reporting = test_root / "data" / "08_reporting" / "sim_a"
    figures = next((reporting / "prediction_figures" / "held_out_cells").iterdir()) / "held_out_cells"
    index = pd.read_csv(
        next((reporting / "prediction_figures" / "held_out_cells_index.csv").iterdir()) / "held_out_cells_index.csv"
    )
    drawn = set(index["perturbation"])
    assert drawn == set(HOSTILE)  # every perturbation has test cells in this split
    files = sorted(p.name for p in figures.iterdir())
    assert sorted(index["file"]) == files and len(files) == len(HOSTILE)
    assert not [name for name in files if name.startswith(".") or "/" in name]
    report = next((reporting / "report.html").iterdir()) / "report.html"
    assert "../../evil+A/B" in report.read_text() or "../../evil+A/B".replace("/", "&#x2F;") in report.read_text()
