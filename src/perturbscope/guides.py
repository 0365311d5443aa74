"""From guide UMI counts to labelled cells, and whether each guide knocked its target down.

Every Perturb-seq screen starts as guide counts: 10x's ``cellranger count`` (Feature Barcoding, ``CRISPR Guide
Capture``) writes them next to the gene counts. This module

* reads them (:func:`read_screen`): a Cell Ranger ``.h5``, pertpy's MuData layout (``gex`` + ``crispr``), or an
  ``.h5ad`` whose guide counts are in ``obsm["guide_counts"]`` with a guide -> target table in
  ``uns["guides"]``; the result is one AnnData with the gene counts in ``X`` and the guides beside them;
* calls which guides each cell carries (:func:`fit_guide_mixtures`, :func:`call_guides`): per guide, a
  two-component mixture of its UMI counts over all cells, a Poisson background (ambient guide UMIs, barcode
  swaps) and a discretised log-normal signal (a guide the cell expresses), fitted by EM on the histogram of
  the counts, as Replogle et al. (2022) did; a guide is called where the signal's posterior is above
  ``probability`` and the cell has at least ``min_umis`` of it;
* turns called guides into labels (:func:`label_cells`): no guide -> ``unassigned``, one -> its target,
  several -> ``A+B`` in a combinatorial design (up to ``max_per_cell`` guides) or ``multiplet``; guides whose
  target is a control label (non-targeting) give the control label;
* measures the knockdown of every guide's own target (:func:`knockdown_table`).

Why our own mixture: crispat 0.9.11 and pertpy 1.0.3 (both benchmarked side by side in
``bench/guide_calling.py``) fit their Poisson-Gaussian mixtures with Pyro / NumPyro per guide, which pulls a
second deep-learning stack into the lock and takes minutes per hundred guides; the EM here works on each
guide's histogram of counts (a few hundred distinct values, whatever the number of cells), so a guide takes
milliseconds. The model is the same family.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from scipy.special import gammaln

logger = logging.getLogger(__name__)

__all__ = [
    "GUIDE_COUNTS",
    "GUIDES",
    "MODALITIES",
    "GuideInputError",
    "call_guides",
    "fit_guide_mixtures",
    "has_guides",
    "targeting_guide",
    "knockdown_table",
    "label_cells",
    "read_screen",
]

GUIDE_COUNTS = "guide_counts"
"""``obsm`` key of the cells x guides UMI counts (CSR)."""
GUIDES = "guides"
"""``uns`` key of the guide table: ``{"guide": [...], "target": [...]}`` in the column order of the counts."""
GUIDE_FEATURE_TYPE = "CRISPR Guide Capture"
UNASSIGNED, MULTIPLET = "unassigned", "multiplet"
MODALITIES = {"CRISPRi": "down", "CRISPRko": "down", "CRISPRa": "up"}
"""Direction of a working guide's effect on its own target's expression."""


class GuideInputError(ValueError):
    """The guide counts or the guide -> target table cannot be used; the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------------- reading
def has_guides(adata: ad.AnnData) -> bool:
    """Whether the screen carries guide counts to call (:data:`GUIDE_COUNTS` and :data:`GUIDES`)."""
    return GUIDE_COUNTS in adata.obsm and GUIDES in adata.uns


def guide_table(adata: ad.AnnData) -> pd.DataFrame:
    """The guides (``guide``, ``target``) in the column order of ``obsm["guide_counts"]``."""
    table = pd.DataFrame({k: np.asarray(v).astype(str) for k, v in dict(adata.uns[GUIDES]).items()})
    return table[["guide", "target"]]


def guide_counts(adata: ad.AnnData) -> sp.csr_matrix:
    matrix = adata.obsm[GUIDE_COUNTS]
    matrix = matrix.to_numpy() if isinstance(matrix, pd.DataFrame) else matrix
    return sp.csr_matrix(matrix, dtype=np.float32)


