"""The conditional VAE from an AnnData: :class:`CVAE` around :class:`~perturbscope.models.ConditionalVAE`.

::

    api = CVAE.fit(train_cells, validation_mask, vocabulary=["KLF1", "MAP2K6"], seed=0)
    api.sample_prior(["KLF1+MAP2K6"], n_cells=200)                   # Mode A, AnnData
    api.transfer_controls(api.cell_data(controls), None, ["KLF1"])   # Mode B, AnnData

Predicted cells are AnnData on the log-normalised scale of the processed screen's ``X``:
``layers["expected"]`` holds each cell's ``E[x | z, c]``, ``obs["perturbation"]`` its label,
``obs["mode"]`` ``prior`` or ``controls`` (and ``obs["source_cell"]`` for Mode B).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from perturbscope.models.cvae import ConditionalVAE, Generated
from perturbscope.models.data import CellData, MinibatchSampler
from perturbscope.models.training import TrainConfig
from perturbscope.schema import COUNTS_LAYER, PERTURBATION, PERTURBED_GENES

from .base import ModelAPI

logger = logging.getLogger(__name__)

__all__ = ["CVAE", "scale_factors"]


class CVAE(ModelAPI):
    """Perturbation prediction on AnnData: train on cells with their perturbed genes, generate cells."""

    module_class = ConditionalVAE
    training_defaults = MappingProxyType(
        {
            "max_epochs": 400,
            "validation_batch_size": 512,
            "lr": 1e-3,
            "kl_warmup_epochs": 50,
            "patience": 30,
            "grad_clip": 10.0,
            "precision": "float32",
            "progress": False,
        }
    )
    """Over :class:`~perturbscope.models.TrainConfig`'s: the settings the prediction benchmark ran with
    (bench/prediction.md): a lower learning rate, a 50-epoch KL (beta) warm-up, patience 30, gradient
    clipping at 10, float32; no progress bar (the pipeline trains one model per split)."""

    @classmethod
    def from_vocabulary(
        cls,
        vocabulary: Sequence[str],
        var_names: Sequence[str],
        separator: str = "+",
        seed: int = 0,
        **model: Any,
    ) -> CVAE:
        """An untrained model over the perturbed genes ``vocabulary`` (initialised with ``seed``)."""
        kwargs = cls.model_kwargs(model)
        factory = partial(ConditionalVAE.from_vocabulary, list(vocabulary), list(var_names), separator)
        return cls(cls._build(seed, factory, **kwargs))

    @classmethod
    def fit(
        cls,
        cells: ad.AnnData,
        validation: np.ndarray,
        vocabulary: Sequence[str],
        model: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | TrainConfig | None = None,
        *,
        separator: str = "+",
        seed: int = 0,
        extra_obs: dict[str, Any] | None = None,
    ) -> CVAE:
        """Train on ``cells`` (``obs["perturbed_genes"]``: ``A+B``, ``""`` for controls).

        ``validation`` (bool per cell) marks the cells that drive early stopping; every other cell trains.
        ``model``: :class:`~perturbscope.models.ConditionalVAE` arguments; ``training``:
        :class:`~perturbscope.models.TrainConfig` fields over :meth:`train_config`'s defaults.
        """
        config = cls.train_config(training, seed)
        api = cls.from_vocabulary(vocabulary, cells.var_names, separator, seed=config.seed, **dict(model or {}))
        validation = np.asarray(validation, dtype=bool)
        data = api.cell_data(cells, extra_obs=extra_obs)
        train_sampler = MinibatchSampler(
            data, ~validation, batch_size=config.batch_size, shuffle=True, seed=config.seed
        )
        val_sampler = (
            MinibatchSampler(data, validation, batch_size=config.validation_batch_size, shuffle=False)
            if validation.any()
            else None
        )
        logger.info(
            "Training ConditionalVAE (%s likelihood) on %d cells (%d validation), %d perturbed genes.",
            api.module.likelihood,
            int((~validation).sum()),
            int(validation.sum()),
            len(vocabulary),
        )
        api._fit(train_sampler, val_sampler, config)
        api.module.cpu()
        return api

    def cell_data(  # type: ignore[override] - the cVAE reads its genes by position and its conditions
        self,
        adata: ad.AnnData,
        labels_key: str = PERTURBED_GENES,
        counts_layer: str | None = COUNTS_LAYER,
        extra_obs: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> CellData:
        """:class:`CellData` for this model: ``X`` (Gaussian) or raw counts (NB) and the condition multi-hot.

        ``"gaussian"`` models read the log-normalised ``adata.X``; ``"nb"`` models the raw
        counts in ``adata.layers[counts_layer]`` (``X`` if None). The multi-hot of
        ``adata.obs[labels_key]`` becomes ``obs[condition_key]``. Raises ``ValueError`` for a
        wrong number of genes, missing columns / layers or unknown genes.
        """
        model = self.module
        if adata.n_vars != model.n_genes:
            raise ValueError(
                f"the AnnData has {adata.n_vars} genes but the model was built for {model.n_genes}; "
                "use the same genes (in the same order) as in training"
            )
        if labels_key not in adata.obs:
            raise ValueError(
                f"adata.obs has no {labels_key!r} column with the perturbed genes ('A+B', '' for controls); "
                f"columns: {list(map(str, adata.obs.columns))}"
            )
        if model.likelihood == "gaussian" or counts_layer is None:
            matrix = adata.X
        elif counts_layer in adata.layers:
            matrix = adata.layers[counts_layer]
        else:
            raise ValueError(
                f"likelihood='nb' needs raw counts but adata.layers has no {counts_layer!r} "
                f"(layers: {list(adata.layers.keys())}); pass counts_layer"
            )
        obs = {model.condition_key: model.encode_conditions(adata.obs[labels_key].astype(str).tolist())}
        obs.update(extra_obs or {})
        return CellData(matrix, obs=obs, device=device)

    # ------------------------------------------------------------------ generation
    def _to_anndata(self, cells: Generated, mode: str) -> ad.AnnData:
        model = self.module
        names = model.metadata.get("var_names")
        if not names or len(names) != model.n_genes:
            names = [f"gene_{i}" for i in range(model.n_genes)]
        labels = cells.labels
        obs = pd.DataFrame({PERTURBATION: pd.Categorical(labels, categories=list(dict.fromkeys(labels))), "mode": mode})
        if cells.source is not None:
            obs["source_cell"] = cells.source
        obs.index = [f"{mode}_{i}" for i in range(len(labels))]
        return ad.AnnData(
            X=cells.x, obs=obs, var=pd.DataFrame(index=pd.Index(names, dtype=str)), layers={"expected": cells.expected}
        )

    def sample_prior(self, perturbations: Sequence[str], n_cells: int = 200, **kwargs: Any) -> ad.AnnData:
        """Mode A (:meth:`ConditionalVAE.generate_prior`) as AnnData (``obs["mode"] = "prior"``)."""
        return self._to_anndata(self.module.generate_prior(perturbations, n_cells, **kwargs), "prior")

    def transfer_controls(
        self, data: CellData, control_idx: Any, perturbations: Sequence[str], n_cells: int | None = None, **kwargs: Any
    ) -> ad.AnnData:
        """Mode B (:meth:`ConditionalVAE.generate_from_controls`) as AnnData (``obs["mode"] = "controls"``,
        ``obs["source_cell"]``: position of the control cell in ``data``)."""
        cells = self.module.generate_from_controls(data, control_idx, perturbations, n_cells, **kwargs)
        return self._to_anndata(cells, "controls")


def scale_factors(adata: ad.AnnData, counts_layer: str = COUNTS_LAYER) -> np.ndarray:
    """Per-cell scale ``s`` with ``X = log1p(counts * s)`` (the processed screen's normalisation).

    Computed as ``sum(expm1(X)) / sum(counts)`` per cell (exact when ``X`` is ``log1p`` of
    ``counts`` times a per-cell factor); cells without counts get the median scale.
    """
    x = adata.X
    expm1 = x.copy() if sp.issparse(x) else np.asarray(x, dtype=np.float64).copy()
    if sp.issparse(expm1):
        expm1 = expm1.astype(np.float64)
        expm1.data = np.expm1(expm1.data)
    else:
        expm1 = np.expm1(expm1)
    num = np.asarray(expm1.sum(axis=1)).reshape(-1)
    if counts_layer not in adata.layers:
        raise ValueError(
            f"adata.layers has no {counts_layer!r} layer with raw counts (layers: {list(adata.layers.keys())})"
        )
    den = np.asarray(adata.layers[counts_layer].sum(axis=1), dtype=np.float64).reshape(-1)
    ok = den > 0
    out = np.full(adata.n_obs, np.nan)
    out[ok] = num[ok] / den[ok]
    out[~ok] = float(np.median(out[ok])) if ok.any() else 1.0
    return out
