"""Shared fixtures.

Pipeline tests run in the ``test`` Kedro environment with every output (data,
mlflow.db, mlruns) under a temporary folder: never the project's own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parents[1]
DEMO = PROJECT / "data" / "01_raw" / "norman2019_subset.h5ad"
# a small simulated screen that trains in seconds (the retrain and Airflow tests register a few of them)
SMALL_SCREEN = dict(
    n_cells=600,
    n_genes=300,
    n_programs=3,
    perturbations_per_program=2,
    n_null_perturbations=1,
    genes_per_program=15,
    n_heterogeneity_genes=10,
)

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the whole suite.

    The test models are tiny: extra threads only contend on a busy (2-core CI) CPU.
    """
    from perturbscope.models import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture
def test_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary project data root holding the demo screen, used by ``--env test``."""
    raw = tmp_path / "data" / "01_raw"
    raw.mkdir(parents=True)
    shutil.copy(DEMO, raw / DEMO.name)
    monkeypatch.setenv("PERTURBSCOPE_TEST_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # kedro-viz hooks and relative paths land here too
    return tmp_path


@pytest.fixture
def run_kedro(test_root: Path) -> Iterator[Callable[..., dict[str, Any]]]:
    """Run project pipelines in the ``test`` environment: ``run_kedro(["data_processing"], screen=...)``."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT)

    def _run(pipelines: list[str] | None = None, **runtime_params: Any) -> dict[str, Any]:
        with KedroSession.create(project_path=PROJECT, env="test", runtime_params=runtime_params or None) as session:
            return session.run(pipeline_names=pipelines) if pipelines else session.run()

    yield _run
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run()


def latest_version(path: Path) -> Path:
    """The file of the latest version of a versioned dataset (``<path>/<version>/<name>``).

    Every file output is versioned (a rerun never overwrites an earlier run's files);
    a path that is a plain file is returned as it is.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    versions = sorted(p for p in path.iterdir() if (p / path.name).exists())
    assert versions, f"no version of {path}"
    return versions[-1] / path.name
