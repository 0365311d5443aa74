"""Nodes of the contrastive_model pipeline (contrastiveVI on a processed screen).

Every node is a pure function: AnnData inputs are copied before anything is
added, every knob comes from ``conf/base/parameters_contrastive_model.yml``
and nothing here touches paths or MLflow (the catalog does both).

Public helpers for users of a trained model::

    model = catalog.load("contrastive_model")          # or models.load_model(path)
    embedded = embed_screen(model, other_screen)       # genes aligned by name
    embedded.obsm["X_salient"], embedded.obsm["X_background"]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import anndata as ad
import matplotlib

matplotlib.use("Agg")  # figures are written by the catalog, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from perturbscope.models import (  # noqa: E402
    CellData,
    ContrastiveVAE,
    PairedSampler,
    fit,
    resolve_device,
    seeded,
)
from perturbscope.pipelines.contrastive_model.evaluation import (  # noqa: E402
    evaluate_spaces,
    metrics_for_mlflow,
)
from perturbscope.pipelines import _model_inputs as _inputs  # noqa: E402
from perturbscope.pipelines._model_inputs import raw_counts  # noqa: E402
from perturbscope.schema import CONTROL  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "ContrastiveModelError",
    "BATCH_OBS_KEY",
    "align_counts",
    "embed_screen",
    "train_contrastive_model",
    "model_artifact",
    "training_history_metrics",
    "embed_cells",
    "evaluate_embeddings",
    "evaluation_metrics",
    "rank_salient_genes",
    "plot_embeddings",
]


SALIENT_KEY, BACKGROUND_KEY, PCA_KEY = "X_salient", "X_background", "X_pca_baseline"
UMAP_KEYS = {"salient": "X_umap_salient", "background": "X_umap_background"}

BATCH_OBS_KEY = _inputs.BATCH_OBS_KEY
"""Name of the batch-code entry in ``CellData.obs`` (``ContrastiveVAE.batch_key``)."""

_COUNTS_HINT = "contrastiveVI models counts: pass counts_layer= the layer with raw counts."


class ContrastiveModelError(ValueError):
    """Bad parameters or input for the contrastive model; the message names the fix."""


# ------------------------------------------------------------------------- helpers
def _counts(adata: ad.AnnData, counts_layer: str | None) -> sp.csr_matrix:
    """The raw count matrix (``layers[counts_layer]``, else ``layers["counts"]``, else ``X``)."""
    return raw_counts(adata, counts_layer, ContrastiveModelError, _COUNTS_HINT)


def align_counts(
    adata: ad.AnnData, genes: list[str], counts_layer: str | None = None, fill_missing: bool = False
) -> sp.csr_matrix:
    """Raw counts of ``adata`` with columns reordered to ``genes`` (matched by name).

    Parameters
    ----------
    adata
        A screen (any gene order, extra genes are dropped).
    genes
        The model's genes (``model.metadata["genes"]``).
    counts_layer
        Layer with raw counts (None: ``layers["counts"]`` if present, else ``X``).
    fill_missing
        Fill genes the screen lacks with zeros (logged) instead of raising.

    Raises
    ------
    ContrastiveModelError
        Genes of the model missing from the screen (named), duplicate gene
        names, or a matrix that is not raw counts.
    """
    return _inputs.align_counts(_counts(adata, counts_layer), adata.var_names, genes, ContrastiveModelError, fill_missing)


def _cell_data(model: ContrastiveVAE, adata: ad.AnnData, counts_layer: str | None, fill_missing: bool) -> CellData:
    return _inputs.model_cell_data(model, adata, ContrastiveModelError, _COUNTS_HINT, counts_layer, fill_missing)


def _umap(adata: ad.AnnData, obsm_key: str, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    holder = ad.AnnData(np.zeros((adata.n_obs, 0), dtype=np.float32))
    holder.obsm["X_space"] = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
    k = max(2, min(int(n_neighbors), adata.n_obs - 1))
    sc.pp.neighbors(holder, n_neighbors=k, use_rep="X_space", random_state=seed)
    sc.tl.umap(holder, min_dist=float(min_dist), random_state=seed)
    return holder.obsm["X_umap"].astype(np.float32)


def embed_screen(
    model: ContrastiveVAE,
    adata: ad.AnnData,
    counts_layer: str | None = None,
    fill_missing: bool = False,
    batch_size: int = 1024,
    umap: bool = False,
    n_neighbors: int = 15,
    min_dist: float = 0.5,
    seed: int = 0,
) -> ad.AnnData:
    """Embed a (new) screen with a trained contrastive model.

    Genes are matched by name to the model's training genes
    (``model.metadata["genes"]``); extra genes are ignored. The screen is
    not modified: a copy is returned.

    Parameters
    ----------
    model
        A trained :class:`~perturbscope.models.ContrastiveVAE`, e.g.
        ``catalog.load("contrastive_model")``.
    adata
        The screen: raw counts in ``layers[counts_layer]``, ``layers["counts"]``
        or ``X``; the model's batch column in ``obs`` if it was trained with one.
    counts_layer
        Layer with raw counts (None: ``layers["counts"]`` if present, else ``X``).
    fill_missing
        Treat model genes missing from the screen as zero counts instead of
        raising.
    batch_size
        Cells per forward pass.
    umap
        Also compute UMAPs of both spaces (``obsm["X_umap_salient"]``,
        ``obsm["X_umap_background"]``).
    n_neighbors, min_dist, seed
        UMAP settings.

    Returns
    -------
    anndata.AnnData
        A copy with ``obsm["X_salient"]`` and ``obsm["X_background"]``
        (posterior means; controls sit near 0 in the salient space).

    Raises
    ------
    ContrastiveModelError
        Missing genes (named), unknown batches, or no raw counts.
    """
    data = _cell_data(model, adata, counts_layer, fill_missing)
    background, salient = model.embed(data, batch_size=batch_size)
    out = adata.copy()
    out.obsm[BACKGROUND_KEY] = background
    out.obsm[SALIENT_KEY] = salient
    if umap:
        for space, key in UMAP_KEYS.items():
            out.obsm[key] = _umap(out, f"X_{space}", n_neighbors, min_dist, seed)
    return out


# ------------------------------------------------------------------------ training
def _model_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    params = _inputs.model_kwargs(ContrastiveVAE, params, "contrastive_model.model", ContrastiveModelError)
    for key in ("n_background", "n_salient"):
        value = params.get(key, 10)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ContrastiveModelError(
                f"contrastive_model.model.{key} must be a positive integer (latent dimensions), got {value!r}; "
                "10 is a good default."
            )
    return params


def _groups(screen: ad.AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is_control, is_target, is_validation) masks with clear errors."""
    obs = screen.obs
    if "is_control" in obs:
        is_control = obs["is_control"].to_numpy().astype(bool)
    elif "perturbation" in obs:
        is_control = (obs["perturbation"].astype(str) == CONTROL).to_numpy()
    else:
        raise ContrastiveModelError(
            "The screen has neither obs['is_control'] nor obs['perturbation']: run the data_processing "
            "pipeline first (it labels control and target cells)."
        )
    is_target = ~is_control
    if "perturbation" in obs:
        is_target &= (obs["perturbation"].astype(str) != "unperturbed").to_numpy()
    if not is_target.any():
        raise ContrastiveModelError(
            "The screen has no target (perturbed) cells: contrastiveVI contrasts perturbed cells with "
            "controls. Check schema.perturbation_key and schema.control_labels (every cell is a control "
            "or the screen is a plain count matrix)."
        )
    if not is_control.any():
        raise ContrastiveModelError(
            "The screen has no control cells: contrastiveVI needs non-targeting controls as the background. "
            "Check schema.control_labels (labels present: "
            f"{sorted(map(str, obs['perturbation'].unique()))[:10] if 'perturbation' in obs else '?'})."
        )
    if "split" in obs:
        is_val = (obs["split"].astype(str) == "validation").to_numpy()
    else:
        logger.warning("The screen has no obs['split']: training on every cell, no early stopping.")
        is_val = np.zeros(screen.n_obs, dtype=bool)
    return is_control, is_target, is_val