def _targets_from_reference(guides: Sequence[str], reference: pd.DataFrame, where: str) -> list[str]:
    ref = reference.copy()
    ref.columns = [str(c).strip() for c in ref.columns]
    target_column = next((c for c in ("target_gene_name", "target", "gene") if c in ref.columns), None)
    key_column = next((c for c in ("name", "id", "guide") if c in ref.columns), None)
    if target_column is None or key_column is None:
        raise GuideInputError(
            f"{where} needs a guide column ('name' or 'id') and a target column ('target_gene_name'); it has "
            f"{list(ref.columns)} (Cell Ranger's feature_reference.csv has both)."
        )
    by_name = dict(zip(ref[key_column].astype(str), ref[target_column].astype(str), strict=False))
    if "id" in ref.columns:
        by_name.update(dict(zip(ref["id"].astype(str), ref[target_column].astype(str), strict=False)))
    missing = [g for g in guides if g not in by_name]
    if missing:
        raise GuideInputError(
            f"{len(missing)} guide(s) of the counts are not in {where} (e.g. {missing[:5]}); it lists "
            f"{len(by_name)} guides (e.g. {list(by_name)[:5]}). Use the feature reference the counts were made with."
        )
    return [by_name[g] for g in guides]


def _with_guides(genes: ad.AnnData, counts: Any, guides: Sequence[str], targets: Sequence[str]) -> ad.AnnData:
    targets = [str(t).strip() for t in targets]
    empty = [g for g, t in zip(guides, targets, strict=True) if t in ("", "nan", "None")]
    if empty:
        raise GuideInputError(
            f"{len(empty)} guide(s) have no target (e.g. {empty[:5]}): give each guide its target gene "
            "(target_gene_name in the feature reference; the control guides a name like 'Non-Targeting')."
        )
    out = genes.copy()
    out.obsm[GUIDE_COUNTS] = sp.csr_matrix(counts, dtype=np.float32)
    out.uns[GUIDES] = {"guide": [str(g) for g in guides], "target": targets}
    return out


def read_cellranger(path: str | Path, feature_reference: str | Path | None = None) -> ad.AnnData:
    """A Cell Ranger ``filtered_feature_bc_matrix.h5``: gene features -> ``X``, ``CRISPR Guide Capture``
    features -> ``obsm["guide_counts"]``, targets from the h5's ``target_gene_name`` or ``feature_reference``;
    ``obs["gem_group"]`` from the barcodes' ``-N`` suffix (the GEM well of ``cellranger aggr``: a batch)."""
    import scanpy as sc

    full = sc.read_10x_h5(str(path), gex_only=False)
    full.var_names_make_unique()
    types = full.var["feature_types"].astype(str)
    is_guide = (types == GUIDE_FEATURE_TYPE).to_numpy()
    if not is_guide.any():
        raise GuideInputError(
            f"'{path}' has no '{GUIDE_FEATURE_TYPE}' features (feature types: {sorted(set(types))}): it holds no "
            "guide counts. Point `file` at the Cell Ranger output of the run with Feature Barcoding, or give an "
            ".h5ad whose cells are already labelled."
        )
    genes = full[:, (types == "Gene Expression").to_numpy()].copy()
    guide_var = full.var.loc[is_guide]
    names = guide_var.index.astype(str).tolist()
    if feature_reference is not None:
        reference = pd.read_csv(feature_reference)
        ids = guide_var["gene_ids"].astype(str).tolist() if "gene_ids" in guide_var else names
        try:
            targets = _targets_from_reference(ids, reference, f"the feature reference '{feature_reference}'")
        except GuideInputError:
            targets = _targets_from_reference(names, reference, f"the feature reference '{feature_reference}'")
    elif "target_gene_name" in guide_var:
        targets = guide_var["target_gene_name"].astype(str).tolist()
    else:
        raise GuideInputError(
            f"'{path}' does not say which gene each guide targets (no target_gene_name): name the Cell Ranger "
            "feature_reference.csv as `feature_reference` of the screen in conf/base/screens.yml."
        )
    genes.var = genes.var.drop(columns=[c for c in genes.var.columns if c not in ("gene_ids", "feature_types")])
    suffix = genes.obs_names.str.extract(r"-(\d+)$")[0]
    if suffix.notna().all():  # the GEM well of `cellranger aggr` (one per library / batch)
        genes.obs["gem_group"] = pd.Categorical(suffix.astype(int).to_numpy())
    return _with_guides(genes, full[:, is_guide].X, names, targets)


