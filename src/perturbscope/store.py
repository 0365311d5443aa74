"""The project's MLflow store: created once under a file lock, checked, and repaired when left half-migrated.

MLflow creates and migrates a SQLite store on first use, in every process that opens it; two ``kedro run``
processes that open a new store at the same moment both migrate it, and one can leave MLflow's temporary
``_alembic_tmp_*`` tables behind, after which every run fails. Here the first process to open the store
holds ``<store>.lock`` while it creates the store and the run's experiment; the others wait, then find both.
A store with leftover temporary tables is refused with the command that repairs it
(``perturbscope repair-store``, :func:`repair_store`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

logger = logging.getLogger(__name__)

__all__ = ["MlflowStoreError", "open_store", "repair_store", "sqlite_path"]

_LOCK_SECONDS = 600


class MlflowStoreError(RuntimeError):
    """The MLflow store cannot be used as it is; the message says why and how to repair it."""


def sqlite_path(uri: str | None) -> Path | None:
    """The file of a ``sqlite:////abs/path.db`` URI; None for other stores."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return None if not path or path == ":memory:" else Path(path)


def _leftovers(db: Path) -> tuple[list[str], bool]:
    """Temporary migration tables of the store, and whether it has tables but no schema version."""
    if not db.exists() or db.stat().st_size == 0:
        return [], False
    with sqlite3.connect(db) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    temporary = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    unversioned = bool(tables) and "alembic_version" not in tables
    return temporary, unversioned


def _check(db: Path) -> None:
    temporary, unversioned = _leftovers(db)
    if temporary or unversioned:
        what = (
            f"temporary migration table(s) {temporary} left by an interrupted schema migration"
            if temporary
            else "tables but no schema version (its creation was interrupted)"
        )
        raise MlflowStoreError(
            f"The MLflow store {db} has {what}, so every run would fail in MLflow. Repair it with "
            f"`perturbscope repair-store` (it finishes the migration and keeps every run), or move {db} away "
            "to start a new store."
        )


def open_store(
    uri: str | None,
    experiment: str | None = None,
    artifact_location: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> None:
    """Create or check the store at ``uri`` and the ``experiment``, holding ``<store>.lock`` (SQLite only)."""
    db = sqlite_path(uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=_LOCK_SECONDS):
        _check(db)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates and migrates the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's
        if experiment and client.get_experiment_by_name(experiment) is None:
            client.create_experiment(
                experiment, artifact_location=artifact_location, tags={k: str(v) for k, v in (tags or {}).items()}
            )


def repair_store(uri: str) -> list[str]:
    """Finish a migration an interrupted process left half-done; what was done, one line per step.

    A leftover ``_alembic_tmp_<table>`` is dropped when ``<table>`` still exists (the copy never replaced
    it) and renamed to ``<table>`` when it does not (the old table was already dropped); then MLflow's
    migrations run to the current schema.
    """
    db = sqlite_path(uri)
    if db is None or not db.exists():
        raise MlflowStoreError(f"{uri} is not an existing SQLite store; nothing to repair.")
    done = []
    with FileLock(f"{db}.lock", timeout=_LOCK_SECONDS):
        with sqlite3.connect(db) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            runs = connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        if tables and "alembic_version" not in tables:
            if runs:
                raise MlflowStoreError(
                    f"{db} has {runs} run(s) but no schema version: it was not created by this MLflow; move it away."
                )
            db.unlink()
            done.append(f"removed {db}: its creation had been interrupted and it held no run")
            tables = set()
        with sqlite3.connect(db) as connection:
            for tmp in sorted(t for t in tables if t.startswith("_alembic_tmp_")):
                base = tmp[len("_alembic_tmp_") :]
                if base in tables:
                    connection.execute(f'DROP TABLE "{tmp}"')
                    done.append(f"dropped {tmp} ({base} is intact)")
                else:
                    connection.execute(f'ALTER TABLE "{tmp}" RENAME TO "{base}"')
                    done.append(f"renamed {tmp} to {base} (the migration had dropped the old {base})")
        from mlflow.store.db.utils import _upgrade_db, create_sqlalchemy_engine_with_retry

        if tables:
            engine = create_sqlalchemy_engine_with_retry(uri)
            _upgrade_db(engine)
            engine.dispose()
            done.append("ran MLflow's schema migrations to the current version")
        _check(db)
    open_store(uri)  # a removed store is created afresh
    return done
