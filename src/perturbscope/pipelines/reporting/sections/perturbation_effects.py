"""Report section of ``perturbation_effects``: which perturbations did anything (the energy-distance
test, its figure and table) and how the salient gene table agrees with differential expression."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from kedro.pipeline import Node, Pipeline

from perturbscope.pipelines.reporting.report import FigureSpec, ReportTable, make_section
from perturbscope.pipelines.reporting.sections.base import Section, section_result
from perturbscope.schema import PERTURBATION

PIPELINE = "perturbation_effects"
FIGURES = ("perturbation_effect_tests",)

# Catalog outputs of the perturbation_effects pipeline read here.
TESTS = "perturbation_effect_tests"
"""One row per perturbation: ``energy_distance``, ``p_value``, ``q_value``, ``significant``..."""
FIGURE = "perturbation_effect_tests_figure"
"""The pipeline's bar chart of the energy distances (PNG)."""
AGREEMENT = "salient_de_agreement"
"""Per perturbation and DE method: ``spearman``, ``fraction_significant_same_direction``."""

TEST_COLUMNS = [PERTURBATION, "n_cells", "energy_distance", "p_value", "q_value", "significant"]


def _significant(table: pd.DataFrame) -> pd.Series:
    return table["significant"].astype(str).str.lower().isin(["true", "1"])


def effect_facts(tests: pd.DataFrame) -> dict[str, Any]:
    if tests.empty:
        return {"perturbations tested": "none (too few cells or no controls)"}
    significant = _significant(tests)
    return {
        "perturbations tested": len(tests),
        "perturbations that differ from the controls (q < alpha)": f"{int(significant.sum())} of {len(tests)}",
        "test": f"energy distance ({tests['distance'].iloc[0]}) in {int(tests['n_pcs'].iloc[0])} PCs, "
        f"{int(tests['n_permutations'].iloc[0])} permutations, BH",
    }


def agreement_summary(agreement: pd.DataFrame) -> pd.DataFrame:
    """Per DE method: median Spearman and median share of salient genes DE in the same direction."""
    if agreement.empty:
        return pd.DataFrame(columns=["method", "perturbations", "median_spearman", "median_fraction_confirmed"])
    grouped = agreement.groupby("method", sort=True)
    return pd.DataFrame(
        {
            "perturbations": grouped[PERTURBATION].nunique(),
            "median_spearman": grouped["spearman"].median().round(3),
            "median_fraction_confirmed": grouped["fraction_significant_same_direction"].median().round(3),
        }
    ).reset_index()


def report_perturbation_effects(
    tests: pd.DataFrame, figure: bytes, agreement: pd.DataFrame, params: dict[str, Any]
) -> dict[str, Any]:
    """The perturbation_effects section: effect-test figure and table, salient vs DE agreement."""
    figures = {
        "perturbation_effect_tests": FigureSpec(
            figure,
            "Did it work? Energy distance of each perturbation to the controls",
            "Energy distance between a perturbation's cells and the control cells in one PCA of the "
            "log-normalised data; red bars differ from the controls (permutation test, Benjamini-Hochberg).",
        ),
    }
    shown = tests[[c for c in TEST_COLUMNS if c in tests.columns]].copy()
    if not shown.empty:
        shown = shown.round({"energy_distance": 4})
        shown["p_value"] = shown["p_value"].map(lambda v: f"{v:.3g}")
        shown["q_value"] = shown["q_value"].map(lambda v: f"{v:.3g}")
    summary = agreement_summary(agreement)
    facts = effect_facts(tests)
    if len(summary):
        for row in summary.itertuples(index=False):
            facts[f"salient genes vs {row.method}: median Spearman"] = (
                f"{row.median_spearman:.2f}" if np.isfinite(row.median_spearman) else "n/a"
            )
    section = make_section(
        PIPELINE,
        "Perturbation effects",
        intro=(
            "Model-free answers to the first questions of a screen: did each perturbation change the cells "
            "(energy-distance permutation test against the controls), and which genes did it move "
            "(pseudobulk PyDESeq2 and Wilcoxon, in differential_expression.csv)."
        ),
        facts=facts,
        tables=[
            ReportTable(
                "perturbation_effect_tests",
                "Effect test per perturbation",
                shown,
                "q: Benjamini-Hochberg over the tested perturbations; significant: q < alpha.",
            ),
            ReportTable(
                "salient_de_agreement",
                "Salient genes vs differential expression",
                summary,
                "Over each perturbation's salient genes (contrastive model): Spearman correlation of "
                "its salient log2 fold change with the DE log2 fold change, and the share of those "
                "genes called DE (q < alpha) in the same direction; medians over perturbations.",
            ),
        ],
        figures=figures,
    )
    return section_result(section, figures)


def create_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(
                report_perturbation_effects,
                inputs=[TESTS, FIGURE, AGREEMENT, "params:reporting"],
                outputs=SECTION.node_outputs(),
                name="report_perturbation_effects",
            )
        ]
    )


SECTION = Section(pipeline=PIPELINE, figures=FIGURES, create_pipeline=create_pipeline)
