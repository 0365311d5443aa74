"""contrastiveVI from an AnnData: :class:`ContrastiveVI` around :class:`~perturbscope.models.ContrastiveVAE`,
and the escapers called from its salient space.

::

    api = ContrastiveVI.fit(processed_screen, seed=0)   # controls = background, the rest = targets
    embedded = api.embed(other_screen)                  # obsm["X_salient"], obsm["X_background"]
    mixture = fit_escapers(embedded, seed=0)            # Mixscape's mixture per perturbation
    calls = call_escapers(embedded, mixture)            # perturbed_probability, called_perturbed per cell
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from perturbscope import neighbours
from perturbscope.blocks import BlockScreen
from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.data import CellData, PairedSampler, StreamingCellData
from perturbscope.models.escape import EscapeMixture, fit_escape_mixture
from perturbscope.models.training import TrainConfig
from perturbscope.schema import CONTROL, IS_CONTROL, PERTURBATION, SPLIT, UNPERTURBED, VALIDATION

from .base import ModelAPI, training_summary
from .inputs import (
    BATCH_OBS_KEY,
    ModelInputError,
    annotated_copy,
    readable,
    screen_metadata,
    training_batches,
    training_cells,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND_KEY",
    "CALLED_PERTURBED",
    "PERTURBED_PROBABILITY",
    "SALIENT_KEY",
    "UMAP_KEYS",
    "ContrastiveVI",
    "call_escapers",
    "cell_groups",
    "control_target",
    "fit_escapers",
]

SALIENT_KEY, BACKGROUND_KEY = "X_salient", "X_background"
"""``obsm`` keys of the two latent spaces (posterior means)."""
UMAP_KEYS = {"salient": "X_umap_salient", "background": "X_umap_background"}
"""``obsm`` keys of the UMAPs of both spaces."""
PERTURBED_PROBABILITY, CALLED_PERTURBED = "perturbed_probability", "called_perturbed"
"""Columns of :func:`call_escapers`: each target cell's probability of having been perturbed (0 for
controls; NaN for perturbations too rare to fit), and whether it is called perturbed (probability above
the threshold)."""
NULL_MIN_CELLS = 20
"""Fewer held-out controls than this: the escape null also uses the training controls."""

_COUNTS_HINT = "contrastiveVI models counts: pass counts_layer= the layer with raw counts."


def cell_groups(screen: ad.AnnData | BlockScreen) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(is_control, is_target, is_validation)`` masks of a processed screen, with clear errors."""
    obs = screen.obs
    if IS_CONTROL not in obs and PERTURBATION not in obs:
        raise ModelInputError(
            "The screen has neither obs['is_control'] nor obs['perturbation']: contrastiveVI needs each cell "
            "marked as a control or a target (the data_processing pipeline labels them)."
        )
    is_control, is_target = control_target(screen)
    if not is_target.any():
        raise ModelInputError(
            "The screen has no target (perturbed) cells: contrastiveVI contrasts perturbed cells with "
            "controls, and every cell here is a control or unperturbed."
        )
    if not is_control.any():
        labels = sorted(map(str, obs[PERTURBATION].unique()))[:10] if PERTURBATION in obs else "?"
        raise ModelInputError(
            "The screen has no control cells (obs['is_control'], or obs['perturbation'] == 'control'): "
            f"contrastiveVI needs non-targeting controls as the background. Labels present: {labels}."
        )
    if SPLIT in obs:
        is_val = (obs[SPLIT].astype(str) == VALIDATION).to_numpy()
    else:
        logger.warning("The screen has no obs['split']: training on every cell, no early stopping.")
        is_val = np.zeros(screen.n_obs, dtype=bool)
    return is_control, is_target, is_val


def control_target(adata: ad.AnnData | BlockScreen) -> tuple[np.ndarray, np.ndarray]:
    """``(is_control, is_target)`` of any screen: targets are neither controls nor unperturbed
    (without labels every cell is a target)."""
    obs = adata.obs
    if IS_CONTROL in obs:
        is_control = obs[IS_CONTROL].to_numpy().astype(bool)
    elif PERTURBATION in obs:
        is_control = (obs[PERTURBATION].astype(str) == CONTROL).to_numpy()
    else:
        is_control = np.zeros(adata.n_obs, dtype=bool)
    is_target = ~is_control
    if PERTURBATION in obs:
        is_target &= (obs[PERTURBATION].astype(str) != UNPERTURBED).to_numpy()
    return is_control, is_target