def train_contrastive_model(
    screen: ad.AnnData,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    schema_params: dict[str, Any],
    seed: int,
    callback: Callable[[int, Any, ContrastiveVAE], bool | None] | None = None,
) -> tuple[ContrastiveVAE, pd.DataFrame]:
    """Train contrastiveVI: controls are the background, every other cell a target.

    The ``split`` column decides training and validation cells (validation
    loss drives early stopping and the restored weights). Raw counts come
    from ``layers["counts"]``; ``schema.batch_key``, when set, becomes a
    one-hot covariate of encoders and decoder.

    ``callback`` (not a pipeline input) is passed to
    :func:`~perturbscope.models.fit`, e.g. to score the embedding every few
    epochs in a benchmark.

    Returns
    -------
    (ContrastiveVAE, pandas.DataFrame)
        The trained model (eval mode, CPU; ``metadata`` holds the genes,
        batch categories and training summary, used by :func:`embed_screen`)
        and the per-epoch history (``epoch, train_loss, val_loss, ...``, plus
        ``best`` marking the restored epoch).
    """
    model_kwargs = _model_kwargs(model_params)
    config, batch_size, val_batch_size = _inputs.train_config(
        training_params, seed, "contrastive_model.training", ContrastiveModelError
    )
    is_control, is_target, is_val = _groups(screen)

    batch_key = (schema_params or {}).get("batch_key")
    categories, obs = _inputs.training_batches(screen, batch_key, ContrastiveModelError)
    # the counts go to the training device once (CUDA when available with device: auto)
    data = CellData(_counts(screen, None), obs=obs, device=resolve_device(config.device))

    train_bg, train_tg = np.flatnonzero(is_control & ~is_val), np.flatnonzero(is_target & ~is_val)
    val_bg, val_tg = np.flatnonzero(is_control & is_val), np.flatnonzero(is_target & is_val)
    if train_tg.size == 0 or train_bg.size == 0:
        raise ContrastiveModelError(
            f"No {'target' if train_tg.size == 0 else 'control'} cells in the training split: lower "
            "data_processing.split.validation_fraction."
        )
    n_batch = len(categories)
    if model_kwargs.get("library") == "learned":
        mean, var = data.library_prior(train_bg.tolist() + train_tg.tolist(), BATCH_OBS_KEY if n_batch else None, n_batch)
        model_kwargs.update(library_log_mean=mean, library_log_var=var)
    try:
        with seeded(seed):
            model = ContrastiveVAE(n_genes=data.n_genes, n_batch=n_batch, batch_key=BATCH_OBS_KEY, **model_kwargs)
    except ValueError as err:
        raise ContrastiveModelError(f"contrastive_model.model: {err}") from None

    train = PairedSampler(data, train_bg, train_tg, batch_size=batch_size, seed=seed)
    val = None
    if val_bg.size and val_tg.size:
        val = PairedSampler(data, val_bg, val_tg, batch_size=val_batch_size, shuffle=False, seed=seed)
    else:
        logger.warning("No validation controls or targets: training %d epochs without early stopping.", config.max_epochs)
    logger.info(
        "Training contrastiveVI on %d target and %d control cells (%d / %d for validation), %d genes.",
        train_tg.size, train_bg.size, val_tg.size, val_bg.size, data.n_genes,
    )
    history = fit(model, train, val, config, callback=callback, settings="contrastive_model")
    model.cpu().eval()
    frame = history.to_frame()
    frame["best"] = frame["epoch"] == history.best_epoch
    model.metadata = {
        **_inputs.screen_metadata(screen, batch_key, categories),
        "n_target_cells": int(is_target.sum()),
        "n_control_cells": int(is_control.sum()),
        "best_epoch": history.best_epoch,
        "epochs_trained": len(history),
        "stopped_early": bool(history.stopped_early),
        "precision": history.precision,
        "train_config": config.to_dict(),
    }
    logger.info(
        "Trained %d epochs (best %s, %.2f s/epoch); validation loss %.4g.",
        len(history), history.best_epoch, float(np.mean(history.seconds)),
        float(frame.loc[frame["best"], "val_loss"].iloc[0]) if frame["best"].any() else float("nan"),
    )
    return model, frame


