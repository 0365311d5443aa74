"""The exploration notebook runs headless on a finished run and redraws the figures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import PROJECT
from tests.pipelines.reporting.conftest import FinishedRun, env_for_subprocess

NOTEBOOK = PROJECT / "notebooks" / "explore_run.ipynb"
KERNEL = "perturbscope-tests"


@pytest.fixture
def project_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec running this interpreter (the project's .venv), found first via JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "perturbscope (tests)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"), prepend=os.pathsep)
    return KERNEL


def test_notebook_executes_on_a_finished_run(
    finished_run: FinishedRun, project_kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env_for_subprocess(finished_run.root).items():
        monkeypatch.setenv(key, value)  # the kernel inherits the environment: test env, this run
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    NotebookClient(
        notebook,
        kernel_name=project_kernel,
        timeout=240,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "norman2019_subset" in text and "environment: test" in text
    # two data_processing figures, then each model pipeline's figures when it ran
    per_pipeline = {"contrastive_model": 2, "linear_model": 3, "perturbation_prediction": 2}
    expected = 2 + sum(n for name, n in per_pipeline.items() if name in finished_run.pipelines)
    assert len(images) == expected, f"{len(images)} figures drawn, expected {expected}"
    assert "has not been run" not in text
    # the run the report names is the one the notebook lists (MLflow store of the project)
    mlflow.set_tracking_uri(f"sqlite:///{finished_run.root / 'mlflow.db'}")
    run_id = mlflow.search_runs(search_all_experiments=True).iloc[0]["run_id"]
    html = "\n".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert run_id in html and run_id in finished_run.report.read_text()
