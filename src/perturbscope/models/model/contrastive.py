"""contrastiveVI from an AnnData: :class:`ContrastiveVI` around :class:`~perturbscope.models.ContrastiveVAE`.

::

    api = ContrastiveVI.fit(processed_screen, seed=0)       # controls = background, the rest = targets
    embedded = api.embed(other_screen)                      # obsm["X_salient"], obsm["X_background"]
    embed_screen(catalog.load("contrastive_model"), adata)  # the same, from a stored module
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.data import CellData, PairedSampler, StreamingCellData
from perturbscope.models.escape import EscapeMixture, fit_escape_mixture
from perturbscope.schema import CONTROL, IS_CONTROL, PERTURBATION, SPLIT, UNPERTURBED, VALIDATION

from .base import ModelAPI, training_summary
from .inputs import (
    BATCH_OBS_KEY,
    raw_counts,
    screen_metadata,
    training_batches,
    training_cells,
)
from .inputs import (
    align_counts as _align_counts,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND_KEY",
    "ContrastiveModelError",
    "ContrastiveVI",
    "SALIENT_KEY",
    "UMAP_KEYS",
    "PERTURBED_PROBABILITY",
    "CALLED_PERTURBED",
    "align_counts",
    "cell_groups",
    "embed_screen",
]

SALIENT_KEY, BACKGROUND_KEY = "X_salient", "X_background"
"""``obsm`` keys of the two latent spaces (posterior means)."""
UMAP_KEYS = {"salient": "X_umap_salient", "background": "X_umap_background"}
"""``obsm`` keys of the UMAPs of both spaces."""
PERTURBED_PROBABILITY, CALLED_PERTURBED = "perturbed_probability", "called_perturbed"
"""``obs`` keys written by a model with an escape mixture: each target cell's probability of
having been perturbed (0 for controls; NaN for perturbations too rare to fit), and whether a
target cell is called perturbed (probability above the threshold)."""
ESCAPE_METADATA = "escape_mixture"
"""``module.metadata`` key of the fitted :class:`~perturbscope.models.escape.EscapeMixture`."""
_NULL_MIN_CELLS = 20

_COUNTS_HINT = "contrastiveVI models counts: pass counts_layer= the layer with raw counts."


class ContrastiveModelError(ValueError):
    """Bad parameters or input for the contrastive model; the message names the fix."""


def align_counts(
    adata: ad.AnnData, genes: list[str], counts_layer: str | None = None, fill_missing: bool = False
) -> sp.csr_matrix:
    """Raw counts of ``adata`` with columns reordered to ``genes`` (matched by name).

    ``counts_layer``: the layer with raw counts (None: ``layers["counts"]`` if present, else
    ``X``); ``fill_missing``: fill genes the screen lacks with zeros (logged) instead of
    raising :class:`ContrastiveModelError` naming them.
    """
    counts = raw_counts(adata, counts_layer, ContrastiveModelError, _COUNTS_HINT)
    return _align_counts(counts, adata.var_names, genes, ContrastiveModelError, fill_missing)


def cell_groups(screen: ad.AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(is_control, is_target, is_validation)`` masks of a processed screen, with clear errors."""
    obs = screen.obs
    if IS_CONTROL not in obs and PERTURBATION not in obs:
        raise ContrastiveModelError(
            "The screen has neither obs['is_control'] nor obs['perturbation']: run the data_processing "
            "pipeline first (it labels control and target cells)."
        )
    is_control, is_target = _control_target(screen)
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
            f"{sorted(map(str, obs[PERTURBATION].unique()))[:10] if PERTURBATION in obs else '?'})."
        )
    if SPLIT in obs:
        is_val = (obs[SPLIT].astype(str) == VALIDATION).to_numpy()
    else:
        logger.warning("The screen has no obs['split']: training on every cell, no early stopping.")
        is_val = np.zeros(screen.n_obs, dtype=bool)
    return is_control, is_target, is_val