def model_artifact(model: ContrastiveVAE) -> ContrastiveVAE:
    """The trained model, unchanged: its output is the MLflow artifact copy of ``contrastive_model``."""
    return model


def training_history_metrics(history: pd.DataFrame) -> dict[str, Any]:
    """The history as MLflow metric histories (step = epoch) plus a run summary.

    Every column but ``epoch``/``best`` becomes one metric with one value per
    epoch (NaN epochs left out); ``best_epoch``, ``epochs``,
    ``seconds_total``, ``seconds_per_epoch`` and ``best_val_loss`` are single values.
    """
    out: dict[str, Any] = {}
    steps = history["epoch"].astype(int).to_numpy()
    for column in history.columns:
        if column in ("epoch", "best"):
            continue
        values = history[column].to_numpy(dtype=float)
        points = [{"step": int(s), "value": float(v)} for s, v in zip(steps, values) if np.isfinite(v)]
        if points:
            out[column] = points
    best = history.loc[history["best"].astype(bool)] if "best" in history else history.iloc[0:0]
    out["epochs"] = {"step": 0, "value": float(len(history))}
    out["seconds_total"] = {"step": 0, "value": float(history["seconds"].sum())}
    out["seconds_per_epoch"] = {"step": 0, "value": float(history["seconds"].mean())}
    if len(best):
        out["best_epoch"] = {"step": 0, "value": float(best["epoch"].iloc[0])}
        if np.isfinite(best["val_loss"].iloc[0]):
            out["best_val_loss"] = {"step": 0, "value": float(best["val_loss"].iloc[0])}
    return out


