"""kedro-viz: `kedro viz build` works offline and shows every pipeline and dataset,
each catalog entry with a layer and every AnnData / table dataset with a preview."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT
from tests.pipelines.reporting.conftest import FinishedRun, env_for_subprocess

FIVE = {
    "data_processing",
    "contrastive_model",
    "perturbation_effects",
    "linear_model",
    "perturbation_prediction",
    "reporting",
}
PREVIEWED_TYPES = ("AnnDataDataset", "CSVDataset")


def _project_copy(tmp_path: Path) -> Path:
    """The project's configuration in a scratch folder: `kedro viz build` writes ./build."""
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copy(PROJECT / "pyproject.toml", copy / "pyproject.toml")
    shutil.copytree(PROJECT / "conf", copy / "conf")
    (copy / "src").mkdir()  # the package itself is the installed one
    return copy


def test_viz_build_lists_every_pipeline_and_dataset(finished_run: FinishedRun, tmp_path: Path) -> None:
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession

    project = _project_copy(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "kedro", "viz", "build", "--include-previews"],
        cwd=project,
        env=env_for_subprocess(finished_run.root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    main = project / "build" / "api" / "main"
    assert done.returncode == 0 and main.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    graph = json.loads(main.read_text())

    built = {p["id"] for p in graph["pipelines"]}
    expected = set(finished_run.pipelines)
    assert expected >= FIVE, f"pipelines missing from the registry: {FIVE - expected}"
    assert expected <= built, f"pipelines missing from kedro-viz: {expected - built}"

    nodes = {n["name"]: n for n in graph["nodes"] if n["type"] == "data"}
    with KedroSession.create(project_path=PROJECT, env="test") as session:
        catalog = session.load_context().catalog
    for name in expected:
        datasets = {d for d in pipelines[name].datasets() if not d.startswith("params:") and d != "parameters"}
        missing = datasets - set(nodes)
        assert not missing, f"{name}: datasets missing from kedro-viz: {sorted(missing)}"
        for dataset in datasets:
            assert name in nodes[dataset]["pipelines"], (dataset, name)

    no_layer = sorted(d for d, node in nodes.items() if d in catalog and not node.get("layer"))
    assert not no_layer, f"catalog entries without a kedro-viz layer: {no_layer}"
    no_preview = []
    for dataset, node in nodes.items():
        if any(t in (node.get("dataset_type") or "") for t in PREVIEWED_TYPES):
            details = json.loads((project / "build" / "api" / "nodes" / node["id"]).read_text())
            if not details.get("preview"):
                no_preview.append(dataset)
    assert not no_preview, f"AnnData/table datasets without a preview: {sorted(no_preview)}"
    assert nodes["processed_screen"]["layer"] == "primary" and nodes["report_html"]["layer"] == "reporting"
