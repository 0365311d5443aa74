"""Nodes of the perturbation_prediction pipeline.

Every node is a pure function of its inputs (AnnData inputs are never
modified) and takes its knobs from ``conf/base/parameters_perturbation_prediction.yml``.
The pipeline runs once per split (Kedro namespaces ``held_out_cells`` and
``held_out_perturbations``), then merges the two metric tables.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from perturbscope.models.cvae import ConditionalVAE, scale_factors
from perturbscope.models.data import MinibatchSampler
from perturbscope.models.training import fit, seeded
from perturbscope.pipelines._model_inputs import raw_counts, train_config

from . import figures
from .baselines import BASELINES, baseline_cells
from .metrics import METRIC_COLUMNS, score_perturbation
from .splits import (
    NOT_APPLICABLE,
    SplitError,
    assert_no_leakage,
    is_applicable,
    make_split,
    not_applicable_reason,
    perturbations_with_test_cells,
    reference_mask,
    training_mask,
)

logger = logging.getLogger(__name__)

CVAE_METHODS = ("cvae_prior", "cvae_controls")
"""Mode A (``z`` from the prior) and Mode B (encoded control cells)."""
METHODS = CVAE_METHODS + BASELINES
_MODE_TO_METHOD = {"prior": "cvae_prior", "controls": "cvae_controls"}


# ----------------------------------------------------------------------------- helpers
def _separator(schema: dict[str, Any] | None) -> str:
    return str((schema or {}).get("double_separator") or "+")


def as_split(split: pd.DataFrame, adata: ad.AnnData | None = None) -> pd.DataFrame:
    """Normalise a split table (also after a CSV round trip) and align it to ``adata``'s cells."""
    out = split.copy()
    if "cell" in out.columns:
        out = out.set_index("cell")
    out.index = pd.Index(out.index.astype(str), name="cell")
    out["perturbation"] = out["perturbation"].astype(str)
    out["perturbed_genes"] = out["perturbed_genes"].fillna("").astype(str)
    out["is_control"] = out["is_control"].astype(str).str.lower().isin(["true", "1"])
    out["evaluation"] = out["evaluation"].fillna("").astype(str)
    out["role"] = out["role"].astype(str)
    if adata is not None:
        names = adata.obs_names.astype(str)
        missing = names.difference(out.index)
        if len(missing):
            raise SplitError(
                f"{len(missing)} cell(s) of the screen are not in the split (e.g. {list(missing[:3])}); "
                "the split was made for another version of the processed screen: rerun the pipeline"
            )
        out = out.loc[names]
        out.index.name = "cell"
    return out


def _dense(x: Any) -> np.ndarray:
    return (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float64)


def _mean(x: Any) -> np.ndarray:
    return np.asarray(x.mean(axis=0), dtype=np.float64).reshape(-1)


def project(pca: dict[str, np.ndarray], x: Any) -> np.ndarray:
    """Cells ``(n, G)`` in the shared PCA space ``(n, n_pcs)``."""
    return (_dense(x) - pca["mean"][None, :]) @ pca["components"].T


_ID_COLUMNS = ("evaluation", "perturbation", "n_perturbed_genes", "method", "n_true_cells", "n_predicted_cells")
"""The identifying columns of a metrics table (the score columns follow)."""


