"""Every Kedro hook of the project (registered in ``settings.HOOKS``).

* :class:`ProjectStoreHook` -- one MLflow store per project (``sqlite:///mlflow.db`` and
  ``./mlruns`` resolved against the project root, whatever the working directory);
* :class:`RunOutputsHook` -- a failed run removes the versioned outputs it wrote;
* :class:`ScreenTagHook` -- the MLflow run is tagged with its screen;
* :class:`RunInfoHook` -- records the versioned datasets of a run and hands them to the
  report node (its ``run_info`` input); prints where the report is.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import mlflow
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.io.core import AbstractVersionedDataset

from perturbscope.runs import RunLedger, ledger_of, pin_versions, versioned_datasets

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
    """Check the screen's name, then open the project's MLflow store, safely, before kedro-mlflow does.

    Runs first (``tryfirst``) in ``after_context_created``:

    1. the screen's name (``--params screen=...`` or globals.yml) must follow
       :data:`perturbscope.names.SCREEN_NAME_RULE`, before anything is named after it;
    2. ``mlflow.yml``'s store is resolved against the project root (:func:`resolve_mlflow_config`);
    3. a SQLite store is created (or checked) and the screen's experiment created under a file lock
       (:func:`perturbscope.store.open_store`), so runs started together never race through MLflow's
       schema migration; a store left half-migrated stops the run with the command that repairs it.

    kedro-mlflow then sets up the tracking URI and finds the experiment.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        from perturbscope.names import check_screen_name
        from perturbscope.store import open_store

        check_screen_name(context.params.get("screen"), "screen")
        loader = context.config_loader
        try:
            conf = loader["mlflow"]
        except (KeyError, MissingConfigException):
            return
        conf = resolve_mlflow_config(conf, context.project_path)
        loader["mlflow"] = conf
        experiment = (conf.get("tracking") or {}).get("experiment") or {}
        open_store(
            (conf.get("server") or {}).get("mlflow_tracking_uri"),
            experiment.get("name"),
            (experiment.get("create_experiment_kwargs") or {}).get("artifact_location"),
            (experiment.get("create_experiment_kwargs") or {}).get("tags"),
        )


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
    runs' files, in a folder named by its save version, instead of over them. When a run fails, the
    version folders of its outputs are removed, the half-written and the empty ones too (its MLflow run
    stays, marked FAILED), so nothing half-written is left behind.
    """

    def __init__(self) -> None:
        self._catalog: Any = None
        self._save_version: str | None = None
        self._outputs: set[str] = set()

    @hook_impl
    def after_catalog_created(self, catalog: Any, save_version: str) -> None:
        self._catalog, self._save_version, self._outputs = catalog, save_version, set()

    @hook_impl
    def before_pipeline_run(self, pipeline: Any) -> None:
        self._outputs = set(pipeline.all_outputs())

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        if self._catalog is None or not self._save_version:
            return
        removed, versions = 0, set()
        for name, dataset in versioned_datasets(self._catalog, sorted(self._outputs)).items():
            try:
                # the version RunInfoHook claimed for the run (the session's unless another run had it)
                version = dataset._version.save or self._save_version
                folder = str(PurePosixPath(str(dataset._get_versioned_path(version))).parent)
                fs = getattr(dataset, "_fs", None) or fsspec.filesystem("file")
                if fs.exists(folder):
                    fs.rm(folder, recursive=True)
                    removed += 1
                    versions.add(version)
            except OSError as err:  # never hide the run's own error
                logger.warning("Could not remove the output %s of the failed run: %s", name, err)
        if removed:
            logger.warning(
                "The run failed (%s): removed the %d output version(s) it had started (save version %s); "
                "earlier runs' outputs are untouched.",
                type(error).__name__,
                removed,
                ", ".join(sorted(versions)),
            )


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


LATEST = "not used (latest complete run's)"
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
            if mode == LATEST and not dataset._exists_function(path):
                continue  # an output this run has not written yet (the report's own file)
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


def _give_back_freed_memory() -> None:
    """Return the memory freed so far to the operating system (glibc's ``malloc_trim``, under a millisecond): freed
    blocks between live ones otherwise stay in the process, and the next screen is loaded on top of them (a
    500,000-cell run sat ~0.5 GB higher between nodes). A loaded AnnData is freed by reference counting, so no
    ``gc.collect()`` (0.2 s and more in a large process). A no-op where glibc is not the allocator."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _memory_gb() -> tuple[float, float]:
    """This process's resident memory now and at its peak, in GB (Linux ``/proc``; else the peak only)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024**2, int(fields["VmHWM"].split()[0]) / 1024**2
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        return float("nan"), peak


class RunInfoHook:
    """Record the run, make it complete by writing its record last, and pin the versions it reads.

    * Before the first node: the run's marker (:class:`perturbscope.runs.RunLedger`), and every versioned
      dataset pinned (:func:`perturbscope.runs.pin_versions`): what the run writes is read back at its own
      save version, what it only reads at the version the latest complete run wrote. Runs of the screen
      that were killed are named in the log.
    * The record (datasets, versions, the run that wrote each input, node and I/O seconds) goes to the
      report node (its ``run_info`` input) and, after every output is saved, to
      ``<data_root>/09_runs/<screen>/<save version>.json``: the run is then complete.
    * Prints where the report is.
    """

    def __init__(self) -> None:
        self._touched: dict[str, str] = {}
        self._run_params: dict[str, Any] = {}
        self._project_datasets: set[str] = set()
        self._started: dict[str, float] = {}
        self._seconds: dict[str, float] = {}
        self._io_started: dict[tuple[str, str], float] = {}
        self._io_seconds: dict[str, float] = {}
        self._screens: set[str] = set()
        self._ledger: RunLedger | None = None
        self._screen = ""
        self._tracking_uri = ""
        self._save_version: str | None = None
        self._user_versions: dict[str, str] = {}
        self._inputs: dict[str, str] = {}
        self._mlflow_run_id = ""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._screen = str(context.params.get("screen", "unknown"))
        self._ledger = ledger_of(context)
        try:
            server = context.config_loader["mlflow"].get("server") or {}
            self._tracking_uri = str(server.get("mlflow_tracking_uri") or "")
        except (KeyError, MissingConfigException):
            self._tracking_uri = ""

    @hook_impl
    def after_catalog_created(self, save_version: str, load_versions: dict[str, str] | None) -> None:
        self._save_version = save_version
        self._user_versions = dict(load_versions or {})

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._touched = {}
        self._started, self._seconds = {}, {}
        self._io_started, self._io_seconds = {}, {}
        self._run_params = dict(run_params)
        self._mlflow_run_id = ""
        from perturbscope.datasets import AnnDataDataset  # (datasets import this module)

        self._screens = set()  # the screens (AnnData files) among the run's datasets: the large loads
        for name in pipeline.datasets() if pipeline is not None else ():
            with contextlib.suppress(Exception):  # a dataset the catalog cannot build is no screen
                if isinstance(catalog.get(name), AnnDataDataset):
                    self._screens.add(name)
        try:  # every dataset of the project, so a partial run still names the models on disk
            from kedro.framework.project import pipelines

            self._project_datasets = set(pipelines["__default__"].datasets())
        except Exception:
            self._project_datasets = set()
        if self._ledger is None:
            return
        save_version = self._save_version or str(run_params.get("run_id") or "")
        killed = [run for run in self._ledger.unfinished() if run.killed]
        if killed:
            logger.warning(
                "%d earlier run(s) of screen '%s' were killed before they finished (save version(s) %s): their "
                "outputs are ignored. `perturbscope clean` removes them and marks their MLflow runs KILLED.",
                len(killed),
                self._screen,
                ", ".join(run.save_version for run in killed),
            )
        # the session's save version, or the next free one if a run started in the same millisecond has it
        save_version = self._ledger.claim(
            save_version,
            {
                "screen": self._screen,
                "pipelines": [str(p) for p in (run_params.get("pipeline_names") or ["__default__"])],
                "tracking_uri": self._tracking_uri,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        self._save_version = save_version
        outputs = set(pipeline.all_outputs())
        reads = (set(pipeline.datasets()) | self._project_datasets) - outputs
        self._inputs = pin_versions(catalog, outputs, reads, save_version, self._ledger, self._user_versions)

    @hook_impl
    def before_dataset_loaded(self, dataset_name: str) -> None:
        if dataset_name in self._screens:
            _give_back_freed_memory()  # a screen is loaded onto the memory the last nodes freed, not beside it
        self._io_started[("load", dataset_name)] = time.perf_counter()

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        self._touched.setdefault(dataset_name, "loaded")
        self._io_done("load", dataset_name)

    @hook_impl
    def before_dataset_saved(self, dataset_name: str) -> None:
        self._io_started[("save", dataset_name)] = time.perf_counter()

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        self._touched[dataset_name] = "saved"
        self._io_done("save", dataset_name)

    def _io_done(self, kind: str, name: str) -> None:
        started = self._io_started.pop((kind, name), None)
        if started is not None:
            key = f"{kind} {name}"
            if not name.startswith("params:"):
                self._io_seconds[key] = self._io_seconds.get(key, 0.0) + time.perf_counter() - started

    def record(self, catalog: Any) -> dict[str, Any]:
        """The run record as a JSON-serialisable dict."""
        params = self._run_params
        pipelines = params.get("pipeline_names") or [params.get("pipeline_name") or "__default__"]
        record = {
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
            # seconds spent loading and saving each dataset (``load <name>`` / ``save <name>``), summed
            "dataset_seconds": {name: round(sec, 2) for name, sec in self._io_seconds.items() if sec >= 0.01},
        }
        record["screen"] = self._screen
        record["mlflow_run_id"] = self._mlflow_run_id
        for row in record["datasets"]:
            row["written by"] = self._writer(row)
        return record

    def _writer(self, row: Mapping[str, str]) -> str:
        """Which run wrote a dataset version: this one, or a recorded run (with its MLflow run)."""
        if row["used as"] == "saved":
            return "this run"
        version = row["version"]
        if self._ledger is not None and version in self._ledger.records():
            mlflow_run = self._ledger.mlflow_run_of(version)
            return f"run {version}" + (f" (MLflow run {mlflow_run})" if mlflow_run else "")
        return f"{version} (no run record)"

    def saved_versions(self) -> dict[str, str]:
        """``{dataset: save version}`` of every versioned dataset this run wrote."""
        return {name: str(self._save_version) for name, mode in self._touched.items() if mode == "saved"}

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
        self._started[node.name] = time.perf_counter()
        if not self._mlflow_run_id:  # kedro-mlflow has opened the run by the first node
            active = mlflow.active_run()
            if active is not None:
                self._mlflow_run_id = active.info.run_id
                if self._ledger is not None and self._save_version:
                    self._ledger.update_marker(self._save_version, mlflow_run_id=self._mlflow_run_id)
        if RUN_INFO not in node.inputs:
            return None
        return {RUN_INFO: self.record(catalog)}

    @hook_impl
    def after_node_run(self, node: Any) -> None:
        started = self._started.pop(node.name, None)
        if started is not None:
            self._seconds[node.name] = time.perf_counter() - started
            rss, peak = _memory_gb()
            logger.info(
                "Node %s took %.1f s (memory: %.2f GB now, %.2f GB at the peak so far).",
                node.name,
                self._seconds[node.name],
                rss,
                peak,
            )

    @hook_impl
    def on_pipeline_error(self) -> None:
        if self._ledger is not None and self._save_version:
            self._ledger.drop_marker(self._save_version)  # RunOutputsHook removes what the run wrote

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if self._ledger is not None and self._save_version:
            record = self.record(catalog)
            record["saved"] = {
                name: version
                for name, version in self.saved_versions().items()
                if name in versioned_datasets(catalog, [name])
            }
            record["inputs"] = dict(self._inputs)
            record["tracking_uri"] = self._tracking_uri
            record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            path = self._ledger.finish(self._save_version, record)
            logger.info(
                "Run %s is complete: %s.", self._save_version, _relative(str(path), run_params.get("project_path"))
            )
        for kind, seconds in (("nodes", self._seconds), ("dataset loads and saves", self._io_seconds)):
            slowest = sorted(seconds.items(), key=lambda item: -item[1])[:8]
            if slowest:
                logger.info(
                    "Slowest %s: %s (%.0f s in all).",
                    kind,
                    ", ".join(f"{name} {value:.1f} s" for name, value in slowest),
                    sum(seconds.values()),
                )
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
