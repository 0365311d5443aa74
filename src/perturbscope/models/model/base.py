"""The contract of the AnnData-facing model classes: wrap a torch module, fit it from a screen, read
screens into it, save and load it.

A model class holds one trained module (``.module``, what the Kedro catalog and the MLflow registry
store) and, after :meth:`ModelAPI.fit`, its per-epoch history (``.history``)::

    api = ContrastiveVI.fit(screen, seed=0)          # the class's defaults: what `kedro run` trains
    api = ContrastiveVI.fit(screen, {"n_salient": 12}, {"max_epochs": 50}, seed=0)
    api.history                                       # pandas, one row per epoch (``best`` marks the kept one)
    api.save("model.pt");  ContrastiveVI.load("model.pt").embed(other_screen)
    ContrastiveVI(catalog.load("contrastive_model"))  # wrap a module from the catalog

Every default has one owner: a module's hyperparameters are its constructor's defaults,
:class:`~perturbscope.models.TrainConfig` holds the training defaults and each class's
:attr:`ModelAPI.training_defaults` what differs for that model (``ContrastiveVI.train_config()`` shows
the result). Bad arguments raise :class:`~perturbscope.models.ParameterError` naming the argument.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import anndata as ad
import pandas as pd
import torch

from perturbscope.models._checks import ParameterError
from perturbscope.models.base import BaseModel
from perturbscope.models.data import CellData
from perturbscope.models.io import load_model, save_model
from perturbscope.models.runtime import seeded
from perturbscope.models.training import History, TrainConfig, fit

from .inputs import model_cell_data

__all__ = ["DERIVED_MODEL_ARGS", "ModelAPI", "training_summary"]

DERIVED_MODEL_ARGS = frozenset({"n_genes", "n_batch", "batch_key", "library_log_mean", "library_log_var"})
"""Module arguments a model class sets from the screen (never from the caller's ``model`` settings)."""


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

    Subclasses set ``module_class`` (the torch module), ``training_defaults`` (this model's training
    settings that differ from :class:`~perturbscope.models.TrainConfig`'s) and ``counts_hint`` (what to
    do when raw counts are missing).
    """

    module_class: ClassVar[type[BaseModel]] = BaseModel
    training_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
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
        return model_cell_data(self.module, adata, self.counts_hint, counts_layer, fill_missing)

    # ------------------------------------------------------------------- settings
    @classmethod
    def train_config(cls, training: Mapping[str, Any] | TrainConfig | None = None, seed: int = 0) -> TrainConfig:
        """The training settings: :class:`~perturbscope.models.TrainConfig`'s defaults, then this class's
        ``training_defaults``, then ``training`` (a mapping of fields; ``seed`` unless it names its own).
        A :class:`TrainConfig` is used as it is."""
        if isinstance(training, TrainConfig):
            return training
        return TrainConfig.from_mapping({"seed": seed, **dict(training or {})}, **cls.training_defaults)

    @classmethod
    def model_kwargs(cls, model: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``model`` checked against the module's arguments (those set from the screen excluded)."""
        allowed = set(inspect.signature(cls.module_class.__init__).parameters) - {"self"} - DERIVED_MODEL_ARGS
        model = dict(model or {})
        unknown = sorted(set(model) - allowed)
        if unknown:
            raise ParameterError(
                ", ".join(unknown),
                f"{'is' if len(unknown) == 1 else 'are'} not a {cls.module_class.__name__} argument; allowed: "
                f"{sorted(allowed)} (the number of genes and batches come from the screen)",
                "model",
            )
        return model

    @classmethod
    def _build(cls, seed: int, factory: Callable[..., BaseModel] | None = None, **kwargs: Any) -> BaseModel:
        """The module (``factory(**kwargs)``, default the module class), initialised reproducibly; a bad
        hyperparameter raises :class:`ParameterError` marked as the model's."""
        try:
            with seeded(seed):
                return (factory or cls.module_class)(**kwargs)
        except ParameterError as err:
            raise err.within("model") from None

    def _fit(self, train: Any, val: Any, config: TrainConfig, callback: Any = None) -> History:
        """Train with the one loop; ``history`` holds the per-epoch table afterwards."""
        history = fit(self.module, train, val, config, callback=callback)
        self.history = history.to_frame()
        return history