def read_mudata(path: str | Path, feature_reference: str | Path | None = None) -> ad.AnnData:
    """pertpy's MuData layout: the ``gex`` modality's counts and the ``crispr`` modality's guide counts
    (targets from its ``var`` column ``target_gene_name``/``target``, or ``feature_reference``)."""
    import mudata as md

    data = md.read_h5mu(str(path))
    missing = [m for m in ("gex", "crispr") if m not in data.mod]
    if missing:
        raise GuideInputError(
            f"'{path}' has modalities {list(data.mod)}; a Perturb-seq MuData needs 'gex' (gene counts) and 'crispr' "
            f"(guide counts); missing {missing}."
        )
    gex, crispr = data.mod["gex"], data.mod["crispr"]
    common = gex.obs_names.intersection(crispr.obs_names)
    gex, crispr = gex[common].copy(), crispr[common].copy()
    names = crispr.var_names.astype(str).tolist()
    column = next((c for c in ("target_gene_name", "target", "gene") if c in crispr.var), None)
    if feature_reference is not None:
        targets = _targets_from_reference(names, pd.read_csv(feature_reference), f"'{feature_reference}'")
    elif column is not None:
        targets = crispr.var[column].astype(str).tolist()
    else:
        raise GuideInputError(
            f"The 'crispr' modality of '{path}' does not say which gene each guide targets (var columns "
            f"{list(crispr.var.columns)}): add target_gene_name, or name a feature_reference for the screen."
        )
    return _with_guides(gex, crispr.X, names, targets)


def read_screen(path: str | Path, feature_reference: str | Path | None = None) -> ad.AnnData:
    """Any supported screen file as one AnnData: ``.h5`` (Cell Ranger), ``.h5mu`` (MuData), else ``.h5ad``;
    an ``.h5ad`` with ``obsm["guide_counts"]`` as a table (one column per guide) gets its targets from
    ``uns["guides"]`` or ``feature_reference``."""
    suffix = Path(str(path)).suffix.lower()
    if suffix == ".h5":
        return read_cellranger(path, feature_reference)
    if suffix == ".h5mu":
        return read_mudata(path, feature_reference)
    adata = ad.read_h5ad(str(path))
    return with_obsm_guides(adata, feature_reference)


def with_obsm_guides(adata: ad.AnnData, feature_reference: str | Path | None = None) -> ad.AnnData:
    """An ``.h5ad`` whose guide counts are a table in ``obsm["guide_counts"]``: the guide table from
    ``uns["guides"]`` or ``feature_reference`` (unchanged when there are no guide counts)."""
    if GUIDE_COUNTS not in adata.obsm:
        return adata
    table = adata.obsm[GUIDE_COUNTS]
    names = [str(c) for c in table.columns] if isinstance(table, pd.DataFrame) else None
    if GUIDES in adata.uns:
        return adata
    if names is None:
        raise GuideInputError(
            "obsm['guide_counts'] is a matrix without guide names and uns['guides'] is missing: store the counts "
            "as a DataFrame (one column per guide) or add uns['guides'] = {'guide': [...], 'target': [...]}."
        )
    if feature_reference is None:
        raise GuideInputError(
            "obsm['guide_counts'] has no guide -> target table: add uns['guides'] = {'guide': [...], 'target': "
            "[...]} or name a feature_reference CSV (columns name, target_gene_name) for the screen."
        )
    targets = _targets_from_reference(names, pd.read_csv(feature_reference), f"'{feature_reference}'")
    return _with_guides(adata, table.to_numpy(), names, targets)


# ---------------------------------------------------------------------------------------------- calling
@dataclass(frozen=True)
class GuideMixture:
    """One guide's fitted mixture: Poisson background mean, log-normal signal (natural log of count + 1)."""

    background_mean: float
    signal_mean: float
    signal_sd: float
    signal_weight: float
    iterations: int

    def log_background(self, y: np.ndarray) -> np.ndarray:
        lam = max(self.background_mean, 1e-8)
        return y * np.log(lam) - lam - gammaln(y + 1.0)

    def log_signal(self, y: np.ndarray) -> np.ndarray:
        upper = stats.norm.cdf((np.log(y + 1.5) - self.signal_mean) / self.signal_sd)
        lower = np.where(
            y > 0, stats.norm.cdf((np.log(np.maximum(y, 1) + 0.5) - self.signal_mean) / self.signal_sd), 0.0
        )
        return np.log(np.maximum(upper - lower, 1e-300))

    def posterior(self, y: np.ndarray) -> np.ndarray:
        """P(signal | count) for each count."""
        if self.signal_weight <= 0:
            return np.zeros_like(y, dtype=np.float64)
        a = np.log(self.signal_weight) + self.log_signal(y)
        b = np.log1p(-self.signal_weight) + self.log_background(y)
        return 1.0 / (1.0 + np.exp(np.clip(b - a, -700, 700)))


