"""Nodes of the perturbation_prediction pipeline.

Thin and pure (AnnData inputs are never modified): the model work is
:class:`perturbscope.models.model.CVAE`, the splits :mod:`.splits`, the baselines
:mod:`.baselines`, the scores :mod:`.evaluation`, the figures :mod:`.figures`. Knobs come
from ``conf/base/parameters_perturbation_prediction.yml`` (and the shared ``training`` block
and ``seed``). The pipeline runs once per split (Kedro namespaces ``held_out_cells`` and
``held_out_perturbations``), then merges the two metric tables.
"""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.models.cvae import ConditionalVAE
from perturbscope.models.model.cvae import CVAE, scale_factors
from perturbscope.models.model.inputs import raw_counts
from perturbscope.schema import IS_CONTROL, PERTURBATION, PERTURBED_GENES, ScreenSchema

from . import evaluation, figures
from .baselines import baseline_cells
from .evaluation import CVAE_METHODS, ID_COLUMNS
from .splits import (
    SplitError,
    as_split,
    assert_no_leakage,
    is_applicable,
    make_split,
    not_applicable_reason,
    perturbations_with_test_cells,
    training_mask,
)

logger = logging.getLogger(__name__)

_MODE_TO_METHOD = {"prior": "cvae_prior", "controls": "cvae_controls"}


# ----------------------------------------------------------------------------- helpers
def _separator(schema: dict[str, Any] | None) -> str:
    return ScreenSchema.from_params(schema or {}).double_separator or "+"


def _no_predictions(adata: ad.AnnData) -> ad.AnnData:
    """An empty prediction table (no cells, the screen's genes) for a split with nothing to predict."""
    empty = sp.csr_matrix((0, adata.n_vars), dtype=np.float32)
    obs = pd.DataFrame(
        {"method": pd.Categorical([]), PERTURBATION: pd.Categorical([]), "source_cell": np.zeros(0, np.int64)},
        index=pd.Index([], dtype=str),
    )
    out = ad.AnnData(X=empty, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
    out.layers["expected"] = empty.copy()
    return out


# ------------------------------------------------------------------------------- nodes
def make_prediction_split(
    adata: ad.AnnData, split_params: dict[str, Any], schema: dict[str, Any] | None = None, seed: int = 0
) -> pd.DataFrame:
    """One split of the screen's cells into train / validation / test (see :mod:`.splits`).

    Returns the split table with a ``cell`` column (one row per cell).
    """
    split = make_split(adata.obs, {**split_params, "seed": seed}, _separator(schema))
    reason = not_applicable_reason(split)
    if reason:
        logger.warning("Split %s is not applicable and is skipped: %s.", split_params.get("kind"), reason)
    counts = split.groupby("role", observed=False).size().to_dict()
    logger.info(
        "Split %s: %s; %d test perturbation(s).",
        split_params.get("kind"),
        counts,
        len(perturbations_with_test_cells(split)),
    )
    return split.reset_index()


def fit_expression_pca(adata: ad.AnnData, params: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """The shared PCA space: scanpy PCA of the whole processed screen's log-normalised ``X``.

    Fitted on the true cells only (never on predictions), so every method's cells are
    projected into the same space. Returns ``mean`` ``(G,)`` and ``components`` ``(n_pcs, G)``.
    """
    return evaluation.fit_expression_pca(adata, int(params.get("n_pcs", 20)), seed)


def train_cvae(
    adata: ad.AnnData,
    split: pd.DataFrame,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    schema: dict[str, Any] | None = None,
    seed: int = 0,
    shared_training: dict[str, Any] | None = None,
) -> tuple[ConditionalVAE, pd.DataFrame]:
    """Train the conditional VAE on the split's training cells only (see :meth:`CVAE.fit`).

    The model is handed a copy of the screen restricted to cells with role ``train`` /
    ``validation`` (validation cells drive early stopping); this is asserted with
    :func:`~.splits.assert_no_leakage` before training. A split without test cells gives
    an untrained model whose ``metadata["not_applicable"]`` says why.

    Returns the model (vocabulary, genes and training perturbations in ``metadata``) and
    the per-epoch history.
    """
    split = as_split(split, adata)
    mask = training_mask(split)
    train_cells = adata[mask].copy()
    assert_no_leakage(split, train_cells.obs_names)
    sep = _separator(schema)
    targets = train_cells.obs[PERTURBED_GENES].astype(str)[~split[IS_CONTROL].to_numpy()[mask]]
    vocab = sorted({g for genes in targets for g in genes.split(sep) if g})
    reason = not_applicable_reason(split)
    if reason:  # nothing is held out, so nothing to predict: the (untrained) model only records why
        logger.info("No test cells in this split: the cVAE is not trained.")
        api = CVAE.from_vocabulary(vocab, adata.var_names, sep, seed=seed, **dict(model_params or {}))
        api.history = pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "best"])
    else:
        api = CVAE.fit(
            train_cells,
            split["role"].to_numpy()[mask] == "validation",
            vocab,
            model_params,
            training_params,
            shared_training=shared_training,
            separator=sep,
            seed=seed,
            error=SplitError,
            extra_obs={"screen_row": np.flatnonzero(mask)},
        )
    kinds = split.loc[split["role"] == "test", "evaluation"]
    api.metadata.update(
        split_kind=str(kinds.iloc[0]) if len(kinds) else "",
        train_perturbations=sorted(set(train_cells.obs[PERTURBATION].astype(str))),
        held_out_perturbations=sorted(set(split.loc[split["evaluation"] == "held_out_perturbations", PERTURBATION])),
        n_training_cells=int(mask.sum()),
        **({"not_applicable": reason} if reason else {}),
    )
    return api.module, api.history


