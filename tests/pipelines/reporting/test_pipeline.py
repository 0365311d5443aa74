"""The whole project run once (test budgets): the report has every section and figure
of the pipelines present, the versions of what it used, and is logged to MLflow."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import mlflow
import pandas as pd

from perturbscope.pipelines.reporting.sections import SECTIONS, figure_output
from tests.conftest import latest_version
from tests.pipelines.reporting.conftest import FinishedRun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sections_present(run: FinishedRun):
    present = [s for s in SECTIONS if s.pipeline in run.pipelines]
    assert present and present[0].pipeline == "data_processing"
    return present


def test_report_has_every_section_and_figure(finished_run: FinishedRun) -> None:
    page = finished_run.report.read_text()
    assert "<script" not in page and not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)
    for section in _sections_present(finished_run):
        body = re.search(
            rf'<section id="section-{section.pipeline}" data-section="{section.pipeline}">(.*?)</section>', page, re.S
        )
        assert body, f"section {section.pipeline} missing from the report"
        for key in section.figures:
            image = re.search(rf'data-figure="{key}">.*?src="data:image/png;base64,([^"]+)"', body.group(1), re.S)
            assert image, f"figure {key} missing from section {section.pipeline}"
            assert base64.b64decode(image.group(1)).startswith(PNG_MAGIC)
            png = latest_version(finished_run.reporting / "figures" / f"{key}.png")
            assert png.read_bytes().startswith(PNG_MAGIC), f"{figure_output(key)} was not written"
    # the screen summary in the report is the screen's
    summary = pd.read_csv(latest_version(finished_run.reporting / "screen_summary.csv"))
    assert f"<td>cells before QC</td><td>{int(summary['cells_raw'].sum()):,}</td>" in page
    assert 'data-table="qc_steps"' in page
    for section in SECTIONS:
        if section.pipeline not in finished_run.pipelines:
            assert f'data-section="{section.pipeline}"' not in page


def test_report_names_the_versions_and_the_mlflow_run(finished_run: FinishedRun) -> None:
    page = finished_run.report.read_text()
    mlflow.set_tracking_uri(f"sqlite:///{finished_run.root / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    run_id = runs.iloc[0]["run_id"]
    assert f"<td>MLflow run id</td><td>{run_id}</td>" in page

    # every versioned dataset written by the run carries the session id as its version
    rows = re.search(r'data-table="dataset_versions">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    table = {
        cells[0]: cells for cells in (re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows.split("</tr>")) if cells
    }
    assert "processed_screen" in table
    name, kind, mode, version, path, writer = table["processed_screen"]
    assert (kind, mode, version, writer) == ("AnnDataDataset", "saved", finished_run.session_id, "this run")
    assert Path(path).exists() and version in path
    written = {
        p.resolve()
        for p in (finished_run.root / "data").glob(f"**/{finished_run.session_id}/*")
        if p.name != "report.html"  # written after the report's table was made
    }
    listed = {Path(cells[4]).resolve() for cells in table.values() if cells[3] == finished_run.session_id}
    assert written and written == listed  # every versioned file of the run (models included) is named

    # the report and the figures are artifacts of the run
    client = mlflow.MlflowClient()
    assert "report/report.html" in [a.path for a in client.list_artifacts(run_id, "report")]
    figures = {Path(a.path).name for a in client.list_artifacts(run_id, "figures")}
    for section in _sections_present(finished_run):
        assert {f"{key}.png" for key in section.figures} <= figures
