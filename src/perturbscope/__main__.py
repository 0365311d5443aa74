"""``perturbscope`` (or ``python -m perturbscope``): ``kedro run`` with the same options, plus two maintenance
commands, ``perturbscope clean`` and ``perturbscope repair-store`` (:mod:`perturbscope.ops.maintenance`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project

MAINTENANCE = ("clean", "repair-store")


def main(*args: Any, **kwargs: Any) -> Any:
    argv = list(args[0]) if args and isinstance(args[0], (list, tuple)) else sys.argv[1:]
    if argv[:1] and argv[0] in MAINTENANCE:
        from perturbscope.ops.maintenance import main as maintenance

        return maintenance(argv)
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    interactive = hasattr(sys, "ps1")
    kwargs["standalone_mode"] = not interactive
    run = find_run_command(package_name)
    return run(*args, **kwargs)


if __name__ == "__main__":
    result = main()
    if isinstance(result, int):
        raise SystemExit(result)