def predict_cvae(
    model: ConditionalVAE, adata: ad.AnnData, split: pd.DataFrame, params: dict[str, Any], seed: int = 0
) -> ad.AnnData:
    """Mode A and Mode B predicted cells for every test perturbation of the split.

    Mode B encodes the split's training control cells (never the reference controls of
    the evaluation). For an NB model, Mode A draws library sizes and normalisation scale
    factors from the training cells, Mode B uses each control cell's own.

    Returns log-normalised predicted cells (``X``: draws; ``layers["expected"]``: each
    cell's ``E[x | z, c]``); ``obs``: ``method`` (``cvae_prior`` / ``cvae_controls``),
    ``perturbation``, ``source_cell`` (row of the control cell in the screen for Mode B,
    -1 for Mode A).
    """
    split = as_split(split, adata)
    labels = perturbations_with_test_cells(split)
    if not labels:
        return _no_predictions(adata)
    genes_of = split.groupby(PERTURBATION)[PERTURBED_GENES].first()
    unknown = [p for p in labels if not model.can_predict(genes_of[p])]
    if unknown:
        raise SplitError(f"the model cannot predict {unknown}: they perturb genes no training cell perturbs")
    api = CVAE(model)
    n_cells = int(params.get("n_cells", 200))
    draws = {"sample": bool(params.get("sample", True)), "n_mc": int(params.get("n_mc", 16))}
    train = training_mask(split)
    source = split[IS_CONTROL].to_numpy() & train
    lib = scales = None
    if model.likelihood == "nb":
        counts = raw_counts(adata, error=SplitError, hint="The NB cVAE draws counts with real cells' library sizes.")
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


def predict_baselines(
    adata: ad.AnnData,
    split: pd.DataFrame,
    params: dict[str, Any],
    schema: dict[str, Any] | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """The baselines' predicted cells for the split's test perturbations (see :mod:`.baselines`)."""
    split = as_split(split, adata)
    if not is_applicable(split):
        return _no_predictions(adata)
    n_cells = int(params.get("n_cells", 200))
    return baseline_cells(adata, split, n_cells=n_cells, seed=seed, separator=_separator(schema))


def evaluate_predictions(
    adata: ad.AnnData,
    split: pd.DataFrame,
    cvae_predictions: ad.AnnData,
    baseline_predictions: ad.AnnData,
    pca: dict[str, np.ndarray],
    params: dict[str, Any],
    seed: int = 0,
) -> pd.DataFrame:
    """Score every method on every test perturbation of the split (:func:`.evaluation.score_split`).

    One row per (perturbation, method): ``evaluation``, ``perturbation``,
    ``n_perturbed_genes``, ``method``, ``n_true_cells``, ``n_predicted_cells`` and the
    score columns.
    """
    split = as_split(split, adata)
    return evaluation.score_split(adata, split, cvae_predictions, baseline_predictions, pca, params, seed)


def summarise_metrics(**tables: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Merge the per-split metric tables (keyword: split name) and summarise them (:func:`.evaluation.summarise`).

    Returns the method x perturbation table of every split, the summary (mean ± sd per
    split and method, a ``not applicable`` row with its ``reason`` for a split without
    test cells) and the summary means as MLflow metrics ``<split>.<method>.<score>``.
    """
    return evaluation.summarise(tables)


def plot_perturbations(
    adata: ad.AnnData,
    split: pd.DataFrame,
    cvae_predictions: ad.AnnData,
    baseline_predictions: ad.AnnData,
    metrics: pd.DataFrame,
    pca: dict[str, np.ndarray],
    params: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """The three-panel figure for the test perturbations of a split (see :mod:`.figures`).

    At most ``max_figures`` perturbations (the largest true effects) get a figure;
    returns ``{"<perturbation>.png": Figure}`` (``{"not_applicable.png": ...}``, saying
    why, for a split without test cells).
    """
    split = as_split(split, adata)
    reason = not_applicable_reason(split)
    if reason:  # one figure saying why, so the run's figure folder is never empty
        kind = str(split["kind"].iloc[0]) if len(split) else "this split"
        return {"not_applicable.png": figures.message_figure(f"{kind}: not applicable", reason)}
    return figures.perturbation_figures(
        adata, split, cvae_predictions, baseline_predictions, metrics, pca, params, seed=seed
    )


def plot_summary(summary: pd.DataFrame, metrics: pd.DataFrame, params: dict[str, Any]) -> Any:
    """The summary panel across methods (see :func:`.figures.summary_figure`)."""
    return figures.summary_figure(metrics, params)


__all__ = [
    "ID_COLUMNS",
    "as_split",
    "evaluate_predictions",
    "fit_expression_pca",
    "make_prediction_split",
    "plot_perturbations",
    "plot_summary",
    "predict_baselines",
    "predict_cvae",
    "summarise_metrics",
    "train_cvae",
]
