"""The contract of the AnnData-facing model classes: wrap a torch module, fit it from a screen,
read screens into it, save and load it.

A model class holds one trained module (``.module``, what the Kedro catalog and the MLflow
registry store) and, after :meth:`fit`, its per-epoch history (``.history``)::

    api = ContrastiveVI.fit(screen, {"n_salient": 10}, {"max_epochs": 200}, seed=0)
    api.history                    # pandas, one row per epoch (``best`` marks the kept one)
    api.save("model.pt");  ContrastiveVI.load("model.pt").embed(other_screen)
    ContrastiveVI(catalog.load("contrastive_model"))   # wrap a module from the catalog
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import anndata as ad
import pandas as pd
import torch

from perturbscope.models._checks import ParameterError
from perturbscope.models.base import BaseModel
from perturbscope.models.data import CellData
from perturbscope.models.io import load_model, save_model
from perturbscope.models.training import History, TrainConfig, fit, seeded

from .inputs import model_cell_data, model_kwargs, train_config

__all__ = ["ModelAPI", "training_summary"]


def training_summary(history: History, config: TrainConfig) -> dict[str, Any]:
    """What every trained module records about its training in ``metadata``."""
    return {
        "best_epoch": history.best_epoch,
        "epochs_trained": len(history),
        "stopped_early": bool(history.stopped_early),
        "precision": history.precision,
        "train_config": config.to_dict(),
    }


class ModelAPI:
    """AnnData-facing wrapper of one torch module of :mod:`perturbscope.models`.

    Subclasses set ``module_class`` (the torch module), ``error`` (raised for bad input,
    with a message naming the fix), ``section`` (the Kedro parameter section named in
    messages) and ``counts_hint`` (what to do when raw counts are missing).
    """

    module_class: ClassVar[type[BaseModel]] = BaseModel
    error: ClassVar[type[ValueError]] = ValueError
    section: ClassVar[str] = "model"
    counts_hint: ClassVar[str] = ""

    def __init__(self, module: BaseModel) -> None:
        if not isinstance(module, self.module_class):
            raise TypeError(f"{type(self).__name__} wraps a {self.module_class.__name__}, got {type(module).__name__}.")
        self.module = module
        self.history: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.module!r})"

    @property
    def metadata(self) -> dict[str, Any]:
        """The module's metadata (genes, batches, training summary...)."""
        return self.module.metadata

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Checkpoint of the module (weights, hyperparameters, metadata)."""
        save_model(self.module, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ModelAPI:
        """A model class around the module saved at ``path``."""
        return cls(load_model(path, map_location=map_location))

    # ----------------------------------------------------------------------- data
    def cell_data(
        self, adata: ad.AnnData, counts_layer: str | None = None, fill_missing: bool | None = False
    ) -> CellData:
        """A screen's raw counts as :class:`CellData` for this module: its genes (by name) and batches."""
        return model_cell_data(self.module, adata, self.error, self.counts_hint, counts_layer, fill_missing)

    # ------------------------------------------------------------------- training
    @classmethod
    def _settings(
        cls,
        model_params: Mapping[str, Any] | None,
        training: Mapping[str, Any] | None,
        shared_training: Mapping[str, Any] | None,
        seed: int,
    ) -> tuple[dict[str, Any], TrainConfig, int, int]:
        """Hyperparameters and training settings, checked once (names here, values by the module)."""
        kwargs = model_kwargs(cls.module_class, model_params, f"{cls.section}.model", cls.error)
        config, batch_size, val_batch_size = train_config(
            training, seed, f"{cls.section}.training", cls.error, shared=shared_training
        )
        return kwargs, config, batch_size, val_batch_size

    @classmethod
    def _build(cls, seed: int, factory: Callable[..., BaseModel] | None = None, **kwargs: Any) -> BaseModel:
        """The module (``factory(**kwargs)``, default the module class), initialised reproducibly;
        a bad hyperparameter names its parameter."""
        try:
            with seeded(seed):
                return (factory or cls.module_class)(**kwargs)
        except ParameterError as err:  # "<section>.model.n_salient must be ..."
            raise cls.error(f"{cls.section}.model.{err}") from None
        except (TypeError, ValueError) as err:
            raise cls.error(f"{cls.section}.model: {err}") from None

    def _fit(self, train: Any, val: Any, config: TrainConfig, callback: Any = None) -> History:
        """Train with the one loop; ``history`` holds the per-epoch table afterwards."""
        history = fit(self.module, train, val, config, callback=callback, settings=self.section)
        self.history = history.to_frame()
        return history