def _fit_one(values: np.ndarray, weights: np.ndarray, max_iter: int = 200, tol: float = 1e-8) -> GuideMixture:
    """EM on a histogram (distinct counts ``values`` seen ``weights`` times)."""
    n = weights.sum()
    order = np.argsort(values)
    values, weights = values[order], weights[order]
    cum = np.cumsum(weights) / n
    q90 = values[min(np.searchsorted(cum, 0.9), values.size - 1)]
    low = values <= q90
    lam = max(float((values[low] * weights[low]).sum() / weights[low].sum()), 1e-3)
    start = max(float(stats.poisson.ppf(1 - 1e-4, lam)) + 1.0, 2.0)
    high = values >= start
    if weights[high].sum() < 1:
        return GuideMixture(lam, float("nan"), float("nan"), 0.0, 0)
    log_y = np.log(values + 1.0)
    mixture = GuideMixture(
        lam,
        float(np.average(log_y[high], weights=weights[high])),
        max(
            float(
                np.sqrt(
                    np.average(
                        (log_y[high] - np.average(log_y[high], weights=weights[high])) ** 2, weights=weights[high]
                    )
                )
            ),
            0.3,
        ),
        float(weights[high].sum() / n),
        0,
    )
    previous = -np.inf
    for iteration in range(1, max_iter + 1):
        a = np.log(mixture.signal_weight) + mixture.log_signal(values)
        b = np.log1p(-mixture.signal_weight) + mixture.log_background(values)
        top = np.maximum(a, b)
        loglik = float((weights * (top + np.log(np.exp(a - top) + np.exp(b - top)))).sum())
        r = 1.0 / (1.0 + np.exp(np.clip(b - a, -700, 700)))
        ws, wb = weights * r, weights * (1.0 - r)
        if ws.sum() < 0.5:
            return GuideMixture(float((values * weights).sum() / n), float("nan"), float("nan"), 0.0, iteration)
        mean = float((ws * log_y).sum() / ws.sum())
        sd = max(float(np.sqrt((ws * (log_y - mean) ** 2).sum() / ws.sum())), 0.15)
        lam = max(float((wb * values).sum() / max(wb.sum(), 1e-12)), 1e-8)
        weight = float(np.clip(ws.sum() / n, 1e-8, 1 - 1e-8))
        if mean <= np.log(lam + 1.0):  # the signal must sit above the background
            return GuideMixture(float((values * weights).sum() / n), float("nan"), float("nan"), 0.0, iteration)
        mixture = GuideMixture(lam, mean, sd, weight, iteration)
        if abs(loglik - previous) <= tol * max(1.0, abs(loglik)):
            break
        previous = loglik
    return mixture


def fit_guide_mixtures(counts: sp.csr_matrix, guides: Sequence[str]) -> dict[str, GuideMixture]:
    """One :class:`GuideMixture` per guide (column of ``counts``), fitted on all cells' counts of that guide."""
    csc = sp.csc_matrix(counts)
    n_cells = counts.shape[0]
    out = {}
    for j, guide in enumerate(guides):
        column = csc.data[csc.indptr[j] : csc.indptr[j + 1]].astype(np.int64)
        values, freq = np.unique(column, return_counts=True)
        zeros = n_cells - column.size
        values = np.r_[0, values] if zeros else values
        freq = np.r_[zeros, freq] if zeros else freq
        keep = freq > 0
        out[str(guide)] = _fit_one(values[keep].astype(np.float64), freq[keep].astype(np.float64))
    return out


