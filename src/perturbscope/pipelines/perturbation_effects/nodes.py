"""Nodes of the perturbation_effects pipeline: which perturbations did anything, and to which genes.

Model-free statistics on the processed screen, next to what the models say:

* :func:`run_effect_tests` -- per perturbation, the energy distance of its
  cells to the controls in a shared PCA with a permutation p-value and BH q-value
  (:mod:`.energy` states the definition);
* :func:`differential_expression` -- pseudobulk PyDESeq2 and scanpy's Wilcoxon per
  perturbation vs the controls (:mod:`.de`);
* :func:`compare_with_salient_genes` -- how the contrastive model's salient gene table
  agrees with that differential expression.

Every knob comes from ``conf/base/parameters_perturbation_effects.yml``.
"""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import stats
from statsmodels.stats.multitest import multipletests

from perturbscope.schema import PERTURBATION, UNPERTURBED, ScreenSchema
from perturbscope.tracking import metric_name

from . import de
from .energy import DISTANCES, energy_test

logger = logging.getLogger(__name__)

__all__ = [
    "AGREEMENT_COLUMNS",
    "EFFECT_TEST_COLUMNS",
    "PerturbationEffectsError",
    "compare_with_salient_genes",
    "differential_expression",
    "effect_test_metrics",
    "plot_effect_tests",
    "run_effect_tests",
]

EFFECT_TEST_COLUMNS = [
    PERTURBATION,
    "n_cells",
    "n_cells_tested",
    "n_control_tested",
    "energy_distance",
    "p_value",
    "q_value",
    "significant",
    "distance",
    "n_pcs",
    "n_permutations",
]
AGREEMENT_COLUMNS = [
    PERTURBATION,
    "method",
    "n_genes",
    "spearman",
    "fraction_significant_same_direction",
    "n_significant_de_genes",
]


class PerturbationEffectsError(ValueError):
    """Bad parameters or input for the perturbation_effects pipeline; the message names the fix."""


