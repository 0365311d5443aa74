"""Nodes of the linear_model pipeline (LDVAE on a processed screen).

Every node is a pure function: AnnData inputs are copied before anything is
added, every knob comes from ``conf/base/parameters_linear_model.yml`` and
nothing here touches paths or MLflow (the catalog does both).

What the pipeline produces, and how to read it:

* ``linear_loadings`` -- genes x factors: the change of a gene's natural-log
  expression per standard deviation of a factor (over the screen's cells).
* ``linear_factor_top_genes`` -- per factor, the genes with the largest
  positive and negative loadings: the factor's gene module.
* ``linear_factor_effects`` -- per perturbation and factor, how far the
  perturbation's cells sit from the control cells on the factor (difference of
  means with a Welch 95% confidence interval, a standardised effect and a
  BH-adjusted p-value), with the genes that move with it, e.g. "KLF1 raises
  factor_3 (+1.9 SD): up HBG1, HBZ, ...".

Public helper for users of a trained model::

    model = catalog.load("linear_model")            # or models.load_model(path)
    embedded = embed_screen(model, other_screen)    # genes aligned by name
    embedded.obsm["X_ldvae"]
"""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import matplotlib

matplotlib.use("Agg")  # figures are written by the catalog, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

from perturbscope.models import CellData, MinibatchSampler, fit, seeded, torch_threads  # noqa: E402
from perturbscope.pipelines import _model_inputs as _inputs  # noqa: E402
from perturbscope.pipelines._model_inputs import raw_counts  # noqa: E402
from perturbscope.models.linear import ROTATIONS, LinearVAE  # noqa: E402
from perturbscope.schema import CONTROL  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "LinearModelError",
    "LATENT_KEY",
    "EFFECT_COLUMNS",
    "TOP_GENE_COLUMNS",
    "embed_screen",
    "train_linear_model",
    "mlflow_copy",
    "training_history_metrics",
    "embed_cells",
    "factor_loadings",
    "top_genes_per_factor",
    "factor_perturbation_effects",
    "linear_model_metrics",
    "plot_factor_effects",
]

LATENT_KEY = "X_ldvae"
"""``obsm`` key of the factor scores."""
LOADINGS_KEY = "ldvae_loadings"
"""``varm`` key of the loadings in the embedded screen."""
BATCH_OBS_KEY = _inputs.BATCH_OBS_KEY
"""Name of the batch-code entry in ``CellData.obs`` (``LinearVAE.batch_key``)."""
UNPERTURBED = "unperturbed"
"""Label of every cell of a plain count matrix (see data_processing)."""

