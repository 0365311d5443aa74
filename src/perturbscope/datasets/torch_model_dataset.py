"""A versioned Kedro dataset for perturbscope's PyTorch models.

The file holds the weights *and* the hyperparameters needed to rebuild the model
(see :mod:`perturbscope.models.io`), so ``catalog.load("contrastive_model")`` returns a
ready model in eval mode.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from kedro.io.core import DatasetError, Version
from torch import nn

from perturbscope.datasets._io import VersionedFileDataset, write_via_local_file


class TorchModelDataset(VersionedFileDataset):
    """Save and load a perturbscope model (weights, hyperparameters and metadata).

    Parameters
    ----------
    filepath
        Path or fsspec URL of the ``.pt`` file.
    map_location
        Device the weights are loaded onto (default ``cpu``).
    version, credentials, fs_args, metadata
        As for every Kedro versioned dataset.
    """

    def __init__(
        self,
        *,
        filepath: str,
        map_location: str = "cpu",
        version: Version | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._map_location = map_location
        self._init_file(filepath, version, credentials, fs_args, metadata)

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "version": self._version,
            "map_location": self._map_location,
        }

    def load(self) -> nn.Module:
        load_path = self._load_path()
        with self._fs.open(load_path, mode="rb") as handle:
            payload = handle.read()
        from perturbscope.models.io import from_checkpoint

        checkpoint = torch.load(io.BytesIO(payload), map_location=self._map_location, weights_only=False)
        return from_checkpoint(checkpoint, map_location=self._map_location)

    def save(self, data: nn.Module) -> None:
        if not hasattr(data, "hparams"):
            raise DatasetError(
                f"TorchModelDataset saves perturbscope models (with .hparams); got {type(data).__name__}."
            )
        from perturbscope.models.io import to_checkpoint

        save_path = self._save_path()
        checkpoint = to_checkpoint(data)
        write_via_local_file(self._protocol, self._fs, save_path, ".pt", lambda local: torch.save(checkpoint, local))
        self._invalidate_cache()
