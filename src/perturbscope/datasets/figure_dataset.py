"""A figure file that loads back: saves a matplotlib ``Figure`` (or PNG bytes), loads the bytes.

kedro-datasets' ``MatplotlibDataset`` only writes. A figure saved by one pipeline and shown by
another (the report embeds the linear_model heatmap and the perturbation_prediction summary
panel as their pipelines drew them) must be read back through the catalog, so Kedro also knows
the report depends on it.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib.pyplot as plt
from kedro.io.core import DatasetError, Version
from kedro_datasets._typing import ImagePreview
from matplotlib.figure import Figure

from perturbscope.datasets._io import VersionedFileDataset


class FigureDataset(VersionedFileDataset):
    """One image file: ``save(Figure | bytes)``, ``load() -> bytes``.

    Parameters
    ----------
    filepath
        Path or fsspec URL of the file (``.png``).
    save_args
        Passed to ``Figure.savefig`` (e.g. ``{"dpi": 110}``); ``format`` defaults to png.
    version, credentials, fs_args, metadata
        As for every Kedro versioned dataset.
    """

    def __init__(
        self,
        *,
        filepath: str,
        save_args: dict[str, Any] | None = None,
        version: Version | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._save_args = {"format": "png", **(save_args or {})}
        self._init_file(filepath, version, credentials, fs_args, metadata)

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "version": self._version,
            "save_args": self._save_args,
        }

    def load(self) -> bytes:
        with self._fs.open(self._load_path(), mode="rb") as handle:
            return handle.read()

    def save(self, data: Figure | bytes) -> None:
        if isinstance(data, Figure):
            buffer = io.BytesIO()
            data.savefig(buffer, **self._save_args)
            payload = buffer.getvalue()
            plt.close(data)
        elif isinstance(data, (bytes, bytearray)):
            payload = bytes(data)
        else:
            raise DatasetError(f"FigureDataset saves a matplotlib Figure or image bytes; got {type(data).__name__}.")
        with self._fs.open(self._save_path(), mode="wb") as handle:
            handle.write(payload)
        self._invalidate_cache()

    def preview(self) -> ImagePreview:
        """The image, base64-encoded, for kedro-viz."""
        return ImagePreview(base64.b64encode(self.load()).decode("utf-8"))
