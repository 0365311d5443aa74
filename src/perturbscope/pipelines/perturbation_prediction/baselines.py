"""Baseline predictions for the test perturbations of a split.

Every baseline is a predicted *mean* (log-normalised scale) computed from
training cells only (roles ``train`` and ``validation``: never test cells,
never the reference controls of the evaluation):

``no_change``
    The mean ``c`` of the training control cells (the perturbation does nothing).
``perturbed_mean``
    The mean ``m`` of all training perturbed cells.
``same_perturbation``
    The training mean of the same perturbation (held-out cells split only:
    a held-out perturbation has no training cells).
``additive``
    For a combination ``A+B(+...)`` whose genes all have a single
    perturbation with training cells: ``c + Σ_g (μ_g - c)``, i.e.
    ``c + ΔA + ΔB`` for a double.

So that distribution-level scores (energy distance, PCA panels) can be
computed the same way for every method, each baseline also comes as cells:
a seeded sample of its source cells (training controls for ``no_change`` and
``additive``, training perturbed cells for ``perturbed_mean``, the
perturbation's training cells for ``same_perturbation``) recentred so that
their mean is exactly the baseline's mean.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.schema import IS_CONTROL, PERTURBATION, PERTURBED_GENES

from .splits import training_mask

__all__ = ["BASELINES", "column_mean", "baseline_means", "baseline_cells"]

BASELINES: tuple[str, ...] = ("no_change", "perturbed_mean", "same_perturbation", "additive")


def column_mean(x, rows: np.ndarray) -> np.ndarray:
    """Mean of the selected rows of a dense or sparse matrix, float64 ``(G,)``."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    if rows.size == 0:
        raise ValueError("column_mean: no rows selected")
    sub = x[rows]
    return np.asarray(sub.mean(axis=0), dtype=np.float64).reshape(-1)


def _dense_rows(x, rows: np.ndarray) -> np.ndarray:
    sub = x[rows]
    return (sub.toarray() if sp.issparse(sub) else np.asarray(sub)).astype(np.float64)


def baseline_means(
    adata: ad.AnnData, split: pd.DataFrame, separator: str = "+"
) -> tuple[dict[tuple[str, str], np.ndarray], dict[tuple[str, str], np.ndarray]]:
    """Predicted means (and the rows of their source cells) of every baseline and test perturbation.

    Returns
    -------
    (means, sources)
        ``means[(method, perturbation)]`` is the predicted mean ``(G,)``;
        ``sources[(method, perturbation)]`` the positions of the cells the
        baseline's predicted cells are drawn from.
    """
    if list(split.index) != list(adata.obs_names.astype(str)):
        split = split.reindex(adata.obs_names.astype(str))
    x = adata.X
    labels = split[PERTURBATION].astype(str).to_numpy()
    genes = split[PERTURBED_GENES].astype(str).to_numpy()
    is_control = split[IS_CONTROL].astype(bool).to_numpy()
    train = training_mask(split)
    test = split["role"].astype(str).to_numpy() == "test"
    evaluation = split["evaluation"].astype(str).to_numpy()

    controls = np.flatnonzero(is_control & train)
    perturbed_train = np.flatnonzero(train & ~is_control)
    c = column_mean(x, controls)
    m = column_mean(x, perturbed_train)
    single_rows: dict[str, np.ndarray] = {}
    for gene in sorted(set(genes[train & ~is_control])):
        if gene and separator not in gene:
            single_rows[gene] = np.flatnonzero(train & (genes == gene))
    single_delta = {g: column_mean(x, rows) - c for g, rows in single_rows.items()}

    means: dict[tuple[str, str], np.ndarray] = {}
    sources: dict[tuple[str, str], np.ndarray] = {}
    for label in sorted(set(labels[test])):
        members = labels == label
        kind = evaluation[test & members][0]
        means[("no_change", label)], sources[("no_change", label)] = c, controls
        means[("perturbed_mean", label)], sources[("perturbed_mean", label)] = m, perturbed_train
        own = np.flatnonzero(train & members)
        if kind == "held_out_cells" and own.size:
            means[("same_perturbation", label)] = column_mean(x, own)
            sources[("same_perturbation", label)] = own
        parts = [p for p in genes[members][0].split(separator) if p]
        if len(parts) >= 2 and all(p in single_delta for p in parts):
            means[("additive", label)] = c + np.sum([single_delta[p] for p in parts], axis=0)
            sources[("additive", label)] = controls
    return means, sources


def baseline_cells(
    adata: ad.AnnData, split: pd.DataFrame, n_cells: int = 200, seed: int = 0, separator: str = "+"
) -> ad.AnnData:
    """The baselines' predicted cells for every test perturbation of ``split``.

    For each (baseline, perturbation): ``min(n_cells, n_source)`` source
    cells drawn without replacement, recentred on the baseline's mean.

    Returns
    -------
    anndata.AnnData
        Dense log-normalised ``X``; ``obs``: ``method``, ``perturbation``,
        ``source_cell`` (position of the source cell in the screen).
    """
    means, sources = baseline_means(adata, split, separator)
    rng = np.random.default_rng(seed)
    blocks, methods, labels, origin = [], [], [], []
    for method in BASELINES:
        for (meth, label), mean in means.items():
            if meth != method:
                continue
            src = sources[(meth, label)]
            pick = np.sort(rng.choice(src, size=min(int(n_cells), src.size), replace=False))
            cells = _dense_rows(adata.X, pick)
            cells = cells - cells.mean(axis=0, keepdims=True) + mean[None, :]
            blocks.append(cells.astype(np.float32))
            methods += [method] * pick.size
            labels += [label] * pick.size
            origin.append(pick)
    x = np.concatenate(blocks) if blocks else np.zeros((0, adata.n_vars), dtype=np.float32)
    obs = pd.DataFrame(
        {
            "method": pd.Categorical(methods, categories=list(BASELINES)),
            PERTURBATION: pd.Categorical(labels),
            "source_cell": np.concatenate(origin) if origin else np.zeros(0, dtype=np.int64),
        }
    )
    obs.index = [f"baseline_{i}" for i in range(len(obs))]
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
