"""Nodes of the reporting pipeline that are not section-specific: the report itself.

Each pipeline's section lives in ``sections/<pipeline>.py``; :func:`build_report`
puts the sections, the run's provenance and the MLflow run id into one HTML page.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd

import perturbscope
from perturbscope.hooks import NOT_RECORDED
from perturbscope.pipelines.reporting.report import (
    ReportError,
    ReportSection,
    ReportTable,
    render_report,
)

logger = logging.getLogger(__name__)

PROVENANCE = "provenance"


def mlflow_run_info() -> dict[str, str]:
    """The active MLflow run (id, name, experiment, tracking URI, Kedro session tag); {} when none."""
    run = mlflow.active_run()
    if run is None:
        return {}
    info = {
        "run_id": run.info.run_id,
        "run_name": str(run.info.run_name or ""),
        "experiment_id": str(run.info.experiment_id),
        "tracking_uri": str(mlflow.get_tracking_uri()),
    }
    try:
        stored = mlflow.get_run(run.info.run_id)
        experiment = mlflow.get_experiment(run.info.experiment_id)
        info["experiment"] = experiment.name if experiment else ""
        # kedro-mlflow tags the run with the Kedro run parameters; run_id is the session id
        info["kedro_session_id"] = str(stored.data.tags.get("run_id", ""))
    except Exception as err:
        logger.warning("Could not read the MLflow run's tags: %s", err)
    return info


def provenance_section(run_info: dict[str, Any], mlflow_info: dict[str, str]) -> ReportSection:
    """The versions of the data and models used, the Kedro session and the MLflow run."""
    session = run_info.get("session_id") or mlflow_info.get("kedro_session_id") or "unknown"
    facts = {
        "MLflow run id": mlflow_info.get("run_id", "no active MLflow run (tracking disabled)"),
        "MLflow experiment": mlflow_info.get("experiment", mlflow_info.get("experiment_id", "n/a")),
        "MLflow tracking URI": mlflow_info.get("tracking_uri", "n/a"),
        "Kedro session id (save version of every dataset this run wrote)": session,
        "Kedro environment": run_info.get("env") or "n/a",
        "pipelines run": ", ".join(run_info.get("pipelines", [])) or "n/a",
        "Kedro version": run_info.get("kedro_version") or "n/a",
        "perturbscope version": perturbscope.__version__,
    }
    if run_info.get("load_versions"):
        facts["pinned load versions"] = ", ".join(f"{k}={v}" for k, v in run_info["load_versions"].items())
    if run_info.get("runtime_params"):
        facts["runtime parameters"] = ", ".join(f"{k}={v}" for k, v in run_info["runtime_params"].items())
    tables, notes = [], []
    datasets = run_info.get("datasets") or []
    if datasets:
        tables.append(
            ReportTable(
                "dataset_versions",
                "Versions of the data and models used",
                pd.DataFrame(datasets),
                "Every versioned dataset this run read (its resolved load version) or wrote (its "
                "save version), then the latest version on disk of the project's other versioned "
                "datasets. Load one again with catalog.load(name, version=...) or "
                "`kedro run --load-versions=name:version`.",
                max_rows=len(datasets),  # the lineage is shown whole
            )
        )
    if not run_info.get("recorded", False):
        notes.append(run_info.get("note") or NOT_RECORDED)
    return ReportSection(
        name=PROVENANCE,
        title="Provenance: versions and runs",
        intro="Where every number and figure of this report comes from.",
        facts=facts,
        tables=tables,
        notes=notes,
    )


def build_report(run_info: dict[str, Any], params: dict[str, Any], screen: str, *sections: ReportSection) -> str:
    """The self-contained HTML report of one screen from every section present."""
    if not sections:
        raise ReportError("The report has no sections: the reporting pipeline wires at least data_processing.")
    for section in sections:
        if not isinstance(section, ReportSection):
            raise ReportError(f"Report sections must be ReportSection objects, got {type(section).__name__}.")
    mlflow_info = mlflow_run_info()
    provenance = provenance_section(run_info or {}, mlflow_info)
    header = {
        "MLflow run": mlflow_info.get("run_id", "none"),
        "Kedro session": provenance.facts["Kedro session id (save version of every dataset this run wrote)"],
        "sections": ", ".join(s.name for s in sections),
    }
    page = render_report(
        sections,
        screen=screen,
        provenance=provenance,
        header=header,
        max_rows=int(params["max_table_rows"]),
        inline_rows=int(params["inline_table_rows"]),
    )
    n_figures = sum(len(s.figures) for s in sections)
    logger.info(
        "Report of screen '%s': %d sections, %d figures (MLflow run %s).",
        screen,
        len(sections),
        n_figures,
        mlflow_info.get("run_id", "none"),
    )
    return page
