"""FigureDataset: a figure saved by one pipeline loads back (PNG bytes) for another, versioned."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from kedro.io import DataCatalog
from kedro.io.core import DatasetError

from perturbscope.datasets import FigureDataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_figure_saves_and_loads_back_as_png_bytes(tmp_path: Path) -> None:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    dataset = FigureDataset(filepath=str(tmp_path / "fig.png"), save_args={"dpi": 50})
    dataset.save(fig)
    payload = dataset.load()
    assert payload.startswith(PNG_MAGIC) and dataset.exists()
    # bytes pass through unchanged (the report re-saves another pipeline's figure)
    again = FigureDataset(filepath=str(tmp_path / "copy.png"))
    again.save(payload)
    assert again.load() == payload
    with pytest.raises(DatasetError, match="Figure or image bytes"):
        FigureDataset(filepath=str(tmp_path / "bad.png")).save("not a figure")


def test_versioned_figure_loads_the_latest_version(tmp_path: Path) -> None:
    config = {
        "fig": {"type": "perturbscope.datasets.FigureDataset", "filepath": str(tmp_path / "f.png"), "versioned": True}
    }
    first = DataCatalog.from_config(config, save_version="2024-01-01T00.00.00.000Z")
    second = DataCatalog.from_config(config, save_version="2024-02-01T00.00.00.000Z")
    for catalog, size in ((first, 1), (second, 3)):
        fig, _ = plt.subplots(figsize=(size, size))
        catalog.save("fig", fig)
    latest = DataCatalog.from_config(config).load("fig")
    assert latest == (tmp_path / "f.png" / "2024-02-01T00.00.00.000Z" / "f.png").read_bytes()
