"""A versioned Kedro dataset for perturbscope's PyTorch models.

The file holds the weights *and* the hyperparameters needed to rebuild the model
(see :mod:`perturbscope.models.io`), so ``catalog.load("contrastive_model")`` returns a
ready model in eval mode.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, get_filepath_str
from torch import nn

from perturbscope.datasets._io import filesystem, write_via_local_file


class TorchModelDataset(AbstractVersionedDataset[nn.Module, nn.Module]):
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
        protocol, path, fs = filesystem(filepath, credentials, fs_args)
        self._protocol = protocol
        self._fs = fs
        self._map_location = map_location
        self.metadata = metadata
        super().__init__(
            filepath=path, version=version, exists_function=fs.exists, glob_function=fs.glob
        )

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "version": self._version,
            "map_location": self._map_location,
        }

    def load(self) -> nn.Module:
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(load_path, mode="rb") as handle:
            payload = handle.read()
        from perturbscope.models.io import from_checkpoint

        checkpoint = torch.load(
            io.BytesIO(payload), map_location=self._map_location, weights_only=False
        )
        return from_checkpoint(checkpoint, map_location=self._map_location)

    def save(self, data: nn.Module) -> None:
        if not hasattr(data, "hparams"):
            raise DatasetError(
                f"TorchModelDataset saves perturbscope models (with .hparams); got "
                f"{type(data).__name__}."
            )
        from perturbscope.models.io import to_checkpoint

        save_path = get_filepath_str(self._get_save_path(), self._protocol)
        checkpoint = to_checkpoint(data)
        write_via_local_file(
            self._protocol, self._fs, save_path, ".pt", lambda local: torch.save(checkpoint, local)
        )
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))

    def _exists(self) -> bool:
        try:
            load_path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.exists(load_path)
