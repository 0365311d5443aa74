"""How far each perturbation moves each LDVAE factor: Welch effects vs controls, BH q-values,
the genes a shift moves and a sentence per row (the ``linear_factor_effects`` table)."""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from perturbscope.models._checks import check_float
from perturbscope.models.model import ModelInputError
from perturbscope.models.model.linear import LATENT_KEY
from perturbscope.schema import CONTROL, PERTURBATION, UNPERTURBED

logger = logging.getLogger(__name__)

__all__ = ["EFFECT_COLUMNS", "benjamini_hochberg", "factor_effects", "welch"]

EFFECT_COLUMNS = [
    PERTURBATION,
    "factor",
    "rank",
    "n_cells",
    "n_control",
    "mean_perturbed",
    "mean_control",
    "effect",
    "ci_low",
    "ci_high",
    "standardised_effect",
    "p_value",
    "q_value",
    "significant",
    "direction",
    "program",
    "genes_up",
    "genes_down",
    "reading",
]
"""Columns of the factor x perturbation table (also of the empty table of a plain count matrix)."""


def _gene_lists(top_genes: pd.DataFrame, n_shown: int) -> dict[tuple[str, str], list[str]]:
    lists: dict[tuple[str, str], list[str]] = {}
    for (factor, direction), group in top_genes.sort_values("rank").groupby(["factor", "direction"], sort=False):
        lists[(str(factor), str(direction))] = group["gene"].astype(str).head(n_shown).tolist()
    return lists


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels' ``fdr_bh``); NaNs are left out and stay NaN."""
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return q