# ------------------------------------------------------------------------ embedding
def embed_cells(
    screen: ad.AnnData, model: ContrastiveVAE, params: dict[str, Any], seed: int
) -> ad.AnnData:
    """Salient and background embeddings, a PCA baseline and UMAPs of both spaces.

    Adds to a copy of the screen: ``obsm["X_salient"]``, ``obsm["X_background"]``,
    ``obsm["X_pca_baseline"]`` (PCA of the log-normalised ``X`` with as many
    components as both latents together, the evaluation baseline),
    ``obsm["X_umap_salient"]``, ``obsm["X_umap_background"]`` and
    ``uns["contrastive_model"]`` (hyperparameters and training summary).
    """
    params = dict(params or {})
    out = embed_screen(
        model, screen, batch_size=int(params.get("batch_size", 1024)), umap=bool(params.get("umap", True)),
        n_neighbors=int(params.get("n_neighbors", 15)), min_dist=float(params.get("umap_min_dist", 0.5)), seed=seed,
    )
    n_comps = params.get("pca_components") or (model.n_background + model.n_salient)
    n_comps = int(min(n_comps, out.n_obs - 1, out.n_vars - 1))
    matrix = out.X.astype(np.float32) if sp.issparse(out.X) else np.asarray(out.X, dtype=np.float32)
    out.obsm[PCA_KEY] = np.asarray(sc.pp.pca(matrix, n_comps=n_comps, random_state=seed), dtype=np.float32)
    meta = {k: v for k, v in (model.metadata or {}).items() if k not in ("genes", "train_config")}
    out.uns["contrastive_model"] = {
        "hparams": {k: v for k, v in model.hparams.items() if v is not None},
        "training": {k: v for k, v in meta.items() if v is not None and v != []},
    }
    return out


