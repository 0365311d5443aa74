"""The section contract: one report section per pipeline.

A section is a small Kedro pipeline of its own that reads one pipeline's catalog
outputs and produces

* ``report_section_<pipeline>``: a :class:`~perturbscope.pipelines.reporting.report.ReportSection`
  (facts, tables, figures as base64 PNG), and
* one ``report_fig_<key>`` output per figure (a matplotlib ``Figure``), written as
  PNG by the catalog pattern ``report_fig_{key}`` in ``catalog_reporting.yml`` and
  logged to MLflow.

A section is wired into the reporting pipeline when its pipeline's package exists
(``perturbscope.pipelines.<pipeline>``): a new model pipeline only adds its module
under ``sections/`` and its entry in ``SECTIONS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

from kedro.pipeline import Pipeline

from perturbscope.pipelines.reporting.report import FigureSpec, ReportSection


def section_output(pipeline: str) -> str:
    """Catalog name of a section's :class:`ReportSection`."""
    return f"report_section_{pipeline}"


def figure_output(key: str) -> str:
    """Catalog name of a figure (matches the ``report_fig_{key}`` catalog pattern)."""
    return f"report_fig_{key}"


@dataclass(frozen=True)
class Section:
    """A report section: the pipeline it reports, its figures and its nodes.

    Attributes
    ----------
    pipeline
        Name of the pipeline whose outputs the section reads.
    figures
        Keys of the figures it draws, in display order (``report_fig_<key>``).
    create_pipeline
        Returns the section's nodes; their outputs are :func:`section_output` and
        one :func:`figure_output` per figure key.
    """

    pipeline: str
    figures: tuple[str, ...]
    create_pipeline: Callable[[], Pipeline]

    @property
    def output(self) -> str:
        return section_output(self.pipeline)

    def available(self) -> bool:
        """Whether the pipeline it reports exists in this project."""
        return find_spec(f"perturbscope.pipelines.{self.pipeline}") is not None

    def node_outputs(self) -> dict[str, str]:
        """The ``outputs`` mapping of a section node returning :func:`section_result`."""
        return {"section": self.output, **{key: figure_output(key) for key in self.figures}}


def section_result(section: ReportSection, figures: Mapping[str, FigureSpec]) -> dict[str, Any]:
    """What a section node returns: the section and every figure, by key."""
    missing = set(section.figure_keys) ^ set(figures)
    if missing:
        raise ValueError(f"Section '{section.name}': figures and section disagree on {sorted(missing)}.")
    return {"section": section, **{key: spec.figure for key, spec in figures.items()}}
