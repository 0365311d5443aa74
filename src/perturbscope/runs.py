"""Each run's record, which makes it complete, and the versions a run reads.

Every output of a run is a versioned file, ``<path>/<save version>/<file>``, the save version being the
Kedro session id, its start time to the millisecond (a run started in the same millisecond as another run of
the screen takes the next free millisecond: :meth:`RunLedger.claim`). Kedro's own rule, "load the newest
version on disk", lets one run read another's outputs (two runs of one screen at once) and a killed run's
half-set of outputs. The rule here instead:

* **A run reads its own outputs**: a dataset the run writes is loaded at the run's save version.
* **Its other inputs come from complete runs**: a dataset it only reads is loaded at the version the latest
  *complete* run of the screen wrote (or, with no record of one, the newest version on disk that no
  unfinished run wrote: files from before this ledger existed, or written by hand).
* **A run is complete when its record is written**, last, after every output:
  ``<data_root>/09_runs/<screen>/<save version>.json`` (written atomically). A run in progress has a
  ``<save version>.running.json`` marker instead (its process, host and MLflow run); a marker whose process
  is gone belongs to a killed run. ``perturbscope clean`` removes a killed run's outputs and marks its MLflow
  run KILLED; the next run of the screen names such runs in its log.

``pin_latest_complete(catalog, context)`` applies the same rule in a notebook or a script.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import VERSION_FORMAT, AbstractVersionedDataset, Version

logger = logging.getLogger(__name__)

__all__ = [
    "RUNS_FOLDER",
    "RunLedger",
    "UnfinishedRun",
    "clean",
    "ledger_of",
    "load_latest_complete",
    "pin_latest_complete",
    "pin_versions",
]

RUNS_FOLDER = "09_runs"
"""Folder of the run records under the data root (one sub-folder per screen)."""

_RUNNING = ".running.json"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")
_MAX_CLAIMS = 10_000


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(_json_text(payload))
    os.replace(tmp, path)


def _json_text(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, indent=1, sort_keys=True, default=str)


def _create(path: Path, payload: Mapping[str, Any]) -> bool:
    """Write ``payload`` to ``path`` unless ``path`` exists (atomically: False when it did)."""
    text = _json_text(payload)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.claim.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)  # fails if path exists, whoever made it
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: create it exclusively, then write it
        try:
            with open(path, "x") as out:
                out.write(text)
        except FileExistsError:
            return False
    finally:
        tmp.unlink()
    return True


def _next_version(version: str) -> str:
    """The save version 1 ms after ``version`` (Kedro's format), or ``version-2``, ``-3``... for another format."""
    try:
        stamp = datetime.strptime(version, VERSION_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        base, _, n = version.rpartition("-")
        return f"{base}-{int(n) + 1}" if base and n.isdigit() else f"{version}-2"
    later = (stamp + timedelta(milliseconds=1)).strftime(VERSION_FORMAT)
    return later[:-4] + later[-1:]  # milliseconds, as kedro.io.core.generate_timestamp writes them


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``), to tell a live run from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(marker: Mapping[str, Any]) -> bool | None:
    """Whether the marker's process runs: True / False on this host, None on another host (unknown)."""
    if marker.get("host") != socket.gethostname():
        return None
    pid = int(marker.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = marker.get("process_start")
    return started is None or _process_start(pid) in (None, started)


@dataclass
class UnfinishedRun:
    """A run with a marker and no record: running, or killed (its process is gone)."""

    save_version: str
    marker: dict[str, Any]
    alive: bool | None

    @property
    def killed(self) -> bool:
        return self.alive is False


@dataclass
class RunLedger:
    """The records of one screen's runs (``<data_root>/09_runs/<screen>/``)."""

    folder: Path
    _records: dict[str, dict[str, Any]] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, data_root: str | Path, screen: str) -> RunLedger:
        return cls(Path(data_root) / RUNS_FOLDER / screen)

    # ------------------------------------------------------------------ reading
    def records(self) -> dict[str, dict[str, Any]]:
        """Complete runs' records by save version, oldest first."""
        if self._records is None:
            found = {}
            if self.folder.is_dir():
                for path in sorted(self.folder.glob("*.json")):
                    if path.name.endswith(_RUNNING) or not _VERSION.match(path.stem):
                        continue
                    record = _read_json(path)
                    if record is not None:
                        found[path.stem] = record
            self._records = found
        return self._records

    def unfinished(self) -> list[UnfinishedRun]:
        """Runs with a marker and no record, oldest first."""
        out = []
        if self.folder.is_dir():
            for path in sorted(self.folder.glob(f"*{_RUNNING}")):
                version = path.name[: -len(_RUNNING)]
                if version in self.records():
                    continue
                marker = _read_json(path) or {}
                out.append(UnfinishedRun(version, marker, _alive(marker)))
        return out

    def version_written_by_complete_run(self, dataset: str) -> str | None:
        """The version of ``dataset`` that the latest complete run which wrote it wrote."""
        for version in reversed(list(self.records())):
            if dataset in (self.records()[version].get("saved") or {}):
                return version
        return None

    def mlflow_run_of(self, version: str) -> str:
        record = self.records().get(version) or {}
        return str(record.get("mlflow_run_id") or "")

    def version_of_session(self, session_id: str, mlflow_run_id: str = "") -> str | None:
        """The save version of the complete run of Kedro session ``session_id`` (and MLflow run ``mlflow_run_id``,
        if given): the session id, unless a run started in the same millisecond had it."""
        self._records = None
        for version, record in reversed(self.records().items()):
            same_run = not mlflow_run_id or record.get("mlflow_run_id") in (None, "", mlflow_run_id)
            if record.get("session_id") == session_id and same_run:
                return version
        return None

    # ------------------------------------------------------------------ writing
    def claim(self, save_version: str, payload: Mapping[str, Any]) -> str:
        """Start a run: its marker at ``save_version`` or, when another run has that version, the first free
        version after it (1 ms later each); returns the version claimed.

        Kedro's save version is the session's start time to the millisecond, so two runs started together can
        get the same one, and would write each other's files. The marker is created only if it does not exist
        (a hard link of a finished temporary file), so of runs that race for a version exactly one gets it.
        """
        pid = os.getpid()
        process = {**payload, "pid": pid, "process_start": _process_start(pid), "host": socket.gethostname()}
        self.folder.mkdir(parents=True, exist_ok=True)
        version = save_version
        for _ in range(_MAX_CLAIMS):
            if _create(self.folder / f"{version}{_RUNNING}", {**process, "save_version": version}):
                # a run writes its record before it drops its marker: no record now, no run had this version
                if not (self.folder / f"{version}.json").exists():
                    if version != save_version:
                        logger.info(
                            "Save version %s is another run's: this run writes its outputs as version %s.",
                            save_version,
                            version,
                        )
                    return version
                self.drop_marker(version)
            version = _next_version(version)
        raise RuntimeError(
            f"No free save version in {_MAX_CLAIMS} tries after {save_version} in {self.folder}: "
            "remove stale *.running.json markers there (`perturbscope clean`)."
        )

    def update_marker(self, save_version: str, **fields: Any) -> None:
        path = self.folder / f"{save_version}{_RUNNING}"
        marker = _read_json(path)
        if marker is not None:
            _write_json(path, {**marker, **fields})

    def finish(self, save_version: str, record: Mapping[str, Any]) -> Path:
        """Write the complete record (last), then drop the marker."""
        path = self.folder / f"{save_version}.json"
        _write_json(path, {**record, "save_version": save_version, "complete": True})
        self.drop_marker(save_version)
        self._records = None
        return path

    def drop_marker(self, save_version: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / f"{save_version}{_RUNNING}").unlink()


# ---------------------------------------------------------------------------------------------- versions
def _versions_on_disk(dataset: AbstractVersionedDataset) -> list[str]:
    try:
        return [PurePosixPath(path).parent.name for path in dataset._get_versions()]  # newest first
    except Exception:
        return []


def versioned_datasets(catalog: Any, names: Iterable[str]) -> dict[str, AbstractVersionedDataset]:
    """The versioned file datasets among ``names`` (dataset factories resolved)."""
    out = {}
    for name in names:
        if name.startswith("params:") or name == "parameters":
            continue
        try:
            dataset = catalog.get(name)
        except Exception:
            continue
        if isinstance(dataset, AbstractVersionedDataset) and getattr(dataset, "_version", None) is not None:
            out[name] = dataset
    return out


def _pin(dataset: AbstractVersionedDataset, load: str | None, save: str | None = None) -> None:
    dataset._version = Version(load, save or dataset._version.save)
    dataset._clear_version_cache()


def pin_versions(
    catalog: Any,
    outputs: Iterable[str],
    inputs: Iterable[str],
    save_version: str | None,
    ledger: RunLedger,
    user_pinned: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Pin versions: ``outputs`` saved and loaded at ``save_version``, ``inputs`` loaded at the latest complete
    run's version.

    Versions the user pinned (``--load-versions``) are kept. Returns ``{dataset: version}`` of every input
    pinned and the run that wrote it (``"<version>"``); an input with no version anywhere is left alone
    (loading it fails with Kedro's "Did not find any versions").
    """
    pinned_by_user = set(user_pinned or {})
    unfinished = {run.save_version for run in ledger.unfinished()}
    chosen: dict[str, str] = {}
    for name, dataset in versioned_datasets(catalog, outputs).items():
        if save_version:
            _pin(dataset, dataset._version.load if name in pinned_by_user else save_version, save_version)
    for name, dataset in versioned_datasets(catalog, inputs).items():
        if name in pinned_by_user:
            continue
        version = ledger.version_written_by_complete_run(name)
        on_disk = _versions_on_disk(dataset)
        if version is None or version not in on_disk:
            # no complete run on record wrote it: the newest version no unfinished run wrote
            version = next((v for v in on_disk if v not in unfinished), None)
        if version is not None:
            _pin(dataset, version)
            chosen[name] = version
    return chosen


def ledger_of(context: Any) -> RunLedger:
    """The run records of a Kedro context's screen (``params.screen``, under ``globals.data_root``)."""
    screen = str(context.params.get("screen", "unknown"))
    try:
        data_root = Path(str(context.config_loader["globals"].get("data_root", "data")))
    except Exception:
        data_root = Path("data")
    if not data_root.is_absolute():
        data_root = Path(context.project_path) / data_root
    return RunLedger.of(data_root, screen)


def pin_latest_complete(catalog: Any, context: Any) -> dict[str, str]:
    """Pin every versioned dataset of ``catalog`` at the version the latest complete run of the context's screen
    wrote, so that ``catalog.load(name)`` never reads a killed or running run's half-set of outputs; returns
    ``{dataset: version}``. In a notebook started with ``kedro jupyter lab`` (or ``%load_ext kedro.ipython``)::

        from perturbscope.runs import pin_latest_complete
        pin_latest_complete(catalog, context)
        embedded = catalog.load("contrastive_embedded_screen")
    """
    return pin_versions(catalog, [], list(catalog.keys()), None, ledger_of(context))


def load_latest_complete(catalog: Any, context: Any, name: str) -> Any:
    """``catalog.load(name)`` at the version the latest complete run of the context's screen wrote."""
    pinned = pin_versions(catalog, [], [name], None, ledger_of(context))
    if versioned_datasets(catalog, [name]) and name not in pinned:
        raise FileNotFoundError(f"No complete run of screen '{context.params.get('screen')}' wrote '{name}'.")
    return catalog.load(name)


# ---------------------------------------------------------------------------------------------- clean
def _version_folders(data_root: Path, screen: str, version: str) -> list[Path]:
    """Every ``<save version>`` folder of a screen's outputs under the data root."""
    found = []
    for layer in sorted(data_root.iterdir()) if data_root.is_dir() else []:
        base = layer / screen
        if layer.name == RUNS_FOLDER or not base.is_dir():
            continue
        found.extend(path for path in base.rglob(version) if path.is_dir() and path.name == version)
    return found


def clean(data_root: str | Path, screens: Iterable[str] | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Remove the outputs of killed runs and mark their MLflow runs KILLED; one row per killed run.

    A run is killed when it left a marker and no record and its process is gone (on this host; markers of
    other hosts are listed as ``unknown`` and left alone). ``dry_run`` lists without changing anything.
    """
    data_root = Path(data_root)
    runs_root = data_root / RUNS_FOLDER
    names = list(screens) if screens else sorted(p.name for p in runs_root.iterdir() if p.is_dir())
    rows = []
    for screen in names:
        ledger = RunLedger.of(data_root, screen)
        for run in ledger.unfinished():
            folders = _version_folders(data_root, screen, run.save_version)
            row = {
                "screen": screen,
                "save_version": run.save_version,
                "state": "killed" if run.killed else ("running" if run.alive else "unknown (another host)"),
                "folders": len(folders),
                "mlflow_run_id": str(run.marker.get("mlflow_run_id") or ""),
                "action": "none",
            }
            if run.killed and not dry_run:
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
                row["action"] = f"removed {len(folders)} output version(s)"
                if row["mlflow_run_id"]:
                    row["action"] += "; " + _mark_killed(
                        str(run.marker.get("tracking_uri") or ""), row["mlflow_run_id"]
                    )
                ledger.drop_marker(run.save_version)
            rows.append(row)
    return rows


def _mark_killed(tracking_uri: str, run_id: str) -> str:
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri or None)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            return f"MLflow run {run_id} marked KILLED"
        return f"MLflow run {run_id} already ended"
    except Exception as err:  # the outputs are gone either way; say what failed
        return f"MLflow run {run_id} not updated ({type(err).__name__}: {err})"
