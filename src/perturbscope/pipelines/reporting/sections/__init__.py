"""Report sections, one per pipeline, in report order.

A new pipeline adds ``sections/<pipeline>.py`` (a :class:`Section` named
``SECTION``; see :mod:`.base`) and lists it here. A section is wired only when its
pipeline's package exists (:meth:`Section.available`).
"""

from __future__ import annotations

from perturbscope.pipelines.reporting.sections import (
    contrastive_model,
    data_processing,
    linear_model,
    perturbation_effects,
    perturbation_prediction,
)
from perturbscope.pipelines.reporting.sections.base import Section, figure_output, section_output

SECTIONS: tuple[Section, ...] = (
    data_processing.SECTION,
    contrastive_model.SECTION,
    perturbation_effects.SECTION,
    linear_model.SECTION,
    perturbation_prediction.SECTION,
)


def available_sections() -> list[Section]:
    """The sections whose pipelines exist, in report order."""
    return [section for section in SECTIONS if section.available()]


__all__ = ["SECTIONS", "Section", "available_sections", "figure_output", "section_output"]
