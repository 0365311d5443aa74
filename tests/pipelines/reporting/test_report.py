"""The HTML report: self-contained, every section/table/figure present, escaped."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from perturbscope.pipelines.reporting.figures import new_figure
from perturbscope.pipelines.reporting.report import (
    FigureSpec,
    ReportError,
    ReportSection,
    ReportTable,
    make_section,
    render_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure(seed: int = 0):
    fig = new_figure(3, 2, dpi=50)
    ax = fig.subplots()
    ax.plot(np.random.default_rng(seed).normal(size=20))
    return FigureSpec(fig, "A <line>", "caption & more")


def _section(name: str = "data_processing", key: str = "line", n_rows: int = 3) -> ReportSection:
    table = pd.DataFrame({"perturbation": [f"P{i}" for i in range(n_rows)], "cells": np.arange(n_rows)})
    return make_section(
        name,
        f"Section {name}",
        figures={key: _figure()},
        tables=[ReportTable(f"table_{name}", "Cells", table, "per perturbation")],
        facts={"cells": 1234, "fraction": 0.5, "flag": True, "missing": float("nan")},
        intro="intro <b>not html</b>",
        notes=["a note"],
    )


def _provenance() -> ReportSection:
    return ReportSection(name="provenance", title="Provenance", facts={"MLflow run id": "abc123"})


def test_report_is_self_contained_and_complete() -> None:
    page = render_report(
        [_section()], screen="demo <screen>", provenance=_provenance(), header={"MLflow run": "abc123"}
    )
    assert page.startswith("<!DOCTYPE html>")
    # nothing is fetched: no external scripts, stylesheets, images or links
    assert "<script" not in page
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)
    assert "<link" not in page
    # sections, figure and table are addressable
    assert 'data-section="data_processing"' in page and 'data-section="provenance"' in page
    assert 'data-figure="line"' in page and 'data-table="table_data_processing"' in page
    # the embedded image is a real PNG
    payload = re.search(r'data-figure="line">.*?src="data:image/png;base64,([^"]+)"', page, re.S).group(1)
    assert base64.b64decode(payload).startswith(PNG_MAGIC)
    # text is escaped, numbers are formatted
    assert "demo &lt;screen&gt;" in page and "<b>not html</b>" not in page
    assert "1,234" in page and ">yes<" in page and ">n/a<" in page
    assert "abc123" in page


def test_long_tables_are_cut_and_collapsed() -> None:
    page = render_report([_section(n_rows=30)], screen="s", provenance=_provenance(), max_rows=10, inline_rows=5)
    block = re.search(r'<details data-table="table_data_processing">(.*?)</details>', page, re.S).group(1)
    assert block.count("<tr>") == 11  # header + 10 rows
    assert "Showing 10 of 30 rows" in block


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(ReportError, match="unique"):
        render_report([_section("a", key="same"), _section("b", key="same")], screen="s", provenance=_provenance())
    with pytest.raises(ReportError, match="share a name"):
        render_report([_section("a", key="x"), _section("a", key="y")], screen="s", provenance=_provenance())