def _no_predictions(adata: ad.AnnData) -> ad.AnnData:
    """An empty prediction table (no cells, the screen's genes) for a split with nothing to predict."""
    empty = sp.csr_matrix((0, adata.n_vars), dtype=np.float32)
    obs = pd.DataFrame(
        {"method": pd.Categorical([]), "perturbation": pd.Categorical([]), "source_cell": np.zeros(0, np.int64)},
        index=pd.Index([], dtype=str),
    )
    out = ad.AnnData(X=empty, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
    out.layers["expected"] = empty.copy()
    return out


# ------------------------------------------------------------------------------- nodes
def make_prediction_split(
    adata: ad.AnnData, split_params: dict[str, Any], schema: dict[str, Any] | None = None
) -> pd.DataFrame:
    """One split of the screen's cells into train / validation / test (see :mod:`.splits`).

    Returns the split table with a ``cell`` column (one row per cell).
    """
    split = make_split(adata.obs, split_params, _separator(schema))
    reason = not_applicable_reason(split)
    if reason:
        logger.warning("Split %s is not applicable and is skipped: %s.", split_params.get("kind"), reason)
    counts = split.groupby("role", observed=False).size().to_dict()
    logger.info(
        "Split %s: %s; %d test perturbation(s).",
        split_params.get("kind"), counts, len(perturbations_with_test_cells(split)),
    )
    return split.reset_index()


def fit_expression_pca(adata: ad.AnnData, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """The shared PCA space: scanpy PCA of the whole processed screen's log-normalised ``X``.

    Fitted on the true cells only (never on predictions), so every method's
    cells are projected into the same space. Returns ``mean`` ``(G,)`` and
    ``components`` ``(n_pcs, G)``.
    """
    n_pcs = int(min(params.get("n_pcs", 20), adata.n_vars - 1, adata.n_obs - 1))
    if n_pcs < 1:
        raise ValueError("the screen is too small for a PCA (needs at least 2 cells and 2 genes)")
    view = ad.AnnData(X=adata.X.astype(np.float32), var=pd.DataFrame(index=adata.var_names.copy()))
    sc.pp.pca(view, n_comps=n_pcs, zero_center=True, random_state=int(params.get("seed", 0)))
    return {"mean": _mean(adata.X), "components": np.asarray(view.varm["PCs"].T, dtype=np.float64)}


def train_cvae(
    adata: ad.AnnData,
    split: pd.DataFrame,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    schema: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[ConditionalVAE, pd.DataFrame]:
    """Train the conditional VAE on the split's training cells only.

    The model is handed a copy of the screen restricted to cells with role
    ``train`` / ``validation`` (validation cells drive early stopping); this
    is asserted with :func:`~.splits.assert_no_leakage` before training.

    Returns
    -------
    (model, history)
        The trained model (vocabulary, genes and training perturbations in
        ``model.metadata``) and the per-epoch history table.
    """
    split = as_split(split, adata)
    mask = training_mask(split)
    train_cells = adata[mask].copy()
    assert_no_leakage(split, train_cells.obs_names)
    roles = split["role"].to_numpy()[mask]
    sep = _separator(schema)
    targets = train_cells.obs["perturbed_genes"].astype(str)[~split["is_control"].to_numpy()[mask]]
    vocab = sorted({g for genes in targets for g in genes.split(sep) if g})

    config, batch_size, val_batch_size = train_config(
        training_params, seed, "perturbation_prediction.training", SplitError
    )
    with seeded(config.seed):
        model = ConditionalVAE.from_vocabulary(vocab, list(adata.var_names), sep, **model_params)
    held = sorted(set(split.loc[split["evaluation"] == "held_out_perturbations", "perturbation"]))
    kinds = split.loc[split["role"] == "test", "evaluation"]
    model.metadata.update(
        split_kind=str(kinds.iloc[0]) if len(kinds) else "",
        train_perturbations=sorted(set(train_cells.obs["perturbation"].astype(str))),
        held_out_perturbations=held,
        n_training_cells=int(mask.sum()),
    )
    reason = not_applicable_reason(split)
    if reason:
        # nothing is held out, so nothing to predict: the (untrained) model only records why
        model.metadata["not_applicable"] = reason
        logger.info("No test cells in this split: the cVAE is not trained.")
        return model, pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "best_epoch"])
    data = model.make_cell_data(train_cells, extra_obs={"screen_row": np.flatnonzero(mask)})
    train_sampler = MinibatchSampler(data, roles == "train", batch_size=batch_size, shuffle=True, seed=config.seed)
    val_sampler = (
        MinibatchSampler(data, roles == "validation", batch_size=val_batch_size, shuffle=False)
        if (roles == "validation").any()
        else None
    )
    logger.info(
        "Training ConditionalVAE (%s likelihood) on %d cells (%d validation), %d perturbed genes.",
        model.likelihood, int((roles == "train").sum()), int((roles == "validation").sum()), len(vocab),
    )
    history = fit(model, train_sampler, val_sampler, config, settings="perturbation_prediction")
    model.cpu()
    frame = history.to_frame()
    frame["best_epoch"] = history.best_epoch if history.best_epoch is not None else -1
    return model, frame


def predict_cvae(
    model: ConditionalVAE, adata: ad.AnnData, split: pd.DataFrame, params: dict[str, Any]
) -> ad.AnnData:
    """Mode A and Mode B predicted cells for every test perturbation of the split.

    Mode B encodes the split's training control cells (never the reference
    controls of the evaluation). For an NB model, Mode A draws library sizes
    and normalisation scale factors from the training cells, Mode B uses
    each control cell's own.

    Returns
    -------
    anndata.AnnData
        Log-normalised predicted cells (``X``: draws; ``layers["expected"]``:
        each cell's ``E[x | z, c]``); ``obs``: ``method`` (``cvae_prior`` /
        ``cvae_controls``), ``perturbation``, ``source_cell`` (row of the
        control cell in the screen for Mode B, -1 for Mode A).
    """
    split = as_split(split, adata)
    labels = perturbations_with_test_cells(split)
    if not labels:
        return _no_predictions(adata)
    genes_of = split.groupby("perturbation")["perturbed_genes"].first()
    unknown = [p for p in labels if not model.can_predict(genes_of[p])]
    if unknown:
        raise SplitError(
            f"the model cannot predict {unknown}: they perturb genes no training cell perturbs"
        )
    n_cells = int(params.get("n_cells", 200))
    seed = int(params.get("seed", 0))
    sample = bool(params.get("sample", True))
    n_mc = int(params.get("n_mc", 16))
    train = training_mask(split)
    source = split["is_control"].to_numpy() & train
    controls = adata[source].copy()
    lib = sc_ = None
    scale_ctrl = None
    if model.likelihood == "nb":
        counts = raw_counts(adata, error=SplitError, hint="The NB cVAE draws counts with real cells' library sizes.")
        scales = scale_factors(adata)
        lib = np.asarray(counts[train].sum(axis=1)).reshape(-1)
        sc_ = scales[train]
        scale_ctrl = scales[source]
    genes = [genes_of[p] for p in labels]
    prior = model.sample_prior(genes, n_cells, library=lib, scale=sc_, sample=sample, seed=seed, n_mc=n_mc)
    prior.obs["source_cell"] = -1
    data = model.make_cell_data(controls)
    transfer = model.transfer_controls(
        data, None, genes, n_cells, scale=scale_ctrl, sample=sample, seed=seed + 1, n_mc=n_mc
    )
    ctrl_rows = np.flatnonzero(source)
    transfer.obs["source_cell"] = ctrl_rows[transfer.obs["source_cell"].to_numpy()]
    out = ad.concat([prior, transfer], index_unique=None)
    back = dict(zip(genes, labels))
    out.obs["perturbation"] = pd.Categorical(out.obs["perturbation"].astype(str).map(back), categories=labels)
    out.obs["method"] = pd.Categorical(out.obs["mode"].astype(str).map(_MODE_TO_METHOD), categories=list(CVAE_METHODS))
    out.obs = out.obs[["method", "perturbation", "source_cell"]]
    out.obs_names = [f"cvae_{i}" for i in range(out.n_obs)]
    out.var_names = adata.var_names.copy()
    return out


def predict_baselines(
    adata: ad.AnnData, split: pd.DataFrame, params: dict[str, Any], schema: dict[str, Any] | None = None
) -> ad.AnnData:
    """The baselines' predicted cells for the split's test perturbations (see :mod:`.baselines`)."""
    split = as_split(split, adata)
    if not is_applicable(split):
        return _no_predictions(adata)
    return baseline_cells(
        adata, split, n_cells=int(params.get("n_cells", 200)), seed=int(params.get("seed", 0)),
        separator=_separator(schema),
    )


def _top_de_genes(
    adata: ad.AnnData, split: pd.DataFrame, labels: list[str], n_top: int, method: str
) -> dict[str, np.ndarray]:
    """Top DE genes (positions) of each perturbation's true test cells vs the reference controls.

    scanpy ``rank_genes_groups`` (``reference="control"``, ranked by the
    absolute score); perturbations with fewer than 2 test cells get none.
    """
    test = (split["role"] == "test").to_numpy()
    is_control = reference_mask(split)
    keep = test | is_control
    groups = np.where(is_control, "control", split["perturbation"].to_numpy())[keep]
    sizes = pd.Series(groups).value_counts()
    valid = [p for p in labels if sizes.get(p, 0) >= 2]
    out = {p: np.zeros(0, dtype=np.int64) for p in labels}
    if not valid:
        return out
    view = ad.AnnData(
        X=adata.X[keep].astype(np.float32),
        obs=pd.DataFrame({"group": pd.Categorical(groups)}, index=adata.obs_names[keep]),
        var=pd.DataFrame(index=adata.var_names.astype(str)),
    )
    view.uns["log1p"] = {"base": None}
    n_top = int(min(n_top, adata.n_vars))
    with warnings.catch_warnings():  # scanpy builds its result frame column by column
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(
            view, "group", groups=valid, reference="control", method=method, n_genes=n_top, rankby_abs=True,
        )
    position = {g: i for i, g in enumerate(view.var_names)}
    names = view.uns["rank_genes_groups"]["names"]
    for p in valid:
        out[p] = np.array([position[g] for g in names[p][:n_top]], dtype=np.int64)
    return out


def evaluate_predictions(
    adata: ad.AnnData,
    split: pd.DataFrame,
    cvae_predictions: ad.AnnData,
    baseline_predictions: ad.AnnData,
    pca: dict[str, np.ndarray],
    params: dict[str, Any],
) -> pd.DataFrame:
    """Score every method on every test perturbation of the split.

    The truth of a test perturbation is its held-out test cells. The
    reference control mean ``c`` is the mean of the split's reference
    controls (cells no method sees; see :mod:`.splits`); the perturbed-mean
    reference ``m`` is the mean of the training perturbed cells.
    The predicted mean of a method is the mean of its predicted cells (for
    the cVAE modes, of their ``layers["expected"]``, so the observation noise
    of the draws does not blur the mean; the draws in ``X`` are what the
    energy distance sees). Definitions of the scores: :mod:`.metrics` (top DE genes:
    :func:`_top_de_genes`; energy distance in the shared PCA space of
    :func:`fit_expression_pca` on at most ``max_cells_energy`` cells per
    side).

    Returns
    -------
    pandas.DataFrame
        One row per (perturbation, method): ``evaluation``, ``perturbation``,
        ``n_perturbed_genes``, ``method``, ``n_true_cells``,
        ``n_predicted_cells`` and the score columns.
    """
    split = as_split(split, adata)
    labels = perturbations_with_test_cells(split)
    if not labels:
        return pd.DataFrame(columns=list(_ID_COLUMNS))
    kind = str(split.loc[split["role"] == "test", "evaluation"].iloc[0])
    test = (split["role"] == "test").to_numpy()
    is_control = split["is_control"].to_numpy()
    perturbed_train = training_mask(split) & ~is_control
    c = _mean(adata.X[reference_mask(split)])
    m = _mean(adata.X[perturbed_train])
    top_k = [int(k) for k in params.get("top_k", [25, 50, 100])]
    de = _top_de_genes(adata, split, labels, int(params.get("n_top_de", 20)), str(params.get("de_method", "t-test")))
    max_cells = int(params.get("max_cells_energy", 300))
    rng = np.random.default_rng(int(params.get("seed", 0)))

    def subsample(rows: np.ndarray) -> np.ndarray:
        return rows if rows.size <= max_cells else np.sort(rng.choice(rows, size=max_cells, replace=False))

    # (method, perturbation) -> (rows, source AnnData); the predicted mean of a cVAE mode averages
    # each cell's expectation E[x | z, c] (layers["expected"]), so observation noise cancels exactly
    groups: dict[tuple[str, str], tuple[np.ndarray, ad.AnnData]] = {}
    for preds in (cvae_predictions, baseline_predictions):
        meth = preds.obs["method"].astype(str).to_numpy()
        lab = preds.obs["perturbation"].astype(str).to_numpy()
        for key in set(zip(meth, lab)):
            groups[key] = (np.flatnonzero((meth == key[0]) & (lab == key[1])), preds)
    labels_arr = split["perturbation"].to_numpy()
    n_genes_of = pd.Series(adata.obs["n_perturbed_genes"].to_numpy(), index=labels_arr).groupby(level=0).first()
    rows = []
    for label in labels:
        true_rows = np.flatnonzero(test & (labels_arr == label))
        t = _mean(adata.X[true_rows])
        true_pcs = project(pca, adata.X[subsample(true_rows)])
        for method in METHODS:
            if (method, label) not in groups:
                continue
            sel, preds = groups[(method, label)]
            p = _mean((preds.layers["expected"] if "expected" in preds.layers else preds.X)[sel])
            scores = score_perturbation(
                p, t, c, m, de[label], top_k, pred_pcs=project(pca, preds.X[subsample(sel)]), true_pcs=true_pcs
            )
            rows.append(
                {
                    "evaluation": kind,
                    "perturbation": label,
                    "n_perturbed_genes": int(n_genes_of[label]),
                    "method": method,
                    "n_true_cells": int(true_rows.size),
                    "n_predicted_cells": int(sel.size),
                    **scores,
                }
            )
    table = pd.DataFrame(rows)
    logger.info("Scored %d method(s) on %d %s perturbation(s).", table["method"].nunique(), len(labels), kind)
    return table


def summarise_metrics(**tables: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Merge the per-split metric tables (keyword: split name); summarise mean ± sd per split and method.

    Returns
    -------
    (metrics, summary, mlflow_metrics)
        The method × perturbation table of every split; the summary (one
        row per split and method: ``status`` ``scored``, ``n_perturbations`` and
        ``<score>_mean``, ``<score>_sd`` — NaN scores, e.g. the undefined
        correlation of a no-change prediction, are left out of the mean — and
        one row with ``status`` ``not applicable`` and its ``reason`` for a
        split without test cells, e.g. held-out perturbations on a singles-only
        screen); and the summary means as MLflow metrics
        ``<split>.<method>.<score>`` (the catalog prefixes them with
        ``perturbation_prediction.``).
    """
    scored = [t for t in tables.values() if len(t)]
    skipped = pd.DataFrame(
        [
            {"evaluation": name, "method": "", "status": "not applicable",
             "reason": NOT_APPLICABLE.get(name, "no test cells"), "n_perturbations": 0}
            for name, table in tables.items() if not len(table)
        ],
        columns=["evaluation", "method", "status", "reason", "n_perturbations"],
    )
    if not scored:
        return pd.DataFrame(columns=list(_ID_COLUMNS)), skipped, {}
    metrics = pd.concat(scored, ignore_index=True)
    scores = [c for c in metrics.columns if c in METRIC_COLUMNS or c.startswith("jaccard_top")]
    order = {m: i for i, m in enumerate(METHODS)}
    grouped = metrics.groupby(["evaluation", "method"], sort=False)
    summary = grouped[scores].agg(["mean", "std"])
    summary.columns = [f"{score}_{'sd' if stat == 'std' else 'mean'}" for score, stat in summary.columns]
    summary.insert(0, "n_perturbations", grouped.size())
    summary = summary.reset_index()
    summary["_order"] = summary["method"].map(order).fillna(len(order))
    summary = summary.sort_values(["evaluation", "_order"]).drop(columns="_order").reset_index(drop=True)
    summary.insert(2, "status", "scored")
    summary.insert(3, "reason", "")
    summary = pd.concat([summary, skipped], ignore_index=True) if len(skipped) else summary
    mlflow_metrics: dict[str, Any] = {}
    for _, row in summary.iterrows():
        for score in scores:
            value = row[f"{score}_mean"]
            if pd.notna(value):
                mlflow_metrics[f"{row['evaluation']}.{row['method']}.{score}"] = {
                    "value": float(value), "step": 0,
                }
    return metrics, summary, mlflow_metrics


def plot_perturbations(
    adata: ad.AnnData,
    split: pd.DataFrame,
    cvae_predictions: ad.AnnData,
    baseline_predictions: ad.AnnData,
    metrics: pd.DataFrame,
    pca: dict[str, np.ndarray],
    params: dict[str, Any],
) -> dict[str, Any]:
    """The three-panel figure for the test perturbations of a split (see :mod:`.figures`).

    At most ``max_figures`` perturbations (the largest true effects) get a
    figure; returns ``{"<perturbation>.png": Figure}`` (``{"not_applicable.png": ...}``,
    saying why, for a split without test cells).
    """
    split = as_split(split, adata)
    reason = not_applicable_reason(split)
    if reason:  # one figure saying why, so the run's figure folder is never empty
        kind = str(split["kind"].iloc[0]) if len(split) else "this split"
        return {"not_applicable.png": figures.message_figure(f"{kind}: not applicable", reason)}
    return figures.perturbation_figures(adata, split, cvae_predictions, baseline_predictions, metrics, pca, params)


def plot_summary(summary: pd.DataFrame, metrics: pd.DataFrame, params: dict[str, Any]) -> Any:
    """The summary panel across methods (see :func:`.figures.summary_figure`)."""
    return figures.summary_figure(metrics, params)