def _umap(points: np.ndarray, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    return neighbours.umap(neighbours.neighbour_graph(points, n_neighbors, seed), min_dist, seed)


class ContrastiveVI(ModelAPI):
    """contrastiveVI on AnnData: controls are the background, every other cell a target."""

    module_class = ContrastiveVAE
    training_defaults = MappingProxyType(
        {"max_epochs": 300, "kl_warmup_epochs": 40, "lr_patience": 5, "reference_epoch_cells": 50_000}
    )
    """Over :class:`~perturbscope.models.TrainConfig`'s: an epoch is every training target once; the KL
    warm-up never stops training; the learning rate halves after 6 epochs without a validation improvement,
    because the salient space keeps sorting the programs while the ELBO is flat (simulated penetrance-0.6
    screen: KMeans ARI on the responders 0.926 -> 0.959 at the restored epoch; bench/results/escape_seeds.md).
    For the same reason its epoch counts hold up to 50,000 training targets per epoch, not 10,000: on a
    20,000-cell screen (13,365 training targets) epochs scaled to 10,000 cells trained 45-52 epochs instead
    of 60-69, and the escape calls' AUROC fell from 0.857-0.862 to 0.817-0.861 (3 seeds;
    bench/results/epoch_scaling.md)."""
    counts_hint = _COUNTS_HINT

    @classmethod
    def fit(
        cls,
        screen: ad.AnnData,
        model: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | TrainConfig | None = None,
        *,
        batch_key: str | None = None,
        seed: int = 0,
        callback: Callable[[int, Any, ContrastiveVAE], bool | None] | None = None,
    ) -> ContrastiveVI:
        """Train contrastiveVI on a processed screen.

        ``model``: :class:`~perturbscope.models.ContrastiveVAE` arguments (its defaults otherwise);
        ``training``: :class:`~perturbscope.models.TrainConfig` fields over :meth:`train_config`'s
        defaults. ``obs["split"] == "validation"`` cells drive early stopping and the restored weights; raw
        counts come from ``layers["counts"]``; ``batch_key``, when set, is a one-hot covariate of encoders
        and decoder. ``callback`` goes to :func:`~perturbscope.models.fit` (e.g. to score the embedding
        every few epochs). The module ends in eval mode on the CPU; its ``metadata`` holds the genes, batch
        categories and training summary. Escapers are called afterwards, from the embedding
        (:func:`fit_escapers`).
        """
        kwargs, config = cls.model_kwargs(model), cls.train_config(training, seed)
        screen = readable(screen)
        is_control, is_target, is_val = cell_groups(screen)
        categories, obs = training_batches(screen, batch_key)
        # the counts go to the training device once (CUDA when available with device: auto), or stream
        data = training_cells(
            screen, obs, config.device, config.memory_budget_gb, config.stream_block_size, _COUNTS_HINT
        )
        train_bg, train_tg = np.flatnonzero(is_control & ~is_val), np.flatnonzero(is_target & ~is_val)
        val_bg, val_tg = np.flatnonzero(is_control & is_val), np.flatnonzero(is_target & is_val)
        if train_tg.size == 0 or train_bg.size == 0:
            raise ModelInputError(
                f"No {'target' if train_tg.size == 0 else 'control'} cells outside the validation split "
                "(obs['split'] == 'validation'): hold fewer cells out for validation."
            )
        background, bg_of = data, np.arange(screen.n_obs)
        if isinstance(data, StreamingCellData):
            # the controls are drawn many times per epoch: they stay in memory, the targets stream
            controls = np.flatnonzero(is_control)
            background = data.materialise(controls)
            bg_of = np.full(screen.n_obs, -1)
            bg_of[controls] = np.arange(controls.size)
            logger.info(
                "%s control cells are held in memory (%.2f GB).", f"{controls.size:,}", background.nnz * 16 / 1e9
            )
        n_batch = len(categories)
        if kwargs.get("library") == "learned":
            mean, var = data.library_prior(
                train_bg.tolist() + train_tg.tolist(), BATCH_OBS_KEY if n_batch else None, n_batch
            )
            kwargs.update(library_log_mean=mean, library_log_var=var)
        api = cls(cls._build(seed, n_genes=data.n_genes, n_batch=n_batch, batch_key=BATCH_OBS_KEY, **kwargs))

        train = PairedSampler(
            data, bg_of[train_bg], train_tg, batch_size=config.batch_size, seed=seed, background_data=background
        )
        val = None
        if val_bg.size and val_tg.size:
            val = PairedSampler(
                data,
                bg_of[val_bg],
                val_tg,
                batch_size=config.validation_batch_size,
                shuffle=False,
                seed=seed,
                background_data=background,
            )
        else:
            logger.warning(
                "No validation controls or targets: training %d epochs without early stopping.", config.max_epochs
            )
        logger.info(
            "Training contrastiveVI on %d target and %d control cells (%d / %d for validation), %d genes.",
            train_tg.size,
            train_bg.size,
            val_tg.size,
            val_bg.size,
            data.n_genes,
        )
        history = api._fit(train, val, config, callback=callback)
        api.module.cpu().eval()
        api.module.metadata = {
            **screen_metadata(screen, batch_key, categories),
            "n_target_cells": int(is_target.sum()),
            "n_control_cells": int(is_control.sum()),
            **training_summary(history, config),
        }
        best = api.history.loc[api.history["best"], "val_loss"]
        logger.info(
            "Trained %d epochs (best %s, %.2f s/epoch); validation loss %.4g.",
            len(history),
            history.best_epoch,
            float(np.mean(history.seconds)),
            float(best.iloc[0]) if len(best) else float("nan"),
        )
        return api

    def embed(
        self,
        adata: ad.AnnData | BlockScreen,
        counts_layer: str | None = None,
        fill_missing: bool = False,
        batch_size: int = 1024,
        umap: bool = False,
        n_neighbors: int = 15,
        umap_min_dist: float = 0.5,
        umap_max_cells: int | None = 50_000,
        seed: int = 0,
    ) -> ad.AnnData | BlockScreen:
        """A copy of ``adata`` with ``obsm["X_salient"]`` and ``obsm["X_background"]`` (posterior means).

        Genes are matched by name to the model's training genes (extra genes are ignored; missing ones
        raise, or are zero with ``fill_missing``). Raw counts come from ``layers[counts_layer]``,
        ``layers["counts"]`` or ``X``. Controls sit near 0 in the salient space. ``umap``: also
        ``obsm["X_umap_salient"]`` and ``obsm["X_umap_background"]`` (``n_neighbors``, ``umap_min_dist``,
        ``seed``); on a screen with more than ``umap_max_cells`` cells the UMAPs are of that many cells
        drawn with ``seed`` (the other rows are NaN; None = every cell). A screen read from disk
        (:class:`~perturbscope.blocks.BlockScreen`) streams through the model and comes back as one, with
        the embeddings in memory.
        """
        adata = readable(adata)
        data = self.cell_data(adata, counts_layer, fill_missing)
        background, salient = self.module.embed(data, batch_size=batch_size)
        out = annotated_copy(adata)
        out.obsm[BACKGROUND_KEY] = background
        out.obsm[SALIENT_KEY] = salient
        if umap:
            keep = None
            if umap_max_cells is not None and out.n_obs > int(umap_max_cells):
                keep = np.sort(np.random.default_rng(seed).choice(out.n_obs, int(umap_max_cells), replace=False))
                logger.info("UMAPs of %s of the %s cells (umap_max_cells).", f"{keep.size:,}", f"{out.n_obs:,}")
            for space, key in UMAP_KEYS.items():
                points = out.obsm[f"X_{space}"] if keep is None else out.obsm[f"X_{space}"][keep]
                coordinates = _umap(points, n_neighbors, umap_min_dist, seed)
                if keep is not None:
                    full = np.full((out.n_obs, 2), np.nan, dtype=np.float32)
                    full[keep] = coordinates
                    coordinates = full
                out.obsm[key] = coordinates
        return out

    def salient_log_fold_change(
        self,
        data: CellData,
        idx: np.ndarray,
        scale: float = 1e4,
        pseudocount: float = 0.01,
        batch_size: int = 1024,
        weights: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Per gene, what the salient code does to the decoded expression of cells ``idx``.

        Every cell is decoded with its salient code and with ``s = 0`` (same background);
        ``lfc = log2((with + c) / (without + c))`` on expression per ``scale`` counts.
        Returns ``mean_log2fc``, ``fraction_same_direction`` (cells whose lfc has the sign
        of the mean), ``mean_with_salient`` and ``mean_without_salient`` (per ``scale``).
        ``weights`` (one per cell of ``idx``, e.g. each cell's probability of having been
        perturbed) turn every mean into a weighted mean, so escapers count little.
        """
        n_genes = data.n_genes
        w_all = np.ones(idx.size) if weights is None else np.asarray(weights, dtype=np.float64)
        if w_all.shape != (idx.size,) or not np.all(np.isfinite(w_all)) or (w_all < 0).any():
            raise ModelInputError("weights must be one finite, non-negative number per cell of idx")
        if w_all.sum() <= 0:
            w_all = np.ones(idx.size)
        sums, positive = np.zeros(n_genes), np.zeros(n_genes)
        with_sum, without_sum = np.zeros(n_genes), np.zeros(n_genes)
        for start in range(0, idx.size, batch_size):
            chunk = idx[start : start + batch_size]
            w = w_all[start : start + batch_size, None]
            with_s, without_s = self.module.salient_expression(data, chunk, batch_size=batch_size)
            with_s = with_s.astype(np.float64) * scale
            without_s = without_s.astype(np.float64) * scale
            lfc = np.log2(with_s + pseudocount) - np.log2(without_s + pseudocount)
            sums += (w * lfc).sum(0)
            positive += (w * (lfc > 0)).sum(0)
            with_sum += (w * with_s).sum(0)
            without_sum += (w * without_s).sum(0)
        n = w_all.sum()
        mean_lfc = sums / n
        up_share = positive / n
        return {
            "mean_log2fc": mean_lfc,
            "fraction_same_direction": np.where(mean_lfc >= 0, up_share, 1.0 - up_share),
            "mean_with_salient": with_sum / n,
            "mean_without_salient": without_sum / n,
        }


# ---------------------------------------------------------------------------------- escapers
def fit_escapers(
    embedded: ad.AnnData | BlockScreen,
    min_cells: int = 20,
    min_separation: float = 1.0,
    folds: int = 5,
    seed: int = 0,
) -> EscapeMixture:
    """Fit the escape mixture (:mod:`perturbscope.models.escape`) on an embedded screen's salient codes.

    One two-component mixture per perturbation with at least ``min_cells`` target cells; its null is the
    salient code of the held-out (validation) controls, which the model did not train on (with fewer
    than 20 of them the training controls join, with a warning). ``min_separation``: components closer
    than this many null sds call nobody; ``folds``: folds of the cross-fitted directions; ``seed``: their
    draw.
    """
    if SALIENT_KEY not in embedded.obsm or PERTURBATION not in embedded.obs:
        raise ModelInputError(
            "The escape mixture needs an embedded screen: obsm['X_salient'] (ContrastiveVI.embed) and "
            "obs['perturbation']."
        )
    is_control, is_target, is_val = cell_groups(embedded)
    null = np.flatnonzero(is_control & is_val)
    if null.size < NULL_MIN_CELLS:
        logger.warning(
            "Only %d held-out (validation) controls: the escape mixture's null also uses the training controls, "
            "which the model pulled to 0, so escapers may be called perturbed. Hold more controls out.",
            null.size,
        )
        null = np.concatenate([null, np.flatnonzero(is_control & ~is_val)])
    salient = np.asarray(embedded.obsm[SALIENT_KEY])
    labels = embedded.obs[PERTURBATION].astype(str).to_numpy()
    mixture, _ = fit_escape_mixture(
        salient[is_target],
        labels[is_target],
        salient[null],
        min_cells=min_cells,
        min_separation=min_separation,
        folds=folds,
        seed=seed,
    )
    called = sum(int(round(w * n)) for w, n in zip(mixture.weight, mixture.n_cells, strict=True))
    logger.info(
        "Escape mixture on %d perturbations (null: %d controls): about %d of %d target cells perturbed; "
        "%d perturbations call nobody.",
        len(mixture.perturbations),
        null.size,
        called,
        int(is_target.sum()),
        int((mixture.weight == 0).sum()),
    )
    return mixture


def call_escapers(
    embedded: ad.AnnData | BlockScreen, mixture: EscapeMixture, call_threshold: float = 0.5
) -> pd.DataFrame:
    """Per cell: ``perturbed_probability`` (0 for controls, NaN for a target cell whose perturbation has no
    fitted mixture) and ``called_perturbed`` (a target cell above ``call_threshold``), indexed like ``obs``.
    """
    probability = mixture.probability(embedded.obsm[SALIENT_KEY], embedded.obs[PERTURBATION].astype(str))
    is_control, is_target = control_target(embedded)
    probability[is_control] = 0.0
    probability[~is_control & ~is_target] = np.nan
    with np.errstate(invalid="ignore"):
        called = is_target & (probability > float(call_threshold))
    return pd.DataFrame(
        {PERTURBED_PROBABILITY: probability.astype(np.float32), CALLED_PERTURBED: called},
        index=pd.Index(embedded.obs_names.astype(str), name="cell"),
    )