# ----------------------------------------------------------------------- evaluation
def evaluate_embeddings(
    embedded: ad.AnnData, params: dict[str, Any], schema_params: dict[str, Any], seed: int
) -> pd.DataFrame:
    """The evaluation table: program separation and confounder leakage per space.

    Spaces: salient, background and the PCA baseline. Program scores (ARI,
    NMI of Leiden clusters vs the annotation, silhouette, kNN accuracy) use
    perturbed cells with an annotation: ``evaluation.annotation_key``, else
    ``schema.program_key``. Leakage is kNN accuracy of each confounder
    (``evaluation.confounders`` plus ``schema.batch_key``) over perturbed
    cells, next to its chance level; a confounder that is absent or unknown
    (e.g. ``phase`` on a screen without cell-cycle genes) is skipped with a
    logged note and a note row.
    """
    params = dict(params or {})
    schema_params = dict(schema_params or {})
    annotation_key = params.get("annotation_key") or schema_params.get("program_key")
    confounders = list(params.get("confounders") or [])
    if schema_params.get("batch_key") and schema_params["batch_key"] not in confounders:
        confounders.append(schema_params["batch_key"])
    elif "batch" not in confounders:
        logger.info("No schema.batch_key: batch leakage is not evaluated.")
    _, is_target, _ = _groups(embedded)
    table = evaluate_spaces(
        embedded,
        spaces={"salient": SALIENT_KEY, "background": BACKGROUND_KEY, "pca": PCA_KEY},
        target_mask=is_target,
        annotation_key=annotation_key,
        confounder_keys=confounders,
        ignore_labels=params.get("ignore_labels") or ("unassigned", "none", "unknown", "control", "ctrl"),
        resolution=params.get("leiden_resolution", "auto"),
        n_neighbors=int(params.get("n_neighbors", 15)),
        folds=int(params.get("knn_folds", 5)),
        max_cells=params.get("max_cells", 20000),
        seed=seed,
        leiden_runs=params.get("leiden_runs", 1),
    )
    for row in table.itertuples(index=False):
        if np.isfinite(row.value):
            chance = f" (chance {row.chance_level:.3f})" if np.isfinite(row.chance_level) else ""
            logger.info("%s %s [%s]: %.3f%s", row.metric, row.key, row.space, row.value, chance)
    return table


def evaluation_metrics(table: pd.DataFrame) -> dict[str, Any]:
    """The evaluation table as MLflow metrics (``ari.salient``, ``leakage_knn_accuracy.phase.salient``...)."""
    return metrics_for_mlflow(table)