def welch(x: np.ndarray, y: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-column Welch t-test of ``x - y`` (scipy): (diff, CI half-width, p, se); NaN below 2 cells.

    A column without variance in either group has p = 1 when the means agree and 0 otherwise.
    """
    nx, ny = x.shape[0], y.shape[0]
    diff = x.mean(0) - y.mean(0)
    if nx < 2 or ny < 2:
        nan = np.full(diff.shape, np.nan)
        return diff, nan, nan, nan
    se = np.sqrt(x.var(0, ddof=1) / nx + y.var(0, ddof=1) / ny)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant columns: handled below
        test = stats.ttest_ind(x, y, axis=0, equal_var=False)
        interval = test.confidence_interval(confidence)
    half = (np.asarray(interval.high) - np.asarray(interval.low)) / 2.0
    p = np.where(se > 0, test.pvalue, np.where(diff == 0, 1.0, 0.0))
    return diff, np.where(se > 0, half, 0.0), p, se


def _fmt(value: float) -> str:
    return f"{value:+.2f}" if np.isfinite(value) else "nan"


def _programs(
    embedded: ad.AnnData, labels: np.ndarray, perturbations: list[str], program_key: str | None
) -> dict[str, str]:
    """Each perturbation's most frequent annotation in ``obs[program_key]`` (none without a key)."""
    if not program_key or program_key not in embedded.obs:
        return {}
    annot = embedded.obs[program_key].astype(str).to_numpy()
    programs = {}
    for label in perturbations:
        values = pd.Series(annot[labels == label]).value_counts()
        programs[label] = str(values.index[0]) if len(values) else ""
    return programs


def _effect_rows(
    label: str, cells: np.ndarray, control: np.ndarray, control_sd: np.ndarray, factors: list[str], confidence: float
) -> pd.DataFrame:
    """One perturbation's Welch effect on every factor (before multiple-testing correction)."""
    diff, half, p, _ = welch(cells, control, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        std_effect = diff / control_sd
    return pd.DataFrame(
        {
            PERTURBATION: label,
            "factor": factors,
            "n_cells": cells.shape[0],
            "n_control": control.shape[0],
            "mean_perturbed": cells.mean(0),
            "mean_control": control.mean(0),
            "effect": diff,
            "ci_low": diff - half,
            "ci_high": diff + half,
            "standardised_effect": std_effect,
            "p_value": p,
        }
    )


def _describe(table: pd.DataFrame, genes: dict[tuple[str, str], list[str]], confidence: float) -> pd.DataFrame:
    """``genes_up`` / ``genes_down`` (the factor's genes the shift raises / lowers) and ``reading``."""
    ups, downs, readings = [], [], []
    for row in table.itertuples(index=False):
        positive = genes.get((row.factor, "positive"), [])
        negative = genes.get((row.factor, "negative"), [])
        up, down = (positive, negative) if row.effect >= 0 else (negative, positive)
        ups.append(", ".join(up))
        downs.append(", ".join(down))
        ci = f"{confidence:.0%} CI {_fmt(row.ci_low)} to {_fmt(row.ci_high)}"
        text = (
            f"{row.perturbation} {row.direction} {row.factor} by {abs(row.effect):.2f} SD ({ci}; "
            f"{_fmt(row.standardised_effect)} control SD)"
        )
        if up:
            text += f"; up: {', '.join(up[:5])}"
        if down:
            text += f"; down: {', '.join(down[:5])}"
        if not row.significant:
            text += " [not significant]"
        readings.append(text)
    table["genes_up"], table["genes_down"], table["reading"] = ups, downs, readings
    return table


def factor_effects(
    embedded: ad.AnnData,
    top_genes: pd.DataFrame,
    program_key: str | None = None,
    *,
    confidence: float = 0.95,
    alpha: float = 0.05,
    min_standardised_effect: float = 0.2,
    min_cells: int = 2,
    n_genes_shown: int = 8,
) -> pd.DataFrame:
    """How far each perturbation moves each factor relative to the control cells.

    For perturbation ``p`` and factor ``k`` (scores ``obsm["X_ldvae"]``, unit
    SD over all cells): ``effect`` = mean over ``p``'s cells minus mean over
    control cells, with a Welch ``confidence`` interval (``ci_low``,
    ``ci_high``) and p-value, BH-adjusted over the whole table
    (``q_value``); ``standardised_effect`` = effect / SD of the controls on
    ``k``. ``significant``: ``q_value < alpha`` and ``|standardised_effect| >=
    min_standardised_effect``. ``genes_up`` / ``genes_down`` are the factor's
    top genes the perturbation raises / lowers through it (the factor's
    positive genes when the effect is positive, its negative ones otherwise),
    and ``reading`` says it in words; ``program`` is the perturbation's annotation
    in ``obs[program_key]``. Rows are sorted by perturbation and by
    ``|standardised_effect|`` (``rank`` 1 = the factor it moves most).

    A screen without perturbations (a plain count matrix, every cell
    ``unperturbed``) or without controls gives an empty table with the same
    columns.
    """
    confidence = check_float("confidence", confidence, 1e-9, 1.0, "e.g. 0.95")
    min_std = float(min_standardised_effect)
    if LATENT_KEY not in embedded.obsm:
        raise ModelInputError(f"The screen has no obsm['{LATENT_KEY}']: embed it with LDVAE(model).embed first.")
    if PERTURBATION not in embedded.obs:
        raise ModelInputError("The screen has no obs['perturbation']: run the data_processing pipeline first.")
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in EFFECT_COLUMNS})
    labels = embedded.obs[PERTURBATION].astype(str).to_numpy()
    is_control = labels == CONTROL
    perturbations = sorted(set(labels) - {CONTROL, UNPERTURBED})
    if not perturbations:
        logger.info("No perturbations in the screen (a plain count matrix): the factor x perturbation table is empty.")
        return empty
    if is_control.sum() == 0:
        logger.warning("No control cells: the factor x perturbation table is empty.")
        return empty

    scores = np.asarray(embedded.obsm[LATENT_KEY], dtype=np.float64)
    names = (embedded.uns.get("ldvae") or {}).get("factors")
    factors = [str(f) for f in names] if names is not None and len(names) else []
    if len(factors) != scores.shape[1]:
        factors = [f"factor_{k + 1}" for k in range(scores.shape[1])]
    control = scores[is_control]
    control_sd = control.std(0, ddof=1) if control.shape[0] > 1 else np.full(scores.shape[1], np.nan)
    programs = _programs(embedded, labels, perturbations, program_key)
    blocks = []
    for label in perturbations:
        cells = scores[labels == label]
        if cells.shape[0] < min_cells:
            logger.info("Skipping %s: %d cell(s) < min_cells=%d.", label, cells.shape[0], min_cells)
            continue
        block = _effect_rows(label, cells, control, control_sd, factors, confidence)
        block["program"] = programs.get(label, "")
        blocks.append(block)
    if not blocks:
        return empty
    table = pd.concat(blocks, ignore_index=True)
    table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy(dtype=float))
    table["significant"] = (table["q_value"] < alpha) & (table["standardised_effect"].abs() >= min_std)
    table["direction"] = np.where(table["effect"] >= 0, "raises", "lowers")
    table = _describe(table, _gene_lists(top_genes, int(n_genes_shown)), confidence)
    table["_abs"] = table["standardised_effect"].abs().fillna(-1.0)
    table = table.sort_values([PERTURBATION, "_abs"], ascending=[True, False], kind="stable")
    table["rank"] = table.groupby(PERTURBATION).cumcount() + 1
    return table[EFFECT_COLUMNS].reset_index(drop=True)