def call_guides(
    counts: sp.csr_matrix,
    mixtures: Mapping[str, GuideMixture],
    guides: Sequence[str],
    probability: float = 0.5,
    min_umis: int = 2,
) -> sp.csr_matrix:
    """Boolean CSR (cells x guides): the guides called in each cell."""
    csc = sp.csc_matrix(counts)
    rows, cols = [], []
    for j, guide in enumerate(guides):
        start, stop = csc.indptr[j], csc.indptr[j + 1]
        y = csc.data[start:stop].astype(np.float64)
        hit = (mixtures[str(guide)].posterior(y) >= probability) & (y >= min_umis)
        rows.append(csc.indices[start:stop][hit])
        cols.append(np.full(int(hit.sum()), j))
    rows_all = np.concatenate(rows) if rows else np.zeros(0, int)
    cols_all = np.concatenate(cols) if cols else np.zeros(0, int)
    return sp.csr_matrix((np.ones(rows_all.size, bool), (rows_all, cols_all)), shape=counts.shape)


def label_cells(
    called: sp.csr_matrix,
    guides: pd.DataFrame,
    control_labels: Sequence[str],
    max_per_cell: int = 1,
    separator: str = "+",
) -> pd.DataFrame:
    """Per cell: ``guide_identity`` (called guides joined by ``;``), ``n_guides`` and ``label``: the control
    label, a target, targets joined by ``separator`` (combinatorial designs, up to ``max_per_cell`` guides),
    ``unassigned`` (no guide) or ``multiplet`` (more guides than the design puts in a cell)."""
    controls = {c.lower(): c for c in control_labels}
    names = guides["guide"].to_numpy()
    targets = guides["target"].to_numpy()
    called = sp.csr_matrix(called)
    identity, n_guides, labels = [], np.diff(called.indptr), []
    for i in range(called.shape[0]):
        cols = called.indices[called.indptr[i] : called.indptr[i + 1]]
        identity.append(";".join(sorted(names[cols])))
        if cols.size == 0:
            labels.append(UNASSIGNED)
            continue
        if cols.size > max_per_cell:
            labels.append(MULTIPLET)
            continue
        hit = sorted({t for t in targets[cols] if t.lower() not in controls})
        if not hit:
            labels.append(controls[targets[cols[0]].lower()])
        else:
            labels.append(separator.join(hit))
    return pd.DataFrame({"guide_identity": identity, "n_guides": n_guides.astype(np.int64), "label": labels})


def targeting_guide(identity: Sequence[str], target_of: Mapping[str, str], control_labels: Sequence[str]) -> np.ndarray:
    """Per cell, its one targeting guide ("" for none or several): the guides of ``identity`` (called guides
    joined by ``;``) whose target is not a control label. In a combinatorial design a single perturbation's
    cell carries its guide beside a non-targeting one; that cell measures the guide's knockdown all the same."""
    controls = {c.lower() for c in control_labels}
    targeting = {g for g, t in target_of.items() if str(t).lower() not in controls}
    out = []
    for cell in identity:
        hits = [g for g in str(cell).split(";") if g in targeting]
        out.append(hits[0] if len(hits) == 1 else "")
    return np.asarray(out, dtype=object)


def check_guides(guides: pd.DataFrame, control_labels: Sequence[str]) -> None:
    """A guide table the labels can come from: unique guide names, and a control label that is some guide's target."""
    duplicated = guides["guide"][guides["guide"].duplicated()].tolist()
    if duplicated:
        raise GuideInputError(f"Guide names must be unique; repeated: {duplicated[:5]}.")
    lowered = {t.lower() for t in guides["target"]}
    if not any(c.lower() in lowered for c in control_labels):
        raise GuideInputError(
            f"No guide targets a control label {list(control_labels)} (schema.control_labels); the targets are "
            f"{sorted(set(guides['target']))[:12]}{' ...' if guides['target'].nunique() > 12 else ''}. Set "
            "schema.control_labels to the target name of the non-targeting guides (e.g. [Non-Targeting])."
        )


