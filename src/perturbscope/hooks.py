"""Every Kedro hook of the project (registered in ``settings.HOOKS``).

* :class:`ProjectStoreHook` -- one MLflow store per project (``sqlite:///mlflow.db`` and
  ``./mlruns`` resolved against the project root, whatever the working directory);
* :class:`RunOutputsHook` -- a failed run removes the versioned outputs it wrote;
* :class:`ScreenTagHook` -- the MLflow run is tagged with its screen;
* :class:`RunInfoHook` -- records the versioned datasets of a run and hands them to the
  report node (its ``run_info`` input); prints where the report is.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import mlflow
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.io.core import AbstractVersionedDataset

logger = logging.getLogger(__name__)


class ScreenTagHook:
    """Tag the active MLflow run with the screen's name (the experiment is tagged by mlflow.yml).

    kedro-mlflow opens the run in its ``before_pipeline_run`` hook; the tags are set
    once, before the first node runs, when that run is active.
    """

    def __init__(self) -> None:
        self._screen: str | None = None
        self._tagged = False

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._screen = str(context.params.get("screen", "unknown"))
        self._tagged = False

    @hook_impl
    def before_node_run(self) -> None:
        if self._tagged or self._screen is None:
            return
        run = mlflow.active_run()
        if run is None:
            return
        mlflow.set_tag("screen", self._screen)
        self._tagged = True


def resolve_store_uri(uri: str | None, project_path: str | Path) -> str | None:
    """An MLflow store URI with a relative local path made absolute against the project root.

    ``sqlite:///mlflow.db`` (three slashes: a path relative to the working directory) becomes
    ``sqlite:////<project>/mlflow.db``, and a plain relative folder (``mlruns``) becomes a
    ``file://`` URI under the project, so ``kedro run`` from ``notebooks/``, the retrain CLI
    started elsewhere and a notebook all open the project's one store. Absolute paths and
    servers (``http://...``, ``databricks``) are returned unchanged.
    """
    if not uri:
        return uri
    root = Path(project_path).resolve()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative = uri[len("sqlite:///") :]
        if relative and relative != ":memory:":
            return f"sqlite:///{(root / relative).as_posix()}"
        return uri
    if "://" in uri or uri in ("databricks", "databricks-uc"):
        return uri
    path = Path(uri)
    return (path if path.is_absolute() else root / path).as_uri()


def resolve_mlflow_config(conf: dict[str, Any], project_path: str | Path) -> dict[str, Any]:
    """``mlflow.yml`` with its store and new experiments' artifact folder pinned to the project root."""
    out = copy.deepcopy(dict(conf))
    server = out.setdefault("server", {}) or {}
    out["server"] = server
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    server["mlflow_tracking_uri"] = resolve_store_uri(server.get("mlflow_tracking_uri") or env_uri, project_path)
    server["mlflow_registry_uri"] = resolve_store_uri(server.get("mlflow_registry_uri"), project_path)
    experiment = out.setdefault("tracking", {}).setdefault("experiment", {})
    kwargs = experiment.setdefault("create_experiment_kwargs", {}) or {}
    experiment["create_experiment_kwargs"] = kwargs
    uri = str(server.get("mlflow_tracking_uri") or "")
    if kwargs.get("artifact_location") is None and uri.startswith("sqlite:"):
        # mlflow's default artifact root for a database store is ./mlruns of the working directory
        kwargs["artifact_location"] = (Path(project_path).resolve() / "mlruns").as_uri()
    return out


class ProjectStoreHook:
    """Resolve ``mlflow.yml``'s store against the project root before kedro-mlflow reads it.

    Runs first (``tryfirst``) in ``after_context_created``; kedro-mlflow then sets up the
    tracking URI, registry URI and experiment from the resolved configuration.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        loader = context.config_loader
        try:
            conf = loader["mlflow"]
        except (KeyError, MissingConfigException):
            return
        loader["mlflow"] = resolve_mlflow_config(conf, context.project_path)


STREAMS_TAG = "streams"
"""Tag of the nodes that take a screen read from disk (:class:`perturbscope.blocks.BlockScreen`)."""


class OnDiskScreenHook:
    """A run on a screen too large for memory (``raw_screen`` above ``on_disk_above_gb``) stops
    before it starts when it holds nodes that need the screen in memory, naming them and the
    pipelines that stream, instead of failing hours later."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        dataset = catalog.get("raw_screen") if hasattr(catalog, "get") else None
        reads_on_disk = getattr(dataset, "reads_on_disk", None)
        if reads_on_disk is None or not reads_on_disk():
            return
        screens = {
            name for name in pipeline.datasets() if getattr(catalog.get(name), "_on_disk_above_gb", None) is not None
        }
        needs_memory = [node for node in pipeline.nodes if STREAMS_TAG not in node.tags and screens & set(node.inputs)]
        blocked = sorted({node.name for node in needs_memory})
        namespaces = sorted({node.namespace or "" for node in needs_memory})
        if not blocked:
            return
        from perturbscope.schema import ScreenValidationError

        raise ScreenValidationError(
            f"The screen '{dataset._filepath}' is read from disk in blocks (its count matrix is above "
            f"on_disk_above_gb={dataset._on_disk_above_gb} GB), but {len(blocked)} node(s) of this run need it "
            f"in memory: {', '.join(blocked[:8])}{' ...' if len(blocked) > 8 else ''}"
            f"{' (' + ', '.join(n for n in namespaces if n) + ')' if any(namespaces) else ''}. Run the pipelines "
            "that stream, `kedro run --pipelines data_processing,contrastive_model` (README: 'Screens larger "
            "than memory'), or raise "
            "on_disk_above_gb (`--params on_disk_above_gb=40`) on a machine with that much memory."
        )


class RunOutputsHook:
    """Every file a run writes is a new version, and a failed run leaves none behind.

    Every file dataset of the catalog is ``versioned`` (MLflow artifacts through
    :class:`perturbscope.datasets.MlflowArtifactDataset`), so a rerun writes next to the earlier
    runs' files, in a folder named by its save version, instead of over them, and
    ``catalog.load`` (and the report) read the latest. When a run fails, the version folders it
    wrote are removed (its MLflow run stays, marked FAILED), so the latest version is always
    that of a complete run and nothing half-written is left behind.
    """

    def __init__(self) -> None:
        self._catalog: Any = None
        self._save_version: str | None = None
        self._written: list[tuple[Any, str]] = []

    @hook_impl
    def after_catalog_created(self, catalog: Any, save_version: str) -> None:
        self._catalog, self._save_version, self._written = catalog, save_version, []

    def _versioned(self, name: str) -> AbstractVersionedDataset | None:
        dataset = self._catalog.get(name) if self._catalog is not None else None
        return dataset if isinstance(dataset, AbstractVersionedDataset) else None

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        dataset = self._versioned(dataset_name)
        version = getattr(dataset, "_version", None)
        if dataset is None or version is None or version.save is None:
            return
        folder = str(PurePosixPath(str(dataset._get_versioned_path(version.save))).parent)
        self._written.append((getattr(dataset, "_fs", None) or fsspec.filesystem("file"), folder))

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        removed = 0
        for fs, folder in reversed(self._written):
            try:
                if fs.exists(folder):
                    fs.rm(folder, recursive=True)
                    removed += 1
            except OSError as err:  # never hide the run's own error
                logger.warning("Could not remove %s of the failed run: %s", folder, err)
        if removed:
            logger.warning(
                "The run failed (%s): removed the %d output version(s) it had written (save version %s); "
                "earlier runs' outputs are untouched and stay the latest.",
                type(error).__name__,
                removed,
                self._save_version,
            )
        self._written = []


# ----------------------------------------------------------------------------- run info
RUN_INFO = "run_info"
"""Catalog name of the run record the report node takes as input."""

REPORT_DATASET = "report_html"
"""Catalog name of the HTML report; its path is printed at the end of the run."""

NOT_RECORDED = "Dataset versions were not recorded: register perturbscope.hooks.RunInfoHook in settings.HOOKS."


def _relative(path: str, project_path: str | None) -> str:
    if project_path:
        try:
            return str(Path(path).resolve().relative_to(Path(project_path).resolve()))
        except ValueError:
            pass
    return path


LATEST = "latest on disk"
"""``used as`` of a versioned dataset of the project that this run neither read nor wrote."""


def dataset_versions(catalog: Any, touched: dict[str, str], project_path: str | None = None) -> list[dict[str, str]]:
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
        except Exception:
            continue
        if not isinstance(dataset, AbstractVersionedDataset) or not getattr(dataset, "_version", None):
            continue
        try:
            version = dataset.resolve_save_version() if mode == "saved" else dataset.resolve_load_version()
            path = str(dataset._get_versioned_path(version))
        except Exception as err:
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
        self._started: dict[str, float] = {}
        self._seconds: dict[str, float] = {}

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._touched = {}
        self._started, self._seconds = {}, {}
        self._run_params = dict(run_params)
        try:  # every dataset of the project, so a partial run still names the models on disk
            from kedro.framework.project import pipelines

            self._project_datasets = set(pipelines["__default__"].datasets())
        except Exception:
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
            "node_seconds": {name: round(seconds, 2) for name, seconds in self._seconds.items()},
        }

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
        self._started[node.name] = time.perf_counter()
        if RUN_INFO not in node.inputs:
            return None
        return {RUN_INFO: self.record(catalog)}

    @hook_impl
    def after_node_run(self, node: Any) -> None:
        started = self._started.pop(node.name, None)
        if started is not None:
            self._seconds[node.name] = time.perf_counter() - started
            logger.info("Node %s took %.1f s.", node.name, self._seconds[node.name])

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if self._touched.get(REPORT_DATASET) != "saved":
            return
        try:
            dataset = catalog[REPORT_DATASET]
            version = getattr(dataset, "_version", None)
            path = Path(
                str(
                    dataset._get_versioned_path(version.save)
                    if version is not None and version.save
                    else dataset._filepath
                )
            )
        except Exception:
            return
        shown = _relative(str(path), run_params.get("project_path"))
        message = f"perturbscope report: {shown}"
        logger.info(message)
        print(f"\n{message}\n", flush=True)
