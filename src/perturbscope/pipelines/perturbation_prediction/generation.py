"""The cVAE's predicted cells (Mode A and Mode B) for the test perturbations of a split."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.models.cvae import ConditionalVAE
from perturbscope.models.model.cvae import CVAE, scale_factors
from perturbscope.models.model.inputs import raw_counts
from perturbscope.schema import IS_CONTROL, PERTURBATION, PERTURBED_GENES

from .evaluation import CVAE_METHODS
from .splits import SplitError, perturbations_with_test_cells, training_mask

__all__ = ["cvae_cells", "generation_settings", "no_predictions"]

_MODE_TO_METHOD = {"prior": "cvae_prior", "controls": "cvae_controls"}


def generation_settings(n_cells: int = 200, sample: bool = True) -> dict[str, Any]:
    """The prediction settings of every method (``perturbation_prediction.generation``): ``n_cells`` predicted
    cells per test perturbation and method; ``sample``: ``X`` holds draws (Gaussian noise / NB counts) and
    ``layers["expected"]`` each cell's expectation (for the NB, exact: no Monte-Carlo draws)."""
    return {"n_cells": int(n_cells), "sample": bool(sample)}


def no_predictions(adata: ad.AnnData) -> ad.AnnData:
    """An empty prediction table (no cells, the screen's genes) for a split with nothing to predict."""
    empty = sp.csr_matrix((0, adata.n_vars), dtype=np.float32)
    obs = pd.DataFrame(
        {"method": pd.Categorical([]), PERTURBATION: pd.Categorical([]), "source_cell": np.zeros(0, np.int64)},
        index=pd.Index([], dtype=str),
    )
    out = ad.AnnData(X=empty, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
    out.layers["expected"] = empty.copy()
    return out


def cvae_cells(
    model: ConditionalVAE, adata: ad.AnnData, split: pd.DataFrame, seed: int, n_cells: int, sample: bool
) -> ad.AnnData:
    """Mode A and Mode B cells of every test perturbation (:func:`~.nodes.predict_cvae`)."""
    labels = perturbations_with_test_cells(split)
    if not labels:
        return no_predictions(adata)
    genes_of = split.groupby(PERTURBATION)[PERTURBED_GENES].first()
    unknown = [p for p in labels if not model.can_predict(genes_of[p])]
    if unknown:
        raise SplitError(f"the model cannot predict {unknown}: they perturb genes no training cell perturbs")
    api = CVAE(model)
    draws = {"sample": sample}
    train = training_mask(split)
    source = split[IS_CONTROL].to_numpy() & train
    lib = scales = None
    if model.likelihood == "nb":
        counts = raw_counts(adata, hint="The NB cVAE draws counts with real cells' library sizes.")
        lib, scales = np.asarray(counts[train].sum(axis=1)).reshape(-1), scale_factors(adata)
    genes = [genes_of[p] for p in labels]
    prior = api.sample_prior(
        genes, n_cells, library=lib, scale=None if scales is None else scales[train], seed=seed, **draws
    )
    prior.obs["source_cell"] = -1
    transfer = api.transfer_controls(
        api.cell_data(adata[source].copy()),
        None,
        genes,
        n_cells,
        scale=None if scales is None else scales[source],
        seed=seed + 1,
        **draws,
    )
    transfer.obs["source_cell"] = np.flatnonzero(source)[transfer.obs["source_cell"].to_numpy()]
    out = ad.concat([prior, transfer], index_unique=None)
    back = dict(zip(genes, labels))
    out.obs[PERTURBATION] = pd.Categorical(out.obs[PERTURBATION].astype(str).map(back), categories=labels)
    out.obs["method"] = pd.Categorical(out.obs["mode"].astype(str).map(_MODE_TO_METHOD), categories=list(CVAE_METHODS))
    out.obs = out.obs[["method", PERTURBATION, "source_cell"]]
    out.obs_names = [f"cvae_{i}" for i in range(out.n_obs)]
    out.var_names = adata.var_names.copy()
    return out
