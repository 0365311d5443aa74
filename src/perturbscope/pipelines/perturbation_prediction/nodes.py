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

from perturbscope.models.cvae import ConditionalVAE
from perturbscope.models.model.cvae import CVAE
from perturbscope.parameters import conf_errors, options, training_settings
from perturbscope.schema import IS_CONTROL, PERTURBATION, PERTURBED_GENES, ScreenSchema

from . import evaluation, figures, generation
from .baselines import baseline_cells
from .evaluation import ID_COLUMNS
from .generation import generation_settings
from .splits import (
    as_split,
    assert_no_leakage,
    is_applicable,
    make_split,
    not_applicable_reason,
    perturbations_with_test_cells,
    training_mask,
)

logger = logging.getLogger(__name__)

SECTION = "perturbation_prediction"


# ----------------------------------------------------------------------------- helpers
def _separator(schema: dict[str, Any]) -> str:
    return ScreenSchema.from_params(schema).double_separator


# ------------------------------------------------------------------------------- nodes
def make_prediction_split(
    adata: ad.AnnData, split_params: dict[str, Any], schema: dict[str, Any] | None = None, seed: int = 0
) -> pd.DataFrame:
    """One split of the screen's cells into train / validation / test (see :mod:`.splits`).

    Returns the split table with a ``cell`` column (one row per cell).
    """
    with conf_errors(f"{SECTION}.splits"):
        split = make_split(
            adata.obs,
            _separator(schema),
            seed,
            **options(make_split, split_params, f"{SECTION}.splits.<split>", exclude={"obs", "separator", "seed"}),
        )
    kind = str(split["kind"].iloc[0]) if len(split) else ""
    reason = not_applicable_reason(split)
    if reason:
        logger.warning("Split %s is not applicable and is skipped: %s.", kind, reason)
    counts = split.groupby("role", observed=False).size().to_dict()
    logger.info(
        "Split %s: %s; %d test perturbation(s).",
        kind,
        counts,
        len(perturbations_with_test_cells(split)),
    )
    return split.reset_index()


def fit_expression_pca(adata: ad.AnnData, n_pcs: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The shared PCA space: scanpy PCA of the whole processed screen's log-normalised ``X``.

    Fitted on the true cells only (never on predictions), so every method's cells are
    projected into the same space. Returns ``mean`` ``(G,)`` and ``components`` ``(n_pcs, G)``.
    """
    return evaluation.fit_expression_pca(adata, int(n_pcs), seed)


def train_cvae(
    adata: ad.AnnData,
    split: pd.DataFrame,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    shared_training: dict[str, Any],
    schema: dict[str, Any],
    seed: int = 0,
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
    with conf_errors(SECTION, shared_training=shared_training, own_training=training_params):
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
                training_settings(shared_training, training_params),
                separator=sep,
                seed=seed,
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
    settings = generation_settings(**options(generation_settings, params, f"{SECTION}.generation"))
    return generation.cvae_cells(model, adata, split, seed, **settings)


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
        return generation.no_predictions(adata)
    n_cells = generation_settings(**options(generation_settings, params, f"{SECTION}.generation"))["n_cells"]
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
    settings = options(
        evaluation.score_split,
        params,
        f"{SECTION}.evaluation",
        exclude={"adata", "split", "cvae_predictions", "baseline_predictions", "pca", "seed"},
    )
    return evaluation.score_split(adata, split, cvae_predictions, baseline_predictions, pca, seed, **settings)


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
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The three-panel figure for the test perturbations of a split (see :mod:`.figures`).

    At most ``max_figures`` perturbations (the largest true effects) get a figure. Returns
    ``({"<file>.png": Figure}, index)``: file names are the labels where they are safe file names, else a
    slug and a short hash (:func:`perturbscope.names.file_names`), and ``index`` maps each ``file`` to its
    ``perturbation``. A split without test cells gets one figure saying why (``not_applicable.png``).
    """
    split = as_split(split, adata)
    reason = not_applicable_reason(split)
    if reason:  # one figure saying why, so the run's figure folder is never empty
        kind = str(split["kind"].iloc[0]) if len(split) else "this split"
        drawn = {"not_applicable.png": figures.message_figure(f"{kind}: not applicable", reason)}
        return drawn, pd.DataFrame({"file": ["not_applicable.png"], PERTURBATION: [""]})
    settings = options(
        figures.perturbation_figures,
        params,
        f"{SECTION}.figures",
        exclude={"adata", "split", "cvae_predictions", "baseline_predictions", "metrics", "pca", "seed"},
    )
    return figures.perturbation_figures(
        adata, split, cvae_predictions, baseline_predictions, metrics, pca, seed, **settings
    )


def plot_summary(summary: pd.DataFrame, metrics: pd.DataFrame, summary_scores: list[str]) -> Any:
    """The summary panel across methods (see :func:`.figures.summary_figure`)."""
    return figures.summary_figure(metrics, summary_scores)


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
    "generation_settings",
]