TOP_GENE_COLUMNS = ["factor", "direction", "rank", "gene", "loading"]
EFFECT_COLUMNS = [
    "perturbation",
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

_COUNTS_HINT = "The LDVAE models counts: run the data_processing pipeline (it keeps raw counts in layers['counts'])."


class LinearModelError(ValueError):
    """Bad parameters or input for the linear model; the message names the fix."""


# ------------------------------------------------------------------------- helpers
def _counts(adata: ad.AnnData) -> sp.csr_matrix:
    """Raw counts: ``layers["counts"]`` (the processed screen), else ``X``; checked."""
    return raw_counts(adata, None, LinearModelError, _COUNTS_HINT)


def _cell_data(model: LinearVAE, adata: ad.AnnData) -> CellData:
    return _inputs.model_cell_data(model, adata, LinearModelError, _COUNTS_HINT, fill_missing=None)


def embed_screen(model: LinearVAE, adata: ad.AnnData, batch_size: int = 1024) -> ad.AnnData:
    """A copy of ``adata`` with the factor scores in ``obsm["X_ldvae"]``.

    Genes are matched by name to the model's (``model.metadata["genes"]``);
    raw counts come from ``layers["counts"]`` or ``X``. The loadings go to
    ``varm["ldvae_loadings"]`` and the factor names to
    ``uns["ldvae"]["factors"]``.

    Raises
    ------
    LinearModelError
        Missing genes (named), unknown batches, or no raw counts.
    """
    data = _cell_data(model, adata)
    out = adata.copy()
    out.obsm[LATENT_KEY] = model.embed(data, batch_size=int(batch_size))
    genes = (model.metadata or {}).get("genes")
    loadings = model.loadings(genes)
    if genes is None or list(genes) == [str(g) for g in out.var_names]:
        out.varm[LOADINGS_KEY] = loadings.to_numpy(dtype=np.float32)
    else:  # the model's genes are a subset / another order
        full = loadings.reindex([str(g) for g in out.var_names]).to_numpy(dtype=np.float32)
        out.varm[LOADINGS_KEY] = full
    out.uns["ldvae"] = {"factors": model.factor_names, "latent_key": LATENT_KEY}
    return out


# ------------------------------------------------------------------------ training
def _validation_mask(screen: ad.AnnData) -> np.ndarray:
    if "split" in screen.obs:
        return (screen.obs["split"].astype(str) == "validation").to_numpy()
    logger.warning("The screen has no obs['split']: training on every cell, no early stopping.")
    return np.zeros(screen.n_obs, dtype=bool)


def train_linear_model(
    screen: ad.AnnData,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    factor_params: dict[str, Any],
    schema_params: dict[str, Any],
    seed: int,
) -> tuple[LinearVAE, pd.DataFrame]:
    """Train the LDVAE on every cell of the screen (controls and perturbed alike).

    Cells with ``split == "validation"`` are held out for early stopping and
    the restored weights; raw counts come from ``layers["counts"]``;
    ``schema.batch_key``, when set, becomes the batch covariate. Before
    training the decoder intercepts start at the genes' average expression;
    after training the factors are oriented for reading
    (:meth:`LinearVAE.orient` with ``factors.rotation``: promax by default;
    unit SD over all cells, ordered by explained variance).

    Returns
    -------
    (LinearVAE, pandas.DataFrame)
        The trained model (eval mode, CPU; ``metadata`` holds the genes,
        batch categories, training summary and the held-out reconstruction
        log-likelihood) and the per-epoch history (``epoch, train_loss,
        val_loss, ...``, plus ``best`` marking the restored epoch).
    """
    model_kwargs = _inputs.model_kwargs(LinearVAE, model_params, "linear_model.model", LinearModelError)
    config, batch_size, val_batch_size = _inputs.train_config(
        training_params, seed, "linear_model.training", LinearModelError
    )
    rotation = (factor_params or {}).get("rotation", "promax")
    if rotation not in ROTATIONS:
        raise LinearModelError(f"linear_model.factors.rotation must be one of {list(ROTATIONS)}, got {rotation!r}.")
    if screen.n_obs < 2:
        raise LinearModelError(f"The screen has {screen.n_obs} cell(s); the LDVAE needs at least 2.")

    batch_key = (schema_params or {}).get("batch_key")
    categories, obs = _inputs.training_batches(screen, batch_key, LinearModelError)
    data = CellData(_counts(screen), obs=obs)
    if np.any(data.library <= 0):
        logger.warning("%d cell(s) have no counts at all.", int(np.sum(data.library <= 0)))

    is_val = _validation_mask(screen)
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if train_idx.size == 0:
        raise LinearModelError("Every cell is in the validation split: lower data_processing.split.validation_fraction.")
    n_batch = len(categories)
    if model_kwargs.get("library") == "learned":
        mean, var = data.library_prior(train_idx, BATCH_OBS_KEY if n_batch else None, n_batch)
        model_kwargs.update(library_log_mean=mean, library_log_var=var)
    try:
        with seeded(seed):
            model = LinearVAE(n_genes=data.n_genes, n_batch=n_batch, batch_key=BATCH_OBS_KEY, **model_kwargs)
    except (TypeError, ValueError) as err:
        raise LinearModelError(f"linear_model.model: {err}") from None
    model.init_intercepts(data, train_idx)

    train = MinibatchSampler(data, train_idx, batch_size=batch_size, seed=seed)
    val = MinibatchSampler(data, val_idx, batch_size=val_batch_size, shuffle=False) if val_idx.size else None
    if val is None:
        logger.warning("No validation cells: training %d epochs without early stopping.", config.max_epochs)
    logger.info(
        "Training the LDVAE (%d factors) on %d cells (%d for validation), %d genes.",
        model.n_latent, train_idx.size, val_idx.size, data.n_genes,
    )
    with torch_threads(config.num_threads):  # also for orienting and scoring after training
        history = fit(model, train, val, config, settings="linear_model")
        model.cpu().eval()
        data.to("cpu")
        model.orient(data, rotation=rotation)
        held_out = float(np.mean(model.reconstruction_log_likelihood(data, val_idx))) if val_idx.size else float("nan")
    frame = history.to_frame()
    frame["best"] = frame["epoch"] == history.best_epoch
    model.metadata = {
        **_inputs.screen_metadata(screen, batch_key, categories),
        "rotation": rotation,
        "n_train_cells": int(train_idx.size),
        "n_validation_cells": int(val_idx.size),
        "best_epoch": history.best_epoch,
        "epochs_trained": len(history),
        "stopped_early": bool(history.stopped_early),
        "precision": history.precision,
        "validation_reconstruction_log_likelihood": held_out,
        "train_config": config.to_dict(),
    }
    logger.info(
        "Trained %d epochs (best %s, %.3f s/epoch); held-out reconstruction log-likelihood %.2f per cell.",
        len(history), history.best_epoch, float(np.mean(history.seconds)), held_out,
    )
    return model, frame


def mlflow_copy(value: Any) -> Any:
    """The input unchanged: feeds the MLflow artifact copy of a versioned catalog entry.

    (A Kedro-versioned dataset cannot be wrapped in ``MlflowArtifactDataset``:
    the wrapper's version clashes with the catalog's save version.)
    """
    return value


def training_history_metrics(history: pd.DataFrame) -> dict[str, Any]:
    """The history as MLflow metric histories (step = epoch) plus a run summary."""
    out: dict[str, Any] = {}
    steps = history["epoch"].astype(int).to_numpy()
    for column in history.columns:
        if column in ("epoch", "best", "seconds") or not pd.api.types.is_numeric_dtype(history[column]):
            continue
        values = history[column].to_numpy(dtype=float)
        points = [{"step": int(s), "value": float(v)} for s, v in zip(steps, values) if np.isfinite(v)]
        if points:
            out[column] = points
    out["epochs"] = {"step": 0, "value": float(len(history))}
    out["seconds_per_epoch"] = {"step": 0, "value": float(history["seconds"].mean())}
    best = history[history["best"].astype(bool)] if "best" in history else history.iloc[0:0]
    if len(best):
        out["best_epoch"] = {"step": 0, "value": float(best["epoch"].iloc[0])}
        if np.isfinite(best["val_loss"].iloc[0]):
            out["best_val_loss"] = {"step": 0, "value": float(best["val_loss"].iloc[0])}
    return out


# ------------------------------------------------------------------------ outputs
def embed_cells(screen: ad.AnnData, model: LinearVAE, params: dict[str, Any]) -> ad.AnnData:
    """The processed screen with the factor scores in ``obsm["X_ldvae"]`` (see :func:`embed_screen`)."""
    return embed_screen(model, screen, batch_size=int((params or {}).get("batch_size", 1024)))


def factor_loadings(model: LinearVAE) -> pd.DataFrame:
    """Genes x factors loadings: a ``gene`` column, then ``factor_1 ... factor_K``.

    Natural-log expression change per standard deviation of the factor over
    the screen's cells (see :meth:`LinearVAE.loadings`).
    """
    return model.loadings().reset_index()


def _loadings_matrix(loadings: pd.DataFrame) -> pd.DataFrame:
    if "gene" in loadings.columns:
        loadings = loadings.set_index("gene")
    factors = [c for c in loadings.columns if str(c).startswith("factor_")]
    if not factors:
        raise LinearModelError(f"The loadings table has no factor_* columns (columns: {list(loadings.columns)}).")
    return loadings[factors].astype(float)


def top_genes_per_factor(loadings: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """The ``n_top_genes`` largest positive and negative loadings of every factor.

    Returns
    -------
    pandas.DataFrame
        Long table ``factor, direction (positive/negative), rank (1 = strongest),
        gene, loading``.
    """
    n_top = int((params or {}).get("n_top_genes", 20))
    if n_top < 1:
        raise LinearModelError(f"linear_model.factors.n_top_genes must be >= 1, got {n_top}.")
    matrix = _loadings_matrix(loadings)
    rows = []
    for factor in matrix.columns:
        column = matrix[factor]
        for direction, picked in (
            ("positive", column[column > 0].sort_values(ascending=False).head(n_top)),
            ("negative", column[column < 0].sort_values(ascending=True).head(n_top)),
        ):
            for rank, (gene, value) in enumerate(picked.items(), start=1):
                rows.append((factor, direction, rank, str(gene), float(value)))
    return pd.DataFrame(rows, columns=TOP_GENE_COLUMNS)


def _gene_lists(top_genes: pd.DataFrame, n_shown: int) -> dict[tuple[str, str], list[str]]:
    lists: dict[tuple[str, str], list[str]] = {}
    for (factor, direction), group in top_genes.sort_values("rank").groupby(["factor", "direction"], sort=False):
        lists[(str(factor), str(direction))] = group["gene"].astype(str).head(n_shown).tolist()
    return lists


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaNs are left out and stay NaN)."""
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return q
    order = ok[np.argsort(p[ok])]
    ranked = p[order] * ok.size / np.arange(1, ok.size + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q


def _welch(
    x: np.ndarray, y: np.ndarray, confidence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-column Welch difference of means ``x - y``: (diff, half-width, p, se); NaN below 2 cells."""
    nx, ny = x.shape[0], y.shape[0]
    diff = x.mean(0) - y.mean(0)
    if nx < 2 or ny < 2:
        nan = np.full(diff.shape, np.nan)
        return diff, nan, nan, nan
    vx, vy = x.var(0, ddof=1) / nx, y.var(0, ddof=1) / ny
    se = np.sqrt(vx + vy)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (vx + vy) ** 2 / (vx**2 / (nx - 1) + vy**2 / (ny - 1))
        t = diff / se
    df = np.where(np.isfinite(df), df, nx + ny - 2)
    half = stats.t.ppf(0.5 + confidence / 2.0, df) * se
    p = 2.0 * stats.t.sf(np.abs(t), df)
    p = np.where(se > 0, p, np.where(diff == 0, 1.0, 0.0))
    return diff, half, p, se


def _fmt(value: float) -> str:
    return f"{value:+.2f}" if np.isfinite(value) else "nan"


def factor_perturbation_effects(
    embedded: ad.AnnData,
    top_genes: pd.DataFrame,
    params: dict[str, Any],
    schema_params: dict[str, Any],
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
    and ``reading`` says it in words. Rows are sorted by perturbation and by
    ``|standardised_effect|`` (``rank`` 1 = the factor it moves most).

    A screen without perturbations (a plain count matrix, every cell
    ``unperturbed``) or without controls gives an empty table with the same
    columns.
    """
    params = dict(params or {})
    confidence = float(params.get("confidence", 0.95))
    if not 0.0 < confidence < 1.0:
        raise LinearModelError(f"linear_model.effects.confidence must be in (0, 1), got {confidence}.")
    alpha = float(params.get("alpha", 0.05))
    min_std = float(params.get("min_standardised_effect", 0.0))
    min_cells = int(params.get("min_cells", 2))
    n_shown = int(params.get("n_genes_shown", 8))
    if LATENT_KEY not in embedded.obsm:
        raise LinearModelError(f"The screen has no obsm['{LATENT_KEY}']: run the embed_cells node first.")
    if "perturbation" not in embedded.obs:
        raise LinearModelError("The screen has no obs['perturbation']: run the data_processing pipeline first.")
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in EFFECT_COLUMNS})
    labels = embedded.obs["perturbation"].astype(str).to_numpy()
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
    program_key = (schema_params or {}).get("program_key")
    programs: dict[str, str] = {}
    if program_key and program_key in embedded.obs:
        annot = embedded.obs[program_key].astype(str).to_numpy()
        for label in perturbations:
            values = pd.Series(annot[labels == label]).value_counts()
            programs[label] = str(values.index[0]) if len(values) else ""
    genes = _gene_lists(top_genes, n_shown)

    blocks = []
    for label in perturbations:
        cells = scores[labels == label]
        if cells.shape[0] < min_cells:
            logger.info("Skipping %s: %d cell(s) < min_cells=%d.", label, cells.shape[0], min_cells)
            continue
        diff, half, p, _ = _welch(cells, control, confidence)
        with np.errstate(divide="ignore", invalid="ignore"):
            std_effect = diff / control_sd
        blocks.append(
            pd.DataFrame(
                {
                    "perturbation": label,
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
                    "program": programs.get(label, ""),
                }
            )
        )
    if not blocks:
        return empty
    table = pd.concat(blocks, ignore_index=True)
    table["q_value"] = _bh(table["p_value"].to_numpy(dtype=float))
    table["significant"] = (table["q_value"] < alpha) & (table["standardised_effect"].abs() >= min_std)
    table["direction"] = np.where(table["effect"] >= 0, "raises", "lowers")
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
    table["_abs"] = table["standardised_effect"].abs().fillna(-1.0)
    table = table.sort_values(["perturbation", "_abs"], ascending=[True, False], kind="stable")
    table["rank"] = table.groupby("perturbation").cumcount() + 1
    return table[EFFECT_COLUMNS].reset_index(drop=True)


def linear_model_metrics(model: LinearVAE, effects: pd.DataFrame) -> dict[str, Any]:
    """Run-level numbers for MLflow: held-out reconstruction log-likelihood, significant effects."""
    meta = model.metadata or {}
    out: dict[str, Any] = {}
    value = meta.get("validation_reconstruction_log_likelihood")
    if value is not None and np.isfinite(value):
        out["validation_reconstruction_log_likelihood"] = {"step": 0, "value": float(value)}
    out["n_factors"] = {"step": 0, "value": float(model.n_latent)}
    if len(effects):
        significant = effects[effects["significant"].astype(bool)]
        out["n_significant_effects"] = {"step": 0, "value": float(len(significant))}
        moved = significant["perturbation"].nunique()
        out["fraction_perturbations_moving_a_factor"] = {
            "step": 0,
            "value": float(moved) / float(effects["perturbation"].nunique()),
        }
    return out


def plot_factor_effects(effects: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """Heatmap of standardised effects (perturbations x factors); dots mark significant cells."""
    max_rows = int((params or {}).get("max_perturbations_plotted", 60))
    if effects is None or len(effects) == 0:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No perturbations: no factor x perturbation effects", ha="center", va="center")
        return fig
    pivot = effects.pivot(index="perturbation", columns="factor", values="standardised_effect")
    factors = sorted(pivot.columns, key=lambda f: int(str(f).split("_")[-1]) if str(f).split("_")[-1].isdigit() else 0)
    pivot = pivot[factors]
    strongest = pivot.abs().max(axis=1).sort_values(ascending=False)
    pivot = pivot.loc[strongest.index[:max_rows]]
    sig = effects.pivot(index="perturbation", columns="factor", values="significant").reindex(
        index=pivot.index, columns=pivot.columns
    )
    values = pivot.to_numpy(dtype=float)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    height = max(3.0, 0.25 * len(pivot) + 1.5)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(factors), height))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    rows, cols = np.nonzero(sig.fillna(False).to_numpy(dtype=bool))
    ax.scatter(cols, rows, s=6, c="black", marker="o")
    ax.set_xticks(range(len(factors)), factors, rotation=90)
    ax.set_yticks(range(len(pivot)), pivot.index)
    ax.set_title("Factor shift vs controls (control SD; dot = significant)")
    fig.colorbar(image, ax=ax, shrink=0.6, label="standardised effect")
    fig.tight_layout()
    return fig
