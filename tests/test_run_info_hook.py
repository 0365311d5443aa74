"""RunInfoHook: the versions of the data and models a run used, handed to the report."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from kedro.io import DataCatalog
from kedro.pipeline import Node

from perturbscope.datasets import RunInfoDataset
from perturbscope.hooks import NOT_RECORDED, RUN_INFO, RunInfoHook
from perturbscope.pipelines.reporting.nodes import provenance_section

OLD, NEW = "2024-01-01T00.00.00.000Z", "2024-02-01T00.00.00.000Z"


def _catalog(root: Path, save_version: str) -> DataCatalog:
    config = {
        "screen": {
            "type": "perturbscope.datasets.AnnDataDataset",
            "filepath": str(root / "screen.h5ad"),
            "versioned": True,
        },
        "table": {"type": "pandas.CSVDataset", "filepath": str(root / "table.csv")},
    }
    return DataCatalog.from_config(config, save_version=save_version)


def test_hook_records_save_and_load_versions(tmp_path: Path) -> None:
    adata = ad.AnnData(X=np.ones((3, 2), dtype=np.float32))
    _catalog(tmp_path, OLD).save("screen", adata)  # an earlier run

    # this run reads the earlier screen and writes a table and a new screen version
    catalog = _catalog(tmp_path, NEW)
    hook = RunInfoHook()
    hook.before_pipeline_run(
        {"run_id": NEW, "env": "test", "pipeline_names": ["a", "b"], "project_path": str(tmp_path)}, None, catalog
    )
    catalog.load("screen")
    hook.after_dataset_loaded("screen", adata, None)
    catalog.save("table", pd.DataFrame({"x": [1]}))
    hook.after_dataset_saved("table", None, None)
    hook.after_dataset_loaded("params:x", 1, None)

    record = hook.record(catalog)
    assert record["recorded"] and record["session_id"] == NEW and record["pipelines"] == ["a", "b"]
    rows = {row["dataset"]: row for row in record["datasets"]}
    assert set(rows) == {"screen"}  # only versioned datasets have versions
    assert rows["screen"]["version"] == OLD and rows["screen"]["used as"] == "loaded"
    assert rows["screen"]["path"] == f"screen.h5ad/{OLD}/screen.h5ad"  # relative to the project

    catalog.save("screen", adata)
    hook.after_dataset_saved("screen", adata, None)
    rows = {row["dataset"]: row for row in hook.record(catalog)["datasets"]}
    assert rows["screen"]["version"] == NEW and rows["screen"]["used as"] == "saved"
    assert (tmp_path / rows["screen"]["path"]).exists()

    report_node = Node(lambda info: info, inputs=RUN_INFO, outputs="out", name="report")
    other_node = Node(lambda x: x, inputs="table", outputs="out2", name="other")
    assert hook.before_node_run(other_node, catalog, {}) is None
    assert hook.before_node_run(report_node, catalog, {})[RUN_INFO]["datasets"][0]["version"] == NEW


def test_without_the_hook_the_report_says_how_to_get_versions() -> None:
    placeholder = RunInfoDataset().load()
    section = provenance_section(placeholder, {"run_id": "abc", "kedro_session_id": NEW})
    assert NOT_RECORDED in section.notes
    assert section.facts["MLflow run id"] == "abc"
    assert section.facts["Kedro session id (save version of every dataset this run wrote)"] == NEW
    assert not section.tables
