"""``perturbscope clean`` and ``perturbscope repair-store``: the project's outputs and MLflow store, kept sound.

::

    perturbscope clean                     # remove killed runs' outputs, mark their MLflow runs KILLED
    perturbscope clean --dry-run           # list them only
    perturbscope clean --screens a b --env test
    perturbscope repair-store              # finish an MLflow schema migration an interrupted run left half-done

The data root and the store are the project's (``conf/<env>/globals.yml`` and ``mlflow.yml``, resolved
against the project root), read without starting a Kedro session.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kedro.framework.project import settings as project_settings
from kedro.framework.startup import bootstrap_project
from kedro.utils import find_kedro_project

from perturbscope.hooks import resolve_mlflow_config
from perturbscope.runs import clean
from perturbscope.store import MlflowStoreError, repair_store

logger = logging.getLogger("perturbscope.ops.maintenance")

__all__ = ["main"]


def _project(project_path: str | None, env: str | None) -> tuple[Path, Path, str]:
    """The project root, its data root and its MLflow tracking URI."""
    root = Path(project_path) if project_path else find_kedro_project(Path.cwd())
    if root is None:
        raise SystemExit("No Kedro project here: run from the perturbscope folder or pass --project-path.")
    root = Path(root).resolve()
    bootstrap_project(root)
    loader = project_settings.CONFIG_LOADER_CLASS(
        conf_source=str(root / project_settings.CONF_SOURCE), env=env, **project_settings.CONFIG_LOADER_ARGS
    )
    data_root = Path(str(loader["globals"].get("data_root", "data")))
    data_root = data_root if data_root.is_absolute() else root / data_root
    uri = resolve_mlflow_config(loader["mlflow"], root)["server"]["mlflow_tracking_uri"]
    return root, data_root, str(uri or "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perturbscope", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    clean_cmd = commands.add_parser("clean", help="remove killed runs' outputs; mark their MLflow runs KILLED")
    clean_cmd.add_argument("--screens", nargs="*", help="screens to clean (default: every screen with runs)")
    clean_cmd.add_argument("--dry-run", action="store_true", help="list the killed runs, change nothing")
    repair = commands.add_parser("repair-store", help="finish an interrupted MLflow schema migration")
    for sub in (clean_cmd, repair):
        sub.add_argument("--env", default=None, help="Kedro environment (default: local)")
        sub.add_argument("--project-path", default=None)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, data_root, uri = _project(args.project_path, args.env)
    if args.command == "repair-store":
        try:
            for line in repair_store(uri):
                print(line)
        except MlflowStoreError as err:
            print(f"perturbscope repair-store: {err}", file=sys.stderr)
            return 1
        print(f"The MLflow store {uri} is ready.")
        return 0
    rows = clean(data_root, args.screens or None, dry_run=args.dry_run)
    if not rows:
        print(f"No unfinished runs under {data_root}.")
    for row in rows:
        print(
            f"{row['screen']} {row['save_version']}: {row['state']}, {row['folders']} output version(s)"
            + (f"; {row['action']}" if row["action"] != "none" else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
