"""Report section of ``perturbation_prediction``: the summary panel across methods, the
summary table, and the cVAE training curves of each split."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from kedro.pipeline import Node, Pipeline

from perturbscope.pipelines.reporting.figures import plot_training_curves
from perturbscope.pipelines.reporting.report import FigureSpec, ReportTable, make_section
from perturbscope.pipelines.reporting.sections.base import Section, section_result
from perturbscope.schema import PERTURBATION, PREDICTION_SPLITS

PIPELINE = "perturbation_prediction"
FIGURES = ("prediction_summary_panel", "prediction_training_curves")
HEADLINE_SCORE = "pearson_delta"
"""Score used for the 'best method' facts (higher is better)."""


def summary_table(summary: pd.DataFrame, scores: list[str]) -> pd.DataFrame:
    """One row per split and method with ``mean ± sd`` of each score."""
    ids = [c for c in ("evaluation", "method", "status", "n_perturbations") if c in summary]
    table = summary[ids].copy()
    for score in scores:
        mean, sd = f"{score}_mean", f"{score}_sd"
        if mean not in summary:
            continue
        table[score] = [
            "n/a" if pd.isna(m) else (f"{m:.3g}" if pd.isna(s) else f"{m:.3g} ± {s:.2g}")
            for m, s in zip(summary[mean], summary.get(sd, pd.Series(np.nan, index=summary.index)))
        ]
    return table


def not_applicable(summary: pd.DataFrame) -> dict[str, str]:
    """Split -> why it was not applicable (rows of the summary with that status)."""
    if "status" not in summary:
        return {}
    rows = summary.loc[summary["status"] == "not applicable"]
    return {str(e): str(r) for e, r in zip(rows["evaluation"], rows["reason"])}


def best_methods(summary: pd.DataFrame, score: str = HEADLINE_SCORE) -> dict[str, str]:
    """Per split, the method with the highest mean ``score``."""
    column = f"{score}_mean"
    if column not in summary:
        return {}
    out = {}
    for evaluation, rows in summary.groupby("evaluation", sort=False):
        rows = rows.dropna(subset=[column])
        if len(rows):
            best = rows.loc[rows[column].idxmax()]
            out[f"best method by {score} ({evaluation})"] = f"{best['method']} ({best[column]:.3f})"
    return out


def report_perturbation_prediction(
    summary: pd.DataFrame,
    metrics: pd.DataFrame,
    panel: bytes,
    summary_scores: list[str],
    params: dict[str, Any],
    *histories: pd.DataFrame,
) -> dict[str, Any]:
    """The perturbation_prediction section: the pipeline's summary panel (its PNG), the table, training curves."""
    dpi = int(params["figure_dpi"])
    splits = PREDICTION_SPLITS
    if len(histories) != len(splits):
        raise ValueError(f"Expected one training history per split {list(splits)}, got {len(histories)}.")
    scores = [s for s in summary_scores if f"{s}_mean" in summary]
    skipped = not_applicable(summary)
    figures = {
        "prediction_summary_panel": FigureSpec(
            panel,
            "Perturbation prediction: scores per method",
            "Every method on the test perturbations of each split (rows): dots are perturbations, "
            "the marker is mean ± sd. cVAE (prior / encoded controls) against the baselines.",
        ),
        "prediction_training_curves": FigureSpec(
            plot_training_curves({f"cVAE, {s}": h for s, h in zip(splits, histories)}, dpi=dpi),
            "Training curves: conditional VAE",
            "Train and validation loss per epoch of the cVAE of each split; the dotted line marks "
            "the epoch whose weights were kept (a split that was not applicable trains no model).",
        ),
    }
    facts: dict[str, Any] = {
        "methods": ", ".join(dict.fromkeys(metrics["method"].astype(str))),
        **{
            f"test perturbations ({evaluation})": int(rows[PERTURBATION].nunique())
            for evaluation, rows in metrics.groupby("evaluation", sort=False)
        },
        **best_methods(summary),
        **{f"{evaluation}: not applicable": reason for evaluation, reason in skipped.items()},
    }
    section = make_section(
        PIPELINE,
        "Perturbation prediction",
        intro=(
            "A conditional VAE predicts the expression of perturbed cells, scored against baselines "
            "on held-out cells and held-out (unseen) perturbations."
            + "".join(
                f" The {e.replace('_', ' ')} split is not applicable to this screen: {r}." for e, r in skipped.items()
            )
        ),
        facts=facts,
        tables=[
            ReportTable(
                "prediction_summary",
                "Summary across methods (mean ± sd over test perturbations)",
                summary_table(summary, scores),
            ),
        ],
        figures=figures,
    )
    return section_result(section, figures)


def create_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(
                report_perturbation_prediction,
                inputs=[
                    "prediction_summary",
                    "prediction_metrics",
                    "prediction_summary_figure",
                    "params:perturbation_prediction.summary_figure.summary_scores",
                    "params:reporting",
                    *(f"{split}.cvae_training_history" for split in PREDICTION_SPLITS),
                ],
                outputs=SECTION.node_outputs(),
                name="report_perturbation_prediction",
            )
        ]
    )


SECTION = Section(pipeline=PIPELINE, figures=FIGURES, create_pipeline=create_pipeline)
