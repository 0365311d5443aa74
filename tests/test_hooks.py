"""Project hooks: one MLflow store per project, and versioned outputs a failed run never spoils."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import pytest

from perturbscope.hooks import ProjectStoreHook, resolve_mlflow_config, resolve_store_uri
from tests.conftest import PROJECT


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///mlflow.db", "sqlite:////proj/mlflow.db"),
        ("sqlite:///sub/runs.db", "sqlite:////proj/sub/runs.db"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("mlruns", "file:///proj/mlruns"),
        ("/abs/mlruns", "file:///abs/mlruns"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("databricks", "databricks"),
        (None, None),
    ],
)
def test_store_uri_is_resolved_against_the_project(uri: str | None, expected: str | None) -> None:
    assert resolve_store_uri(uri, "/proj") == expected


def test_the_project_mlflow_yml_points_at_one_store_wherever_kedro_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conf/base/mlflow.yml read from another working directory still names <project>/mlflow.db."""
    from kedro.config import OmegaConfigLoader
    from kedro.framework.project import settings
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    loader = OmegaConfigLoader(
        conf_source=str(PROJECT / "conf"),
        env="base",
        runtime_params={"screen": "x"},
        **{**settings.CONFIG_LOADER_ARGS, "default_run_env": "base"},
    )
    opened = []  # the store the hook would create, recorded instead: this test must not create the project's
    monkeypatch.setattr("perturbscope.store.open_store", lambda *args, **kwargs: opened.append(args))
    context = SimpleNamespace(config_loader={"mlflow": loader["mlflow"]}, project_path=PROJECT, params={"screen": "x"})
    ProjectStoreHook().after_context_created(context)
    assert opened and opened[0][:2] == (f"sqlite:///{PROJECT.resolve().as_posix()}/mlflow.db", "perturbscope-x")
    server = context.config_loader["mlflow"]["server"]
    assert server["mlflow_tracking_uri"] == f"sqlite:///{PROJECT.resolve().as_posix()}/mlflow.db"
    artifacts = context.config_loader["mlflow"]["tracking"]["experiment"]["create_experiment_kwargs"]
    assert artifacts["artifact_location"] == (PROJECT.resolve() / "mlruns").as_uri()
    assert not list(tmp_path.iterdir())


def test_resolve_keeps_a_shared_server_and_an_explicit_artifact_location() -> None:
    conf = {
        "server": {"mlflow_tracking_uri": "http://mlflow:5000"},
        "tracking": {"experiment": {"create_experiment_kwargs": {"artifact_location": "s3://bucket/runs"}}},
    }
    out = resolve_mlflow_config(conf, "/proj")
    assert out["server"]["mlflow_tracking_uri"] == "http://mlflow:5000"
    assert out["tracking"]["experiment"]["create_experiment_kwargs"]["artifact_location"] == "s3://bucket/runs"
    assert conf["server"]["mlflow_tracking_uri"] == "http://mlflow:5000"  # the input is not modified


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_rerun_keeps_earlier_outputs_and_a_failed_run_leaves_none(run_kedro, test_root: Path) -> None:
    """Every output is versioned; a run that fails removes what it wrote; the latest is the last complete run."""
    from kedro.framework.session import KedroSession

    from perturbscope.parameters import ConfigError

    data = test_root / "data"
    processed = data / "03_primary" / "norman2019_subset" / "processed_screen.h5ad"
    summary = data / "08_reporting" / "norman2019_subset" / "screen_summary.csv"
    run_kedro(["data_processing"])
    first = _versions(processed)
    assert len(first) == 1 and _versions(summary) == first  # one run, one version folder name

    # the second run writes a new processed screen, then fails in contrastive_model
    with pytest.raises(ConfigError, match=r"contrastive_model\.training\.lr"):
        run_kedro(["data_processing", "contrastive_model"], contrastive_model={"training": {"lr": -1.0}})
    assert _versions(processed) == first and _versions(summary) == first
    assert not (data / "06_models" / "norman2019_subset").exists()

    with KedroSession.create(project_path=PROJECT, env="test") as session:
        loaded = session.load_context().catalog.load("processed_screen")
    expected = ad.read_h5ad(processed / first[0] / "processed_screen.h5ad")
    assert loaded.shape == expected.shape and (loaded.obs_names == expected.obs_names).all()

    run_kedro(["data_processing"])  # a rerun adds a version and keeps the first
    assert len(_versions(processed)) == 2 and _versions(processed)[0] == first[0]


def test_a_parameter_the_project_does_not_read_stops_the_run_with_its_name(run_kedro) -> None:
    """A conf/local or --params key no function takes (e.g. a retired per-step seed) is refused, naming it."""
    from perturbscope.parameters import ConfigError

    with pytest.raises(
        ConfigError, match=r"Unknown parameter\(s\) data_processing\.split\.seed: data_processing\.split takes"
    ):
        run_kedro(["data_processing"], data_processing={"split": {"seed": 3}})


def test_a_run_on_a_screen_read_from_disk_stops_before_nodes_that_need_memory(tmp_path) -> None:
    from kedro.pipeline import Node, Pipeline

    from perturbscope.datasets import AnnDataDataset
    from perturbscope.hooks import OnDiskScreenHook
    from perturbscope.pipelines.data_processing import create_pipeline as data_processing
    from perturbscope.schema import ScreenValidationError
    from perturbscope.simulation import simulate_screen

    path = tmp_path / "big.h5ad"
    simulate_screen(n_cells=200, n_genes=300, seed=0).write_h5ad(path)
    catalog = {
        name: AnnDataDataset(filepath=str(path), load_args={"on_disk_above_gb": 0})
        for name in ("raw_screen", "processed_screen")
    }
    hook = OnDiskScreenHook()
    hook.before_pipeline_run({}, data_processing(), catalog)  # every data_processing node streams
    needs_memory = data_processing() + Pipeline(
        [Node(lambda s: s, "processed_screen", "x", name="train_ldvae"), Node(lambda x: x, "x", "y", name="no_screen")]
    )
    with pytest.raises(ScreenValidationError, match=r"1 node\(s\) of this run need it in memory: train_ldvae"):
        hook.before_pipeline_run({}, needs_memory, catalog)
    small = {
        name: AnnDataDataset(filepath=str(path), load_args={"on_disk_above_gb": 2.0})
        for name in ("raw_screen", "processed_screen")
    }
    hook.before_pipeline_run({}, needs_memory, small)  # fits: nothing to stop
    assert isinstance(small["raw_screen"].load(), ad.AnnData)
    loaded = catalog["raw_screen"].load()
    assert type(loaded).__name__ == "BlockScreen" and loaded.shape == (200, 300)
