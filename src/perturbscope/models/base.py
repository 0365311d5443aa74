"""Common base class for perturbscope models (the model contract)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .data import CellData, as_index, batch_to

__all__ = ["BaseModel"]


class BaseModel(nn.Module):
    """Base class implementing the contract shared by all perturbscope models.

    Subclasses must

    * call :meth:`_set_hparams` in ``__init__`` with their constructor
      keyword arguments (JSON-serialisable), so that
      ``type(model)(**model.hparams)`` rebuilds an identical architecture;
    * implement ``loss(batch, kl_weight) -> dict[str, Tensor]`` returning at
      least ``"loss"`` (scalar, mean over cells, to back-propagate) plus any
      scalar component terms (used by :func:`~perturbscope.models.training.fit`
      for logging and for the NaN diagnosis).

    Attributes
    ----------
    hparams : dict
        Constructor kwargs (JSON-serialisable).
    metadata : dict
        Free JSON-serialisable dict (gene names, category labels, ...);
        saved in checkpoints, default ``{}``.
    """

    hparams: dict[str, Any]
    metadata: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.hparams = {}
        self.metadata = {}

    def _set_hparams(self, **kwargs: Any) -> None:
        try:
            json.dumps(kwargs)
        except TypeError as err:
            raise ValueError(f"{type(self).__name__} hyperparameters must be JSON-serialisable: {err}") from None
        self.hparams = dict(kwargs)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.parameters()).device

    def loss(self, batch: dict[str, Any], kl_weight: float = 1.0) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def iter_batches(self, data: CellData, idx: Any = None, batch_size: int = 1024) -> Iterator[dict[str, Tensor]]:
        """Iterate ``data.batch`` dicts over ``idx`` in order (for inference helpers).

        Batches are gathered on ``data``'s device and moved to the model's.
        """
        device = self.device
        pos = as_index(idx, data.n_cells)
        for start in range(0, pos.numel(), batch_size):
            yield batch_to(data.batch(pos[start : start + batch_size]), device)

    @staticmethod
    def _to_numpy(chunks: list[Tensor], width: int) -> np.ndarray:
        if not chunks:
            return np.zeros((0, width), dtype=np.float32)
        return torch.cat(chunks).cpu().numpy()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"