def _control_target(adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
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


def _umap(adata: ad.AnnData, obsm_key: str, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    holder = ad.AnnData(np.zeros((adata.n_obs, 0), dtype=np.float32))
    holder.obsm["X_space"] = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
    k = max(2, min(int(n_neighbors), adata.n_obs - 1))
    sc.pp.neighbors(holder, n_neighbors=k, use_rep="X_space", random_state=seed)
    sc.tl.umap(holder, min_dist=float(min_dist), random_state=seed)
    return holder.obsm["X_umap"].astype(np.float32)


class ContrastiveVI(ModelAPI):
    """contrastiveVI on AnnData: controls are the background, every other cell a target."""

    module_class = ContrastiveVAE
    error = ContrastiveModelError
    section = "contrastive_model"
    counts_hint = _COUNTS_HINT

    @classmethod
    def fit(
        cls,
        screen: ad.AnnData,
        model_params: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | None = None,
        *,
        shared_training: Mapping[str, Any] | None = None,
        batch_key: str | None = None,
        seed: int = 0,
        callback: Callable[[int, Any, ContrastiveVAE], bool | None] | None = None,
        escape: Mapping[str, Any] | None = None,
    ) -> ContrastiveVI:
        """Train contrastiveVI on a processed screen, then call its escapers.

        ``obs["split"] == "validation"`` cells drive early stopping and the restored
        weights; raw counts come from ``layers["counts"]``; ``batch_key``, when set, is a
        one-hot covariate of encoders and decoder. ``callback`` goes to
        :func:`~perturbscope.models.fit` (e.g. to score the embedding every few epochs).
        ``escape``: settings of the escape mixture fitted after training
        (:mod:`perturbscope.models.escape`; ``enabled``, ``min_cells``, ``min_separation``,
        ``folds``; default enabled), stored in ``metadata["escape_mixture"]``.
        The module ends in eval mode on the CPU; its ``metadata`` holds the genes, batch
        categories and training summary.
        """
        kwargs, config, batch_size, val_batch_size = cls._settings(model_params, training, shared_training, seed)
        is_control, is_target, is_val = cell_groups(screen)
        categories, obs = training_batches(screen, batch_key, ContrastiveModelError)
        # the counts go to the training device once (CUDA when available with device: auto), or stream
        data = training_cells(screen, obs, config, ContrastiveModelError, _COUNTS_HINT)

        train_bg, train_tg = np.flatnonzero(is_control & ~is_val), np.flatnonzero(is_target & ~is_val)
        val_bg, val_tg = np.flatnonzero(is_control & is_val), np.flatnonzero(is_target & is_val)
        if train_tg.size == 0 or train_bg.size == 0:
            raise ContrastiveModelError(
                f"No {'target' if train_tg.size == 0 else 'control'} cells in the training split: lower "
                "data_processing.split.validation_fraction."
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
            data, bg_of[train_bg], train_tg, batch_size=batch_size, seed=seed, background_data=background
        )
        val = None
        if val_bg.size and val_tg.size:
            val = PairedSampler(
                data,
                bg_of[val_bg],
                val_tg,
                batch_size=val_batch_size,
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
        escape = dict(escape or {})
        mixture = None
        if escape.pop("enabled", True) and PERTURBATION in screen.obs:
            # the training data, now on the module's device (the CPU): no second read of the counts
            mixture = api._fit_escape(data.to("cpu"), screen, val_bg, train_bg, is_target, val_batch_size, seed, escape)
        api.module.metadata = {
            **({ESCAPE_METADATA: mixture.to_dict()} if mixture is not None else {}),
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

    def _fit_escape(
        self,
        data: CellData,
        screen: ad.AnnData,
        val_bg: np.ndarray,
        train_bg: np.ndarray,
        is_target: np.ndarray,
        batch_size: int,
        seed: int,
        settings: Mapping[str, Any],
    ) -> EscapeMixture:
        """Fit the escape mixture on the trained model's salient codes (null: held-out controls)."""
        unknown = set(settings) - {"min_cells", "min_separation", "folds"}
        if unknown:
            raise ContrastiveModelError(
                f"Unknown contrastive_model.escape settings {sorted(unknown)}: use enabled, min_cells, "
                "min_separation and folds."
            )
        null = val_bg
        if null.size < _NULL_MIN_CELLS:
            logger.warning(
                "Only %d validation controls: the escape mixture's null uses the training controls, which the "
                "model pulled to 0, so escapers may be called perturbed. Raise "
                "data_processing.split.validation_fraction.",
                null.size,
            )
            null = np.concatenate([val_bg, train_bg])
        _, salient = self.module.embed(data, batch_size=batch_size)
        labels = screen.obs[PERTURBATION].astype(str).to_numpy()
        try:
            mixture, _ = fit_escape_mixture(
                salient[is_target], labels[is_target], salient[null], seed=seed, **{k: settings[k] for k in settings}
            )
        except (TypeError, ValueError) as err:
            raise ContrastiveModelError(f"contrastive_model.escape: {err}") from None
        called = sum(int(round(w * n)) for w, n in zip(mixture.weight, mixture.n_cells, strict=True))
        logger.info(
            "Escape mixture on %d perturbations (null: %d held-out controls): about %d of %d target cells "
            "perturbed; %d perturbations call nobody.",
            len(mixture.perturbations),
            null.size,
            called,
            int(is_target.sum()),
            int((mixture.weight == 0).sum()),
        )
        return mixture

    @property
    def escape_mixture(self) -> EscapeMixture | None:
        """The fitted escape mixture (None for a model trained without it)."""
        stored = (self.module.metadata or {}).get(ESCAPE_METADATA)
        return EscapeMixture.from_dict(stored) if stored else None

    def perturbed_probability(self, embedded: ad.AnnData) -> np.ndarray | None:
        """Each cell's probability of having been perturbed, from ``obsm["X_salient"]`` and its label.

        0 for controls, NaN for target cells whose perturbation has no fitted mixture (too rare,
        or unseen in training); None for a model without an escape mixture or a screen without
        ``obs["perturbation"]``.
        """
        mixture = self.escape_mixture
        if mixture is None or PERTURBATION not in embedded.obs:
            return None
        probability = mixture.probability(embedded.obsm[SALIENT_KEY], embedded.obs[PERTURBATION].astype(str))
        is_control, is_target = _control_target(embedded)
        probability[is_control] = 0.0
        probability[~is_control & ~is_target] = np.nan
        return probability

    def embed(
        self,
        adata: ad.AnnData,
        counts_layer: str | None = None,
        fill_missing: bool = False,
        batch_size: int = 1024,
        umap: bool = False,
        n_neighbors: int = 15,
        min_dist: float = 0.5,
        seed: int = 0,
        call_threshold: float = 0.5,
        umap_max_cells: int | None = None,
    ) -> ad.AnnData:
        """A copy of ``adata`` with ``obsm["X_salient"]`` and ``obsm["X_background"]``.

        A model with an escape mixture also writes ``obs["perturbed_probability"]``
        (:meth:`perturbed_probability`) and ``obs["called_perturbed"]`` (target cells whose
        probability exceeds ``call_threshold``; False for controls).

        Genes are matched by name to the model's training genes (extra genes are
        ignored; missing ones raise, or are zero with ``fill_missing``). Raw counts come
        from ``layers[counts_layer]``, ``layers["counts"]`` or ``X``. Controls sit near 0
        in the salient space. ``umap``: also ``obsm["X_umap_salient"]`` and
        ``obsm["X_umap_background"]`` (``n_neighbors``, ``min_dist``, ``seed``); on a screen with
        more than ``umap_max_cells`` cells the UMAPs are of that many cells drawn with ``seed``
        (the other rows are NaN). A screen read from disk (:class:`~perturbscope.ondisk.OnDiskScreen`)
        streams through the model and comes back as one, with the embeddings in memory.
        """
        data = self.cell_data(adata, counts_layer, fill_missing)
        background, salient = self.module.embed(data, batch_size=batch_size)
        out = adata.copy()
        out.obsm[BACKGROUND_KEY] = background
        out.obsm[SALIENT_KEY] = salient
        probability = self.perturbed_probability(out)
        if probability is not None:
            out.obs[PERTURBED_PROBABILITY] = probability.astype(np.float32)
            with np.errstate(invalid="ignore"):
                out.obs[CALLED_PERTURBED] = _control_target(out)[1] & (probability > float(call_threshold))
        if umap:
            keep = None
            if umap_max_cells is not None and out.n_obs > int(umap_max_cells):
                keep = np.sort(np.random.default_rng(seed).choice(out.n_obs, int(umap_max_cells), replace=False))
                logger.info(
                    "UMAPs of %s of the %s cells (contrastive_model.embedding.umap_max_cells).",
                    f"{keep.size:,}",
                    f"{out.n_obs:,}",
                )
            for space, key in UMAP_KEYS.items():
                if keep is None:
                    out.obsm[key] = _umap(out, f"X_{space}", n_neighbors, min_dist, seed)
                    continue
                part = ad.AnnData(np.zeros((keep.size, 0), dtype=np.float32))
                part.obsm[f"X_{space}"] = out.obsm[f"X_{space}"][keep]
                coordinates = np.full((out.n_obs, 2), np.nan, dtype=np.float32)
                coordinates[keep] = _umap(part, f"X_{space}", n_neighbors, min_dist, seed)
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
            raise ContrastiveModelError("weights must be one finite, non-negative number per cell of idx")
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


def embed_screen(model: ContrastiveVAE, adata: ad.AnnData, **kwargs: Any) -> ad.AnnData:
    """:meth:`ContrastiveVI.embed` of a stored module (e.g. ``catalog.load("contrastive_model")``).

    Raises :class:`ContrastiveModelError` for missing genes (named), unknown batches or
    no raw counts.
    """
    return ContrastiveVI(model).embed(adata, **kwargs)