# ---------------------------------------------------------------------------------------------- knockdown
def knockdown_table(
    adata: ad.AnnData,
    counts: sp.csr_matrix,
    guide_of_cell: np.ndarray,
    target_of_guide: Mapping[str, str],
    is_control: np.ndarray,
    modality: str = "CRISPRi",
    alpha: float = 0.05,
    max_remaining: float = 0.7,
    min_fold_up: float = 1.5,
    min_cells: int = 10,
    min_detection: float = 0.02,
) -> pd.DataFrame:
    """Per guide: its own target's expression in its cells versus the controls.

    Expression is counts per 10,000 (``counts``: raw, cells x genes of ``adata.var_names``). Columns:
    ``guide``, ``target``, ``n_cells``, ``mean_guide``, ``mean_control``, ``remaining`` (the fraction of the
    controls' mean left), ``log2_fold_change``, ``p_value`` (one-sided Mann-Whitney U in the modality's
    direction), ``q_value`` (Benjamini-Hochberg over the measurable guides) and ``call``: ``knocked_down``
    (CRISPRi/ko: q < ``alpha`` and remaining < ``max_remaining``; CRISPRa, ``activated``: q < ``alpha`` and a
    fold change above ``min_fold_up``), ``no knockdown`` / ``no activation``, or ``not measurable`` (the target
    is not in the panel, is detected in fewer than ``min_detection`` of the controls, or the guide has fewer
    than ``min_cells`` cells).
    """
    from statsmodels.stats.multitest import multipletests

    direction = MODALITIES.get(modality)
    if direction is None:
        raise ValueError(f"schema.modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    counts = sp.csr_matrix(counts)
    library = np.asarray(counts.sum(axis=1)).ravel()
    scale = 1e4 / np.maximum(library, 1.0)
    genes = {str(g): j for j, g in enumerate(adata.var_names)}
    csc = sp.csc_matrix(counts)
    rows = []
    for guide in sorted(set(guide_of_cell[~is_control]) - {""}):
        target = str(target_of_guide.get(guide, ""))
        members = guide_of_cell == guide
        row = {"guide": guide, "target": target, "n_cells": int(members.sum())}
        column = genes.get(target)
        if column is None:
            rows.append({**row, "call": "not measurable", "reason": "target not in the panel"})
            continue
        dense = np.zeros(counts.shape[0])
        start, stop = csc.indptr[column], csc.indptr[column + 1]
        dense[csc.indices[start:stop]] = csc.data[start:stop]
        expression = dense * scale
        control_detected = float((dense[is_control] > 0).mean()) if is_control.any() else 0.0
        if control_detected < min_detection or members.sum() < min_cells:
            reason = "too few cells" if members.sum() < min_cells else "target rarely detected in the controls"
            rows.append({**row, "call": "not measurable", "reason": reason})
            continue
        mine, theirs = expression[members], expression[is_control]
        mean_mine, mean_theirs = float(mine.mean()), float(theirs.mean())
        alternative = "less" if direction == "down" else "greater"
        p = float(stats.mannwhitneyu(mine, theirs, alternative=alternative).pvalue)
        rows.append(
            {
                **row,
                "mean_guide": mean_mine,
                "mean_control": mean_theirs,
                "remaining": mean_mine / mean_theirs,
                "log2_fold_change": float(np.log2((mean_mine + 1e-3) / (mean_theirs + 1e-3))),
                "p_value": p,
                "reason": "",
            }
        )
    table = pd.DataFrame(rows)
    columns = [
        "guide", "target", "n_cells", "mean_guide", "mean_control", "remaining", "log2_fold_change", "p_value",
        "q_value", "call", "reason",
    ]  # fmt: skip
    if table.empty:
        return pd.DataFrame(columns=columns)
    table = table.reindex(columns=columns)
    table["call"] = table["call"].astype(object)
    measurable = table["p_value"].notna()
    if measurable.any():
        table.loc[measurable, "q_value"] = multipletests(table.loc[measurable, "p_value"], method="fdr_bh")[1]
        if direction == "down":
            works = (table["q_value"] < alpha) & (table["remaining"] < max_remaining)
            table.loc[measurable, "call"] = np.where(works[measurable], "knocked_down", "no knockdown")
        else:
            works = (table["q_value"] < alpha) & (table["remaining"] > min_fold_up)
            table.loc[measurable, "call"] = np.where(works[measurable], "activated", "no activation")
    return table.sort_values(["target", "guide"]).reset_index(drop=True)
