"""Differential expression of each perturbation against the controls, with statistics.

Two methods, one long table (``differential_expression.csv``):

* ``pseudobulk_deseq2`` -- PyDESeq2 (Muzellec et al., Bioinformatics 2023) on
  pseudobulk samples: the raw counts of a perturbation's cells are summed per
  replicate. A screen with a batch column uses its batches as replicates (and
  ``~batch + condition`` as the design); a screen without one is split at random
  into ``n_pseudo_replicates`` pseudo-replicates per perturbation (and per the
  controls). One dataset holds every perturbation's samples, so dispersions are
  shared; each perturbation is then a Wald test of its level against the
  controls, with DESeq2's BH ``padj``.
* ``wilcoxon`` -- scanpy's ``rank_genes_groups`` (Wilcoxon rank-sum on the
  log-normalised cells of the perturbation vs the controls, BH-adjusted).

Columns: perturbation, gene, method, log2_fold_change, p_value, q_value,
base_mean (DESeq2's mean normalised count; the control mean of log-normalised
expression for Wilcoxon), n_cells, n_control, n_replicates.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy import stats

from perturbscope.models._checks import check_choice, check_int
from perturbscope.schema import CONTROL, COUNTS_LAYER, IS_CONTROL, PERTURBATION, UNPERTURBED, ScreenValidationError

logger = logging.getLogger(__name__)

__all__ = [
    "AGREEMENT_COLUMNS",
    "DESEQ2",
    "DE_COLUMNS",
    "WILCOXON",
    "differential_expression",
    "pseudobulk",
    "pseudobulk_deseq2",
    "salient_agreement",
    "wilcoxon",
]

DESEQ2, WILCOXON = "pseudobulk_deseq2", "wilcoxon"
DE_COLUMNS = [
    PERTURBATION,
    "gene",
    "method",
    "log2_fold_change",
    "p_value",
    "q_value",
    "base_mean",
    "n_cells",
    "n_control",
    "n_replicates",
]


def checked_groups(screen: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """:func:`screen_groups`, with a clear error for a screen without labels or without controls."""
    if PERTURBATION not in screen.obs:
        raise ScreenValidationError(
            "The screen has no obs['perturbation']: run the data_processing pipeline first (it labels the cells)."
        )
    labels, is_control = screen_groups(screen)
    if not is_control.any():
        raise ScreenValidationError(
            "The screen has no control cells: every test compares a perturbation with the controls "
            "(schema.control_labels names them)."
        )
    return labels, is_control


def screen_groups(screen: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """``(perturbation labels, is_control)`` of every cell of a processed screen."""
    labels = screen.obs[PERTURBATION].astype(str).to_numpy()
    if IS_CONTROL in screen.obs:
        is_control = screen.obs[IS_CONTROL].to_numpy().astype(bool)
    else:
        is_control = labels == CONTROL
    return labels, is_control


def subsample(members: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` of ``members`` (sorted, drawn with ``rng``); all of them when ``n`` is None."""
    return np.sort(rng.choice(members, size=int(n), replace=False)) if n is not None and members.size > n else members


def _batches_are_replicates(screen: ad.AnnData, batch_key: str | None) -> bool:
    return bool(batch_key) and batch_key in screen.obs and screen.obs[batch_key].nunique() > 1


def tested_perturbations(screen: ad.AnnData, min_cells: int) -> list[str]:
    """Perturbations with at least ``min_cells`` cells (controls and unperturbed cells excluded)."""
    labels, is_control = screen_groups(screen)
    counts = pd.Series(labels[~is_control & (labels != UNPERTURBED)]).value_counts()
    return sorted(counts.index[counts >= min_cells].astype(str))


