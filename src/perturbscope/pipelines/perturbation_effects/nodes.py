"""Nodes of the perturbation_effects pipeline: which perturbations did anything, and to which genes.

Model-free statistics on the processed screen, next to what the models say; each node is a thin call
of one function whose signature owns its parameters' defaults (:func:`perturbscope.parameters.options`):

* :func:`run_effect_tests` -- per perturbation, the energy distance of its cells to the controls in a
  shared PCA with a permutation p-value and BH q-value (:mod:`.effect_tests`, :mod:`.energy`);
* :func:`differential_expression` -- pseudobulk PyDESeq2 and scanpy's Wilcoxon per perturbation vs the
  controls (:mod:`.de`);
* :func:`compare_with_salient_genes` -- how the contrastive model's salient gene table agrees with that
  differential expression.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import pandas as pd
from matplotlib.figure import Figure

from perturbscope.parameters import conf_errors, options
from perturbscope.schema import PERTURBATION, ScreenSchema
from perturbscope.tracking import metric_name

from . import de, figures
from .effect_tests import effect_tests

__all__ = [
    "compare_with_salient_genes",
    "differential_expression",
    "effect_test_metrics",
    "plot_effect_tests",
    "run_effect_tests",
]

SECTION = "perturbation_effects"


def run_effect_tests(screen: ad.AnnData, params: dict[str, Any], seed: int) -> pd.DataFrame:
    """Energy-distance permutation test of every perturbation against the controls (:func:`effect_tests`)."""
    section = f"{SECTION}.effect_test"
    with conf_errors(section):
        return effect_tests(screen, seed, **options(effect_tests, params, section, exclude={"screen", "seed"}))


def effect_test_metrics(table: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """MLflow metrics: how many perturbations were tested and had an effect, and each one's energy distance and
    q-value (``energy_distance.<perturbation>``, ``q_value.<perturbation>``)."""
    out: dict[str, dict[str, float | int]] = {
        "n_tested": {"value": len(table), "step": 0},
        "n_significant": {"value": int(table["significant"].astype(bool).sum()) if len(table) else 0, "step": 0},
    }
    for row in table.itertuples(index=False):
        label = getattr(row, PERTURBATION)
        out[metric_name("energy_distance", label)] = {"value": float(row.energy_distance), "step": 0}
        out[metric_name("q_value", label)] = {"value": float(row.q_value), "step": 0}
    return out


def plot_effect_tests(table: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """Energy distance to the controls per perturbation, largest first; red = significant."""
    return figures.effect_tests_figure(
        table, **options(figures.effect_tests_figure, params, f"{SECTION}.figure", exclude={"table"})
    )


def differential_expression(
    screen: ad.AnnData, params: dict[str, Any], schema_params: dict[str, Any], seed: int
) -> pd.DataFrame:
    """Per perturbation vs controls: pseudobulk PyDESeq2 and/or Wilcoxon (:func:`.de.differential_expression`)."""
    section = f"{SECTION}.differential_expression"
    settings = options(de.differential_expression, params, section, exclude={"screen", "batch_key", "seed"})
    with conf_errors(section):
        return de.differential_expression(screen, ScreenSchema.from_params(schema_params).batch_key, seed, **settings)


def compare_with_salient_genes(de_table: pd.DataFrame, salient_genes: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """How the contrastive model's salient gene table agrees with the DE (:func:`.de.salient_agreement`)."""
    return de.salient_agreement(de_table, salient_genes, alpha)
