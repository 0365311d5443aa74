"""``run_info``: the placeholder the report node's run record is loaded from."""

from __future__ import annotations

from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from perturbscope.hooks import NOT_RECORDED


class RunInfoDataset(AbstractDataset[dict, dict]):
    """Placeholder for ``run_info``: loads ``{"recorded": False}``.

    :class:`~perturbscope.hooks.RunInfoHook` replaces the loaded value with the real record; without the
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