def pseudobulk(
    screen: ad.AnnData,
    perturbations: list[str],
    n_pseudo_replicates: int,
    batch_key: str | None,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(counts, metadata)``: one row per (condition, replicate) of summed raw counts.

    ``condition`` is the perturbation label or ``control``; ``replicate`` is the batch
    (with ``batch_key``) or a random pseudo-replicate (``rep1`` ...) of the cells.
    """
    counts = screen.layers.get(COUNTS_LAYER, screen.X)
    counts = sp.csr_matrix(counts)
    labels, is_control = screen_groups(screen)
    condition = np.where(is_control, CONTROL, labels)
    rng = np.random.default_rng(seed)
    replicate = np.empty(screen.n_obs, dtype=object)
    if _batches_are_replicates(screen, batch_key):
        replicate[:] = screen.obs[batch_key].astype(str).to_numpy()
    else:
        for name in [CONTROL, *perturbations]:
            # a random, balanced split of each group's cells into pseudo-replicates
            members = np.flatnonzero(condition == name)
            replicate[rng.permutation(members)] = [f"rep{1 + i % n_pseudo_replicates}" for i in range(members.size)]
    keep = np.isin(condition, [CONTROL, *perturbations])
    keys = pd.DataFrame({"condition": condition[keep], "replicate": replicate[keep]})
    groups = keys.groupby(["condition", "replicate"], sort=True).indices
    rows = np.flatnonzero(keep)
    names, meta, sums = [], [], []
    for (cond, rep), idx in groups.items():
        names.append(f"{cond}|{rep}")
        meta.append({"condition": cond, "replicate": rep, "n_cells": idx.size})
        sums.append(np.asarray(counts[rows[idx]].sum(0)).ravel())
    matrix = pd.DataFrame(np.rint(np.vstack(sums)).astype(np.int64), index=names, columns=screen.var_names.astype(str))
    return matrix, pd.DataFrame(meta, index=names)


def _vectorised_inference(n_cpus: int) -> Any:
    """PyDESeq2's ``DefaultInference`` with the Wald test done for all genes at once.

    PyDESeq2 0.5 runs its Wald test gene by gene in Python (through joblib), which on a 2,000-gene
    panel with 20 perturbations is ~40,000 calls and most of this step's time. Its ``Inference`` class
    is the documented way to swap the numerics; this one computes the same statistic (the same
    ``W``, ``M``, ridge, contrast and two-sided normal p-value as ``pydeseq2.utils.wald_test``) with
    batched linear algebra, and leaves one-sided alternatives to the library.
    """
    from pydeseq2.default_inference import DefaultInference
    from scipy.stats import norm

    class VectorisedWald(DefaultInference):
        def wald_test(  # type: ignore[override]
            self,
            design_matrix: np.ndarray,
            disp: np.ndarray,
            lfc: np.ndarray,
            mu: np.ndarray,
            ridge_factor: np.ndarray,
            contrast: np.ndarray,
            lfc_null: np.ndarray,
            alt_hypothesis: str | None = None,
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if alt_hypothesis is not None:
                return super().wald_test(design_matrix, disp, lfc, mu, ridge_factor, contrast, lfc_null, alt_hypothesis)
            x = np.asarray(design_matrix, dtype=np.float64)
            contrast = np.asarray(contrast, dtype=np.float64)
            mu = np.asarray(mu, dtype=np.float64)
            weights = mu / (1.0 + mu * np.asarray(disp, dtype=np.float64)[None, :])  # samples x genes
            m = np.einsum("ip,ig,iq->gpq", x, weights, x)
            h = np.linalg.inv(m + np.asarray(ridge_factor, dtype=np.float64)[None, :, :])
            hc = h @ contrast
            se = np.sqrt(np.einsum("gp,gpq,gq->g", hc, m, hc))
            stat = (np.asarray(lfc, dtype=np.float64) - lfc_null) @ contrast / se
            return 2.0 * norm.sf(np.abs(stat)), stat, se

    return VectorisedWald(n_cpus=n_cpus)


def pseudobulk_deseq2(
    screen: ad.AnnData,
    perturbations: list[str],
    n_pseudo_replicates: int = 3,
    batch_key: str | None = None,
    seed: int = 0,
    n_cpus: int = 1,
) -> pd.DataFrame:
    """PyDESeq2 on pseudobulk samples, one Wald test per perturbation vs the controls."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    if not perturbations:
        return pd.DataFrame(columns=DE_COLUMNS)
    counts, meta = pseudobulk(screen, perturbations, n_pseudo_replicates, batch_key, seed)
    # formula-safe level names; the labels come back in the table
    codes = {CONTROL: "ctrl", **{p: f"p{i:05d}" for i, p in enumerate(perturbations)}}
    meta = meta.assign(level=meta["condition"].map(codes))
    design = "~replicate + level" if _batches_are_replicates(screen, batch_key) else "~level"
    keep_genes = counts.columns[counts.sum(0).to_numpy() > 0]
    inference = _vectorised_inference(n_cpus)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(
            counts=counts[keep_genes],
            metadata=meta[["level", "replicate"]],
            design=design,
            refit_cooks=True,
            inference=inference,
            quiet=True,
        )
        dds.deseq2()
    n_control = int(meta.loc[meta["condition"] == CONTROL, "n_cells"].sum())
    frames = []
    for label in perturbations:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats = DeseqStats(dds, contrast=["level", codes[label], "ctrl"], inference=inference, quiet=True)
            stats.summary()
        res = stats.results_df
        mine = meta["condition"] == label
        frames.append(
            pd.DataFrame(
                {
                    PERTURBATION: label,
                    "gene": res.index.astype(str),
                    "method": DESEQ2,
                    "log2_fold_change": res["log2FoldChange"].to_numpy(),
                    "p_value": res["pvalue"].to_numpy(),
                    "q_value": res["padj"].to_numpy(),
                    "base_mean": res["baseMean"].to_numpy(),
                    "n_cells": int(meta.loc[mine, "n_cells"].sum()),
                    "n_control": n_control,
                    "n_replicates": int(mine.sum()),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[DE_COLUMNS]


def wilcoxon(screen: ad.AnnData, perturbations: list[str], max_cells: int | None = None, seed: int = 0) -> pd.DataFrame:
    """scanpy's Wilcoxon rank-sum test of each perturbation vs the controls on log-normalised ``X``.

    ``max_cells``: cells per group subsampled (with ``seed``) before the test; None = all.
    """
    if not perturbations:
        return pd.DataFrame(columns=DE_COLUMNS)
    labels, is_control = screen_groups(screen)
    group = np.where(is_control, CONTROL, labels)
    rng = np.random.default_rng(seed)
    idx = np.sort(
        np.concatenate([subsample(np.flatnonzero(group == name), max_cells, rng) for name in [CONTROL, *perturbations]])
    )
    cells = ad.AnnData(
        X=screen.X[idx],
        obs=pd.DataFrame({"group": pd.Categorical(group[idx])}, index=screen.obs_names[idx]),
        var=pd.DataFrame(index=screen.var_names.astype(str)),
    )
    sc.tl.rank_genes_groups(
        cells,
        "group",
        groups=perturbations,
        reference=CONTROL,
        method="wilcoxon",
        corr_method="benjamini-hochberg",
        use_raw=False,
        key_added="de",
    )
    table = sc.get.rank_genes_groups_df(cells, group=perturbations, key="de")
    sizes = pd.Series(group[idx]).value_counts()
    control = cells.X[(cells.obs["group"] == CONTROL).to_numpy()]
    control_mean = pd.Series(np.asarray(control.mean(0)).ravel(), index=cells.var_names)
    return pd.DataFrame(
        {
            PERTURBATION: table["group"].astype(str).to_numpy(),
            "gene": table["names"].astype(str).to_numpy(),
            "method": WILCOXON,
            "log2_fold_change": table["logfoldchanges"].to_numpy(),
            "p_value": table["pvals"].to_numpy(),
            "q_value": table["pvals_adj"].to_numpy(),
            "base_mean": control_mean.reindex(table["names"].astype(str)).to_numpy(),
            "n_cells": table["group"].astype(str).map(sizes).to_numpy(),
            "n_control": int(sizes.get(CONTROL, 0)),
            "n_replicates": np.nan,
        }
    )[DE_COLUMNS]


def differential_expression(
    screen: ad.AnnData,
    batch_key: str | None = None,
    seed: int = 0,
    *,
    methods: Sequence[str] = (DESEQ2, WILCOXON),
    min_cells: int = 20,
    n_pseudo_replicates: int = 3,
    wilcoxon_max_cells: int | None = 2000,
    n_cpus: int = 1,
) -> pd.DataFrame:
    """Per perturbation vs controls: pseudobulk PyDESeq2 and/or cell-level Wilcoxon (``methods``).

    Perturbations with fewer than ``min_cells`` cells are left out. Pseudobulk replicates are the screen's
    batches (``batch_key``) or ``n_pseudo_replicates`` random splits; Wilcoxon uses up to
    ``wilcoxon_max_cells`` cells per group (None: all); ``n_cpus`` PyDESeq2 workers.
    """
    methods = list(methods)
    for method in methods:
        check_choice("methods", method, (DESEQ2, WILCOXON))
    checked_groups(screen)
    min_cells = check_int("min_cells", min_cells, 2, "perturbations with fewer cells are left out")
    tested = tested_perturbations(screen, min_cells)
    frames = []
    if DESEQ2 in methods:
        n_rep = check_int("n_pseudo_replicates", n_pseudo_replicates, 2, "pseudo-replicates per group")
        frames.append(pseudobulk_deseq2(screen, tested, n_rep, batch_key, seed, n_cpus=int(n_cpus)))
    if WILCOXON in methods:
        frames.append(wilcoxon(screen, tested, wilcoxon_max_cells, seed))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=DE_COLUMNS)
    logger.info(
        "Differential expression: %d perturbations x %d genes, methods %s.", len(tested), screen.n_vars, methods
    )
    return pd.concat(frames, ignore_index=True)


AGREEMENT_COLUMNS = [
    PERTURBATION,
    "method",
    "n_genes",
    "spearman",
    "fraction_significant_same_direction",
    "n_significant_de_genes",
]


def salient_agreement(de_table: pd.DataFrame, salient_genes: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """How the contrastive model's salient gene table agrees with differential expression.

    Per perturbation and DE method, over the genes of the salient table: Spearman correlation of the
    salient ``mean_log2fc`` with the DE log2 fold change, and the share of those genes that are DE at
    ``q < alpha`` in the same direction.
    """
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
