"""The LDVAE from an AnnData: :class:`LDVAE` around :class:`~perturbscope.models.LinearVAE`.

::

    api = LDVAE.fit(processed_screen, seed=0)             # every cell, oriented factors
    api.loadings()                                        # gene column + factor_1 ... factor_K
    LDVAE(catalog.load("linear_model")).embed(adata).obsm["X_ldvae"]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from perturbscope.models._checks import check_choice
from perturbscope.models.data import CellData, MinibatchSampler
from perturbscope.models.linear import ROTATIONS, LinearVAE
from perturbscope.models.runtime import torch_threads
from perturbscope.models.training import TrainConfig
from perturbscope.schema import SPLIT, VALIDATION

from .base import ModelAPI, training_summary
from .inputs import (
    BATCH_OBS_KEY,
    ModelInputError,
    annotated_copy,
    raw_counts,
    readable,
    screen_metadata,
    training_batches,
)

logger = logging.getLogger(__name__)

__all__ = ["LATENT_KEY", "LDVAE", "LOADINGS_KEY", "loadings_matrix"]

LATENT_KEY = "X_ldvae"
"""``obsm`` key of the factor scores."""
LOADINGS_KEY = "ldvae_loadings"
"""``varm`` key of the loadings in an embedded screen."""

_COUNTS_HINT = "The LDVAE models counts: run the data_processing pipeline (it keeps raw counts in layers['counts'])."


def _validation_mask(screen: ad.AnnData) -> np.ndarray:
    if SPLIT in screen.obs:
        return (screen.obs[SPLIT].astype(str) == VALIDATION).to_numpy()
    logger.warning("The screen has no obs['split']: training on every cell, no early stopping.")
    return np.zeros(screen.n_obs, dtype=bool)


def loadings_matrix(loadings: pd.DataFrame) -> pd.DataFrame:
    """Genes x factors (float) from a loadings table: the ``gene`` column (or the index) and
    the ``factor_*`` columns (every numeric column of a table without them)."""
    frame = loadings.set_index("gene") if "gene" in loadings.columns else loadings
    factors = [c for c in frame.columns if str(c).startswith("factor_")]
    matrix = frame[factors] if factors else frame.select_dtypes(include=[np.number])
    if not len(matrix.columns):
        raise ModelInputError(f"The loadings table has no factor_* columns (columns: {list(loadings.columns)}).")
    return matrix.astype(float)


class LDVAE(ModelAPI):
    """The linearly decoded VAE on AnnData: factors whose loadings name the genes they move."""

    module_class = LinearVAE
    training_defaults = MappingProxyType({"max_epochs": 400, "kl_warmup_epochs": 100, "precision": "float32"})
    """Over :class:`~perturbscope.models.TrainConfig`'s: an epoch is every training cell once (of
    ``reference_epoch_cells`` cells at most: larger screens train fewer epochs); a long KL warm-up; float32,
    in which its benchmark and tests ran. Torch's threads (on an idle 2-core machine 2 threads trained
    1.4x faster than 1, 3 runs each on a 19,062-cell screen); on a busy machine ``num_threads: 1`` can be
    much faster."""
    counts_hint = _COUNTS_HINT

    def cell_data(
        self, adata: ad.AnnData, counts_layer: str | None = None, fill_missing: bool | None = None
    ) -> CellData:
        """A screen's raw counts for this module (genes by name; missing genes raise)."""
        return super().cell_data(adata, counts_layer, fill_missing)

    @classmethod
    def fit(
        cls,
        screen: ad.AnnData,
        model: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | TrainConfig | None = None,
        *,
        rotation: str = "promax",
        batch_key: str | None = None,
        seed: int = 0,
    ) -> LDVAE:
        """Train the LDVAE on every cell of the screen (controls and perturbed alike).

        ``model``: :class:`~perturbscope.models.LinearVAE` arguments; ``training``:
        :class:`~perturbscope.models.TrainConfig` fields over :meth:`train_config`'s defaults.
        ``obs["split"] == "validation"`` cells are held out for early stopping, the restored weights and
        the held-out reconstruction log-likelihood; raw counts come from ``layers["counts"]``;
        ``batch_key`` becomes the batch covariate. The decoder intercepts start at the genes' average
        expression; after training the factors are oriented for reading (:meth:`LinearVAE.orient` with
        ``rotation``: unit SD over all cells, ordered by explained variance). The module ends in eval mode
        on the CPU.
        """
        kwargs, config = cls.model_kwargs(model), cls.train_config(training, seed)
        check_choice("rotation", rotation, ROTATIONS)
        screen = readable(screen)
        if screen.n_obs < 2:
            raise ModelInputError(f"The screen has {screen.n_obs} cell(s); the LDVAE needs at least 2.")
        categories, obs = training_batches(screen, batch_key)
        data = CellData(raw_counts(screen, None, _COUNTS_HINT), obs=obs)
        if np.any(data.library <= 0):
            logger.warning("%d cell(s) have no counts at all.", int(np.sum(data.library <= 0)))

        is_val = _validation_mask(screen)
        train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        if train_idx.size == 0:
            raise ModelInputError(
                "Every cell is in the validation split (obs['split'] == 'validation'): hold fewer cells out."
            )
        n_batch = len(categories)
        if kwargs.get("library") == "learned":
            mean, var = data.library_prior(train_idx, BATCH_OBS_KEY if n_batch else None, n_batch)
            kwargs.update(library_log_mean=mean, library_log_var=var)
        api = cls(cls._build(seed, n_genes=data.n_genes, n_batch=n_batch, batch_key=BATCH_OBS_KEY, **kwargs))
        module = api.module
        module.init_intercepts(data, train_idx)

        train = MinibatchSampler(data, train_idx, batch_size=config.batch_size, seed=seed)
        val = (
            MinibatchSampler(data, val_idx, batch_size=config.validation_batch_size, shuffle=False)
            if val_idx.size
            else None
        )
        if val is None:
            logger.warning("No validation cells: training %d epochs without early stopping.", config.max_epochs)
        logger.info(
            "Training the LDVAE (%d factors) on %d cells (%d for validation), %d genes.",
            module.n_latent,
            train_idx.size,
            val_idx.size,
            data.n_genes,
        )
        with torch_threads(config.num_threads):  # also for orienting and scoring after training
            history = api._fit(train, val, config)
            module.cpu().eval()
            data.to("cpu")
            module.orient(data, rotation=rotation)
            held_out = float("nan")
            if val_idx.size:
                held_out = float(np.mean(module.reconstruction_log_likelihood(data, val_idx)))
        module.metadata = {
            **screen_metadata(screen, batch_key, categories),
            "rotation": rotation,
            "n_train_cells": int(train_idx.size),
            "n_validation_cells": int(val_idx.size),
            "validation_reconstruction_log_likelihood": held_out,
            **training_summary(history, config),
        }
        logger.info(
            "Trained %d epochs (best %s, %.3f s/epoch); held-out reconstruction log-likelihood %.2f per cell.",
            len(history),
            history.best_epoch,
            float(np.mean(history.seconds)),
            held_out,
        )
        return api

    def embed(self, adata: ad.AnnData, batch_size: int = 1024) -> ad.AnnData:
        """A copy of ``adata`` with the factor scores in ``obsm["X_ldvae"]``.

        Genes are matched by name to the model's; raw counts come from
        ``layers["counts"]`` or ``X``. The loadings go to ``varm["ldvae_loadings"]`` (NaN
        for genes the model lacks) and the factor names to ``uns["ldvae"]["factors"]``.
        Raises :class:`~perturbscope.models.model.ModelInputError` for missing genes (named), unknown batches or no
        raw counts.
        """
        model = self.module
        adata = readable(adata)
        data = self.cell_data(adata)
        out = annotated_copy(adata)
        out.obsm[LATENT_KEY] = model.embed(data, batch_size=int(batch_size))
        genes = (model.metadata or {}).get("genes")
        loadings = model.loadings(genes)
        if genes is None or list(genes) == [str(g) for g in out.var_names]:
            out.varm[LOADINGS_KEY] = loadings.to_numpy(dtype=np.float32)
        else:  # the model's genes are a subset / another order
            out.varm[LOADINGS_KEY] = loadings.reindex([str(g) for g in out.var_names]).to_numpy(dtype=np.float32)
        out.uns["ldvae"] = {"factors": model.factor_names, "latent_key": LATENT_KEY}
        return out

    def loadings(self) -> pd.DataFrame:
        """Genes x factors: a ``gene`` column, then ``factor_1 ... factor_K`` (natural-log
        expression change per SD of the factor over the screen's cells)."""
        return self.module.loadings().reset_index()
