"""Common base class for perturbscope models (the model contract)."""

from __future__ import annotations

import json
from collections.abc import Sequence
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


def check_library_prior(
    library: str,
    library_log_mean: Sequence[float] | None,
    library_log_var: Sequence[float] | None,
    n_batch: int,
) -> tuple[list[float] | None, list[float] | None]:
    """Validate a model's library-size setting; return the prior as plain float lists.

    ``library="learned"`` needs a prior of the log library per batch
    (``max(n_batch, 1)`` entries each, variances > 0).
    """
    if library not in ("observed", "learned"):
        raise ValueError(f"library={library!r} is not supported; use 'observed' (log total counts) or 'learned'")
    if library != "learned":
        return library_log_mean, library_log_var
    n_lib = max(n_batch, 1)
    if library_log_mean is None or library_log_var is None:
        raise ValueError(
            "library='learned' needs library_log_mean and library_log_var (prior of the log library "
            "per batch), e.g. `mean, var = data.library_prior(train_idx, batch_key, n_batch)`; "
            "or use library='observed'"
        )
    means = [float(v) for v in library_log_mean]
    variances = [float(v) for v in library_log_var]
    if len(means) != n_lib or len(variances) != n_lib:
        raise ValueError(
            f"library_log_mean/library_log_var need max(n_batch, 1) = {n_lib} entries, "
            f"got {len(means)} and {len(variances)}"
        )
    if min(variances) <= 0:
        raise ValueError("library_log_var entries must be > 0")
    return means, variances
