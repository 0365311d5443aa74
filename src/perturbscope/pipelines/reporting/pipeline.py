"""The reporting pipeline: one section per pipeline present, then the HTML report."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from perturbscope.hooks import REPORT_DATASET, RUN_INFO
from perturbscope.pipelines.reporting.nodes import build_report
from perturbscope.pipelines.reporting.sections import Section, available_sections


def create_pipeline(sections: list[Section] | None = None, **kwargs) -> Pipeline:
    """Section nodes for every pipeline that exists, then ``build_report``.

    ``sections`` defaults to :func:`available_sections` (tests pass a subset).
    """
    sections = available_sections() if sections is None else list(sections)
    section_nodes = sum((section.create_pipeline() for section in sections), Pipeline([]))
    report = Node(
        build_report,
        inputs=[RUN_INFO, "params:reporting", "params:screen", *(s.output for s in sections)],
        outputs=REPORT_DATASET,
        name="build_report",
    )
    return Pipeline([section_nodes, Pipeline([report])], tags=["reporting"])