def _groups(screen: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    if PERTURBATION not in screen.obs:
        raise PerturbationEffectsError(
            "The screen has no obs['perturbation']: run the data_processing pipeline first (it labels the cells)."
        )
    labels, is_control = de.screen_groups(screen)
    if not is_control.any():
        raise PerturbationEffectsError(
            "The screen has no control cells: every test compares a perturbation with the controls. "
            "Check schema.control_labels."
        )
    return labels, is_control


def _positive_int(params: dict[str, Any], key: str, section: str, minimum: int = 1) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PerturbationEffectsError(
            f"perturbation_effects.{section}.{key} must be an integer >= {minimum}, got {value!r}"
        )
    return int(value)


def run_effect_tests(screen: ad.AnnData, params: dict[str, Any], seed: int) -> pd.DataFrame:
    """Energy-distance permutation test of every perturbation against the controls.

    One PCA (``n_pcs`` components of the log-normalised ``X``) is fitted on the tested
    cells together: up to ``max_control_cells`` controls and up to ``max_cells`` cells of
    each perturbation with at least ``min_cells`` cells (random subsets with ``seed``).
    Every perturbation is compared with the same control cells. ``q_value``: BH over
    the tested perturbations; ``significant``: ``q_value < alpha``.
    """
    params = dict(params or {})
    distance = params.get("distance", "euclidean")
    if distance not in DISTANCES:
        raise PerturbationEffectsError(
            f"perturbation_effects.effect_test.distance={distance!r}: use one of {list(DISTANCES)}"
        )
    n_pcs = _positive_int(params, "n_pcs", "effect_test")
    n_perm = _positive_int(params, "n_permutations", "effect_test")
    max_cells = _positive_int(params, "max_cells", "effect_test", 2)
    max_control = _positive_int(params, "max_control_cells", "effect_test", 2)
    min_cells = _positive_int(params, "min_cells", "effect_test", 2)
    alpha = float(params.get("alpha", 0.05))
    labels, is_control = _groups(screen)
    rng = np.random.default_rng(seed)
    controls = de.subsample(np.flatnonzero(is_control), max_control, rng)
    sizes = pd.Series(labels[~is_control & (labels != UNPERTURBED)]).value_counts()
    tested = sorted(sizes.index[sizes >= min_cells].astype(str))
    if len(sizes) > len(tested):
        logger.info(
            "Effect test: %d perturbations with fewer than %d cells are not tested.",
            len(sizes) - len(tested),
            min_cells,
        )
    if not tested or controls.size < 2:
        return pd.DataFrame(columns=EFFECT_TEST_COLUMNS)
    members = {label: de.subsample(np.flatnonzero(labels == label), max_cells, rng) for label in tested}
    cells = np.concatenate([controls, *members.values()])
    n_comps = int(min(n_pcs, cells.size - 1, screen.n_vars - 1))
    pcs = sc.pp.pca(screen.X[cells].astype(np.float32), n_comps=n_comps, random_state=seed)
    position = {cell: i for i, cell in enumerate(cells)}
    control_pcs = pcs[: controls.size]
    rows = []
    for i, label in enumerate(tested):
        mine = pcs[[position[c] for c in members[label]]]
        e, p = energy_test(mine, control_pcs, n_permutations=n_perm, distance=distance, seed=seed + i)
        rows.append(
            {
                PERTURBATION: label,
                "n_cells": int(sizes[label]),
                "n_cells_tested": len(mine),
                "n_control_tested": controls.size,
                "energy_distance": e,
                "p_value": p,
            }
        )
    table = pd.DataFrame(rows)
    table["q_value"] = multipletests(table["p_value"].to_numpy(), method="fdr_bh")[1]
    table["significant"] = table["q_value"] < alpha
    table["distance"], table["n_pcs"], table["n_permutations"] = distance, n_comps, n_perm
    table = table.sort_values(["q_value", "energy_distance"], ascending=[True, False], kind="stable")
    logger.info(
        "Effect test: %d of %d perturbations differ from the controls (q < %g).",
        int(table["significant"].sum()),
        len(table),
        alpha,
    )
    return table[EFFECT_TEST_COLUMNS].reset_index(drop=True)


def effect_test_metrics(table: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """MLflow metrics: how many perturbations were tested and had an effect, and each one's
    energy distance and q-value (``energy_distance.<perturbation>``, ``q_value.<perturbation>``)."""
    out: dict[str, dict[str, float | int]] = {
        "n_tested": {"value": len(table), "step": 0},
        "n_significant": {"value": int(table["significant"].astype(bool).sum()) if len(table) else 0, "step": 0},
    }
    for row in table.itertuples(index=False):
        label = getattr(row, PERTURBATION)
        out[metric_name("energy_distance", label)] = {"value": float(row.energy_distance), "step": 0}
        out[metric_name("q_value", label)] = {"value": float(row.q_value), "step": 0}
    return out


def plot_effect_tests(table: pd.DataFrame, params: dict[str, Any]) -> plt.Figure:
    """Energy distance to the controls per perturbation, largest first; filled = significant."""
    params = dict(params or {})
    shown = table.sort_values("energy_distance", ascending=False).head(int(params.get("max_shown", 60)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(shown) + 2), 3.6), dpi=int(params.get("dpi", 110)))
    if shown.empty:
        ax.text(0.5, 0.5, "no perturbation tested", ha="center", va="center")
        ax.set_axis_off()
        return fig
    significant = shown["significant"].astype(bool).to_numpy()
    x = np.arange(len(shown))
    ax.bar(x, shown["energy_distance"], color=np.where(significant, "#c0392b", "#bbbbbb"))
    ax.set_xticks(x, shown[PERTURBATION].astype(str), rotation=90, fontsize=7)
    ax.set_ylabel(f"energy distance ({shown['distance'].iloc[0]}, PCA)")
    alpha = params.get("alpha", 0.05)
    ax.set_title(f"Did it work? red: differs from controls (permutation test, BH q < {alpha})", fontsize=9)
    fig.tight_layout()
    return fig


def differential_expression(
    screen: ad.AnnData, params: dict[str, Any], schema_params: dict[str, Any], seed: int
) -> pd.DataFrame:
    """Per perturbation vs controls: pseudobulk PyDESeq2 and/or cell-level Wilcoxon (``methods``).

    Perturbations with fewer than ``min_cells`` cells are left out. Pseudobulk
    replicates are the screen's batches (``schema.batch_key``) or ``n_pseudo_replicates``
    random splits; Wilcoxon uses up to ``wilcoxon_max_cells`` cells per group.
    """
    params = dict(params or {})
    methods = list(params.get("methods") or [])
    unknown = sorted(set(methods) - {de.DESEQ2, de.WILCOXON})
    if unknown:
        raise PerturbationEffectsError(
            f"perturbation_effects.differential_expression.methods has unknown {unknown}; "
            f"use any of {[de.DESEQ2, de.WILCOXON]}"
        )
    _groups(screen)
    min_cells = _positive_int(params, "min_cells", "differential_expression", 2)
    tested = de.tested_perturbations(screen, min_cells)
    batch_key = ScreenSchema.from_params(schema_params or {}).batch_key
    frames = []
    if de.DESEQ2 in methods:
        n_rep = _positive_int(params, "n_pseudo_replicates", "differential_expression", 2)
        frames.append(de.pseudobulk_deseq2(screen, tested, n_rep, batch_key, seed, n_cpus=int(params.get("n_cpus", 1))))
    if de.WILCOXON in methods:
        frames.append(de.wilcoxon(screen, tested, params.get("wilcoxon_max_cells"), seed))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=de.DE_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    logger.info(
        "Differential expression: %d perturbations x %d genes, methods %s.", len(tested), screen.n_vars, methods
    )
    return table


def compare_with_salient_genes(
    de_table: pd.DataFrame, salient_genes: pd.DataFrame, params: dict[str, Any]
) -> pd.DataFrame:
    """How the contrastive model's salient gene table agrees with differential expression.

    Per perturbation and DE method, over the genes of the salient table: Spearman
    correlation of the salient ``mean_log2fc`` with the DE log2 fold change, and the share
    of those genes that are DE at ``q < alpha`` in the same direction.
    """
    alpha = float(dict(params or {}).get("alpha", 0.05))
    if de_table.empty or salient_genes.empty:
        return pd.DataFrame(columns=AGREEMENT_COLUMNS)
    rows = []
    salient = salient_genes[[PERTURBATION, "gene", "mean_log2fc"]].astype({PERTURBATION: str, "gene": str})
    for (label, method), group in de_table.astype({PERTURBATION: str, "gene": str}).groupby(
        [PERTURBATION, "method"], sort=True
    ):
        merged = salient[salient[PERTURBATION] == label].merge(group, on="gene")
        if merged.empty:
            continue
        ok = merged["log2_fold_change"].notna()
        rho = (
            stats.spearmanr(merged.loc[ok, "mean_log2fc"], merged.loc[ok, "log2_fold_change"]).statistic
            if ok.sum() > 2
            else np.nan
        )
        same = np.sign(merged["mean_log2fc"]) == np.sign(merged["log2_fold_change"])
        hit = (merged["q_value"] < alpha) & same
        rows.append(
            {
                PERTURBATION: label,
                "method": method,
                "n_genes": len(merged),
                "spearman": rho,
                "fraction_significant_same_direction": float(hit.mean()),
                "n_significant_de_genes": int((group["q_value"] < alpha).sum()),
            }
        )
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)
