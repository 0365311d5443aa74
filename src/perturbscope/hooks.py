"""Project hooks: tag MLflow runs with the screen they analysed."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl

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
