"""Fixtures of the reporting tests.

``finished_run`` runs every registered pipeline once (``__default__``, ``test``
environment, all outputs under a temporary folder) and is shared by the report,
kedro-viz and notebook tests of this package.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import pytest

from tests.conftest import DEMO, PROJECT, latest_version

SCREEN = "norman2019_subset"


@dataclass(frozen=True)
class FinishedRun:
    root: Path  # PERTURBSCOPE_TEST_ROOT of the run
    pipelines: list[str]  # registered pipelines (without __default__)
    session_id: str  # the Kedro session id = save version of the run

    @property
    def reporting(self) -> Path:
        return self.root / "data" / "08_reporting" / SCREEN

    @property
    def report(self) -> Path:
        return latest_version(self.reporting / "report.html")


def register_run_info_hook(session: Any) -> None:
    """Register RunInfoHook on a session unless settings.HOOKS already has it."""
    from kedro.framework.project import settings

    from perturbscope.hooks import RunInfoHook

    if not any(isinstance(hook, RunInfoHook) for hook in settings.HOOKS):
        session._hook_manager.register(RunInfoHook())


@pytest.fixture(scope="package")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedRun]:
    """Every pipeline run once on the demo screen in the ``test`` environment."""
    import mlflow
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    root = tmp_path_factory.mktemp("finished_run")
    raw = root / "data" / "01_raw"
    raw.mkdir(parents=True)
    shutil.copy(DEMO, raw / DEMO.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERTURBSCOPE_TEST_ROOT", str(root))
        mp.setenv("KEDRO_DISABLE_TELEMETRY", "1")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.chdir(root)
        bootstrap_project(PROJECT)
        with KedroSession.create(project_path=PROJECT, env="test") as session:
            register_run_info_hook(session)
            session_id = session.session_id
            session.run()
        if mlflow.active_run() is not None:
            mlflow.end_run()
        yield FinishedRun(
            root=root,
            pipelines=sorted(name for name in pipelines if name != "__default__"),
            session_id=session_id,
        )


@pytest.fixture(scope="package")
def processed_sim() -> tuple[ad.AnnData, Any, Any]:
    """A small simulated screen through the data_processing nodes: (processed, summary, qc)."""
    from perturbscope.pipelines.data_processing import nodes as dp
    from perturbscope.simulation import simulate_screen

    raw = simulate_screen(n_cells=600, n_genes=400, seed=3)
    raw.obs["phase_true"] = raw.obs["phase"].astype(str)
    schema = {"perturbation_key": "perturbation", "control_labels": ["control"], "program_key": "program"}
    validated = dp.validate_screen(raw, schema, "sim")
    cells_raw = dp.count_cells_per_perturbation(validated)
    qc, qc_table = dp.quality_control(
        validated, {"min_genes_per_cell": 5, "min_cells_per_gene": 3, "max_mito_fraction": 0.2}
    )
    phased = dp.score_cell_cycle(
        dp.normalise(qc, {"target_sum": 1e4}), {"min_genes_per_phase": 5, "n_bins": 25}, seed=0
    )
    hvg = dp.select_highly_variable_genes(phased, {"n_top_genes": 2000})
    processed = dp.label_cells(hvg, schema, {"validation_fraction": 0.1}, seed=0).to_memory()
    summary, qc_summary = dp.summarise_screen(cells_raw, processed, qc_table)
    return processed, summary, qc_summary


def env_for_subprocess(root: Path) -> dict[str, str]:
    """Environment of a child process reading the finished run (test env, telemetry off)."""
    return {
        **os.environ,
        "KEDRO_ENV": "test",
        "PERTURBSCOPE_TEST_ROOT": str(root),
        "KEDRO_DISABLE_TELEMETRY": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }
