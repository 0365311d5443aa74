"""What the report says about the run itself: dataset versions, session, MLflow run.

:class:`RunInfoHook` records every versioned dataset the run loaded or saved (its
name, type, Kedro version and path) and hands that record to the report node as
its ``run_info`` input, just before the node runs. Register it in
``settings.py``::

    from perturbscope.pipelines.reporting.run_info import RunInfoHook
    HOOKS = (ScreenTagHook(), RunInfoHook())

The catalog entry ``run_info`` (:class:`RunInfoDataset`) is the fallback when the
hook is not registered: the report then says so, and still shows the Kedro session
id (which is the save version of every versioned dataset the run wrote) read from
the MLflow run's tags.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io.core import AbstractDataset, AbstractVersionedDataset, DatasetError

logger = logging.getLogger(__name__)

RUN_INFO = "run_info"
"""Catalog name of the run record the report node takes as input."""

REPORT_DATASET = "report_html"
"""Catalog name of the HTML report; its path is printed at the end of the run."""

NOT_RECORDED = (
    "Dataset versions were not recorded: register "
    "perturbscope.pipelines.reporting.run_info.RunInfoHook in settings.HOOKS."
)


class RunInfoDataset(AbstractDataset[dict, dict]):
    """Placeholder for ``run_info``: loads ``{"recorded": False}``.

    :class:`RunInfoHook` replaces the loaded value with the real record; without the
    hook the report explains how to get dataset versions.
    """

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.metadata = metadata

    def load(self) -> dict:
        return {"recorded": False, "note": NOT_RECORDED}

    def save(self, data: dict) -> None:
        raise DatasetError("run_info is filled in by RunInfoHook; nothing saves it.")

    def _describe(self) -> dict[str, Any]:
        return {}


def _relative(path: str, project_path: str | None) -> str:
    if project_path:
        try:
            return str(Path(path).resolve().relative_to(Path(project_path).resolve()))
        except ValueError:
            pass
    return path


LATEST = "latest on disk"
"""``used as`` of a versioned dataset of the project that this run neither read nor wrote."""


def dataset_versions(
    catalog: Any, touched: dict[str, str], project_path: str | None = None
) -> list[dict[str, str]]:
    """One row per versioned dataset in ``touched`` (name -> ``loaded``/``saved``/``LATEST``).

    ``version`` is the save version for datasets the run wrote and the resolved
    load version (the pinned one, or the latest when unpinned) for the others;
    a dataset without any version on disk is left out.
    """
    rows = []
    order = {"saved": 0, "loaded": 1, LATEST: 2}
    for name, mode in sorted(touched.items(), key=lambda item: (order.get(item[1], 3), item[0])):
        try:
            dataset = catalog[name]
        except Exception:  # noqa: BLE001 - a name the catalog no longer knows
            continue
        if not isinstance(dataset, AbstractVersionedDataset) or not getattr(dataset, "_version", None):
            continue
        try:
            version = dataset.resolve_save_version() if mode == "saved" else dataset.resolve_load_version()
            path = str(dataset._get_versioned_path(version))  # noqa: SLF001 - the resolved file
        except Exception as err:  # noqa: BLE001 - a version that cannot be resolved is reported, not fatal
            if mode == LATEST:
                continue  # never written for this screen
            version, path = f"unresolved ({type(err).__name__})", str(getattr(dataset, "_filepath", ""))
        base = type(dataset).__mro__[1] if type(dataset).__name__.startswith("Mlflow") else type(dataset)
        rows.append(
            {
                "dataset": name,
                "type": base.__name__,
                "used as": mode,
                "version": str(version),
                "path": _relative(path, project_path),
            }
        )
    return rows


class RunInfoHook:
    """Record the versioned datasets of a run and give them to the report node.

    Also prints where the report is once the run has written it.
    """

    def __init__(self) -> None:
        self._touched: dict[str, str] = {}
        self._run_params: dict[str, Any] = {}
        self._project_datasets: set[str] = set()

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._touched = {}
        self._run_params = dict(run_params)
        try:  # every dataset of the project, so a partial run still names the models on disk
            from kedro.framework.project import pipelines

            self._project_datasets = set(pipelines["__default__"].datasets())
        except Exception:  # noqa: BLE001 - outside a Kedro project: only what the run touches
            self._project_datasets = set()

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        self._touched.setdefault(dataset_name, "loaded")

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        self._touched[dataset_name] = "saved"

    def record(self, catalog: Any) -> dict[str, Any]:
        """The run record as a JSON-serialisable dict."""
        params = self._run_params
        pipelines = params.get("pipeline_names") or [params.get("pipeline_name") or "__default__"]
        return {
            "recorded": True,
            "session_id": str(params.get("run_id") or params.get("session_id") or ""),
            "env": str(params.get("env") or ""),
            "kedro_version": str(params.get("kedro_version") or ""),
            "pipelines": [str(p) for p in pipelines],
            "load_versions": {str(k): str(v) for k, v in (params.get("load_versions") or {}).items()},
            "runtime_params": {str(k): str(v) for k, v in (params.get("runtime_params") or {}).items()},
            "datasets": dataset_versions(
                catalog,
                {
                    **{name: LATEST for name in self._project_datasets if not name.startswith("params:")},
                    **self._touched,
                },
                params.get("project_path"),
            ),
        }

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
        if RUN_INFO not in node.inputs:
            return None
        return {RUN_INFO: self.record(catalog)}

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if self._touched.get(REPORT_DATASET) != "saved":
            return
        try:
            dataset = catalog[REPORT_DATASET]
            version = getattr(dataset, "_version", None)  # noqa: SLF001 - the file this run wrote
            path = Path(str(
                dataset._get_versioned_path(version.save) if version is not None and version.save  # noqa: SLF001
                else dataset._filepath  # noqa: SLF001
            ))
        except Exception:  # noqa: BLE001
            return
        shown = _relative(str(path), run_params.get("project_path"))
        message = f"perturbscope report: {shown}"
        logger.info(message)
        print(f"\n{message}\n", flush=True)  # noqa: T201 - `make run` ends with where the report is