# ----------------------------------------------------------------- salient expression
def rank_salient_genes(screen: ad.AnnData, model: ContrastiveVAE, params: dict[str, Any]) -> pd.DataFrame:
    """Genes each perturbation moves: decoded expression with the salient code vs ``s = 0``.

    For every target cell the decoder is run twice with the same background
    code ``z``: once with the cell's salient code ``s``, once with ``s = 0``
    (what the cell would look like without its perturbation-specific
    variation). Per cell and gene ``lfc = log2((with + c) / (without + c))``
    on expression scaled to ``scale`` (10,000) counts, ``c`` the pseudocount;
    per perturbation the table reports

    * ``mean_log2fc`` -- mean ``lfc`` over the perturbation's cells (the effect size),
    * ``fraction_same_direction`` -- share of its cells whose ``lfc`` has the sign of the mean,
    * ``mean_with_salient`` / ``mean_without_salient`` -- mean decoded expression per ``scale``,

    ranked by ``|mean_log2fc|`` (``rank`` 1 = the most moved), the top
    ``top_genes`` per perturbation (null = all genes).
    """
    params = dict(params or {})
    scale = float(params.get("scale", 1e4))
    pseudocount = float(params.get("pseudocount", 0.01))
    top = params.get("top_genes", 50)
    batch_size = int(params.get("batch_size", 1024))
    min_cells = int(params.get("min_cells", 1))
    _, is_target, _ = _groups(screen)
    data = _cell_data(model, screen, None, False)
    genes = np.asarray((model.metadata or {}).get("genes") or screen.var_names, dtype=object)
    labels = screen.obs["perturbation"].astype(str).to_numpy() if "perturbation" in screen.obs else np.full(screen.n_obs, "target")
    frames = []
    for label in sorted(np.unique(labels[is_target])):
        idx = np.flatnonzero(is_target & (labels == label))
        if idx.size < min_cells:
            continue
        sums = np.zeros(data.n_genes)
        positive = np.zeros(data.n_genes)
        with_sum = np.zeros(data.n_genes)
        without_sum = np.zeros(data.n_genes)
        for start in range(0, idx.size, batch_size):
            chunk = idx[start : start + batch_size]
            with_s, without_s = model.salient_expression(data, chunk, batch_size=batch_size)
            with_s = with_s.astype(np.float64) * scale
            without_s = without_s.astype(np.float64) * scale
            lfc = np.log2(with_s + pseudocount) - np.log2(without_s + pseudocount)
            sums += lfc.sum(0)
            positive += (lfc > 0).sum(0)
            with_sum += with_s.sum(0)
            without_sum += without_s.sum(0)
        n = idx.size
        mean_lfc = sums / n
        up_share = positive / n
        same = np.where(mean_lfc >= 0, up_share, 1.0 - up_share)
        frame = pd.DataFrame(
            {
                "perturbation": label,
                "gene": genes,
                "mean_log2fc": mean_lfc,
                "fraction_same_direction": same,
                "mean_with_salient": with_sum / n,
                "mean_without_salient": without_sum / n,
                "n_cells": n,
            }
        )
        frame = frame.reindex(frame["mean_log2fc"].abs().sort_values(ascending=False, kind="stable").index)
        frame.insert(1, "rank", np.arange(1, len(frame) + 1))
        frame.insert(4, "direction", np.where(frame["mean_log2fc"] >= 0, "up", "down"))
        frames.append(frame if top is None else frame.head(int(top)))
    columns = ["perturbation", "rank", "gene", "mean_log2fc", "direction", "fraction_same_direction",
               "mean_with_salient", "mean_without_salient", "n_cells"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


# ---------------------------------------------------------------------------- figure
def plot_embeddings(embedded: ad.AnnData, params: dict[str, Any], schema_params: dict[str, Any]) -> Figure:
    """UMAPs of the salient and background spaces, coloured by program / perturbation and phase."""
    params = dict(params or {})
    missing = [key for key in UMAP_KEYS.values() if key not in embedded.obsm]
    if missing:  # contrastive_model.embedding.umap: false
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No UMAPs: contrastive_model.embedding.umap is false.\n"
                "Set it to true to compute them.", ha="center", va="center")
        return fig
    annotation = params.get("annotation_key") or (schema_params or {}).get("program_key")
    colours = []
    for key in (annotation, "cell_group", "phase"):
        if key and key in embedded.obs and embedded.obs[key].astype(str).nunique() > 1 and key not in colours:
            colours.append(key)
    if not colours:
        colours = ["perturbation"] if "perturbation" in embedded.obs else [None]
    plot = embedded.copy()
    for key in colours:
        if key is not None:
            plot.obs[key] = plot.obs[key].astype(str).astype("category")
    fig, axes = plt.subplots(2, len(colours), figsize=(4.8 * len(colours), 8.5), squeeze=False)
    for row, space in enumerate(("salient", "background")):
        plot.obsm[f"X_umap{space}"] = plot.obsm[UMAP_KEYS[space]]
        for col, key in enumerate(colours):
            ax = axes[row, col]
            sc.pl.embedding(plot, basis=f"umap{space}", color=key, ax=ax, show=False, frameon=False,
                            size=float(np.clip(120000 / max(plot.n_obs, 1), 3, 30)),
                            legend_fontsize=7)
            ax.set_title(f"{space} — {key or ''}")
    fig.tight_layout()
    return fig
