"""Common base class for perturbscope models (the model contract)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import ParameterError
from .data import CellData, as_index, batch_to
from .modules import LibraryEncoder, kl_normal, one_hot, reparameterize

__all__ = ["BaseModel", "BatchLibraryModel"]


class BaseModel(nn.Module):
    """The contract every perturbscope model follows (scvi-tools' ``module`` split).

    * ``inference(batch, sample=True) -> dict``: the posterior of the latent variables of a batch
      (their means and variances, and a reparameterised draw, or the mean with ``sample=False``);
    * ``generative(...)``: the likelihood's parameters given the latent variables;
    * ``loss(batch, kl_weight) -> dict[str, Tensor]``: ``"loss"`` (scalar, mean over cells, what
      :func:`~perturbscope.models.training.fit` back-propagates) plus scalar component terms, built from
      the two above. Embedding and decoding helpers reuse ``inference`` and ``generative``.

    Subclasses call :meth:`_set_hparams` in ``__init__`` with their constructor keyword arguments
    (JSON-serialisable), so that ``type(model)(**model.hparams)`` rebuilds the architecture, and raise
    :class:`~perturbscope.models.ParameterError` naming a bad argument.

    Attributes
    ----------
    hparams : dict
        Constructor kwargs (JSON-serialisable).
    metadata : dict
        Free JSON-serialisable dict (gene names, category labels, ...); saved in checkpoints.
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

    def _collect(
        self,
        data: CellData,
        idx: Any,
        batch_size: int,
        fn: Callable[[dict[str, Tensor]], Sequence[Tensor]],
        widths: Sequence[int],
    ) -> tuple[np.ndarray, ...]:
        """``fn(batch)`` (one ``(B, width)`` tensor per entry of ``widths``) over the cells ``idx`` in batches, in
        eval mode without gradients, written into float32 arrays allocated once. Per-batch results kept in a list
        sit between each batch's large temporaries and fragment the heap: embedding a 500,000-cell screen that way
        held 1.3 GB of freed memory that the process never gave back."""
        pos = as_index(idx, data.n_cells)
        outs = tuple(np.empty((pos.numel(), int(w)), dtype=np.float32) for w in widths)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, pos.numel(), batch_size):
                    batch = batch_to(data.batch(pos[start : start + batch_size]), self.device)
                    for out, value in zip(outs, fn(batch), strict=True):
                        out[start : start + value.shape[0]] = value.float().cpu().numpy()
        finally:
            self.train(was_training)
        return outs

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"


class BatchLibraryModel(BaseModel):
    """A :class:`BaseModel` with an optional one-hot batch covariate and an observed or learned library.

    Shared by the models that take raw counts with batches (LDVAE, contrastiveVI):
    call :meth:`_init_batch_library` in ``__init__`` (after ``super().__init__()``),
    then :meth:`_cov` and :meth:`_library` in ``loss`` and the inference helpers.
    """

    n_batch: int
    batch_key: str
    library: str
    library_encoder: LibraryEncoder | None

    def _init_batch_library(
        self,
        n_genes: int,
        n_batch: int,
        batch_key: str,
        library: str,
        library_log_mean: Sequence[float] | None,
        library_log_var: Sequence[float] | None,
        **encoder: Any,
    ) -> None:
        """Store the batch / library settings; build the library encoder and its prior when learned."""
        self.n_batch = n_batch
        self.batch_key = batch_key
        self.library = library
        self.library_encoder = LibraryEncoder(n_genes, **encoder) if library == "learned" else None
        if library == "learned":
            self.register_buffer("library_log_mean", torch.tensor(library_log_mean))
            self.register_buffer("library_log_var", torch.tensor(library_log_var))

    def _cov(self, batch: dict[str, Tensor]) -> Tensor | None:
        """One-hot batch covariate ``(B, n_batch)`` of a batch dict, or None without batches."""
        if not self.n_batch:
            return None
        if self.batch_key not in batch:
            raise KeyError(
                f"n_batch={self.n_batch} but the batch has no {self.batch_key!r} entry; "
                f"build CellData with obs={{{self.batch_key!r}: integer batch codes}}"
            )
        return one_hot(batch[self.batch_key], self.n_batch)

    def _library(
        self, batch: dict[str, Tensor], h: Tensor, cov: Tensor | None, sample: bool, first: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Log library ``(B,)`` and its KL ``(B,)`` (learned library) or None (observed library).

        A learned library is sampled from its posterior when ``sample``, else its mean.
        ``first``: the library encoder's first-layer output, when already computed
        (:func:`~perturbscope.models.modules.first_layers`).
        """
        if self.library_encoder is None:
            return batch["log_library"], None
        l_mean, l_var = self.library_encoder(h, cov, first)
        codes = batch[self.batch_key] if self.n_batch else torch.zeros_like(batch["idx"])
        kl = kl_normal(
            l_mean.unsqueeze(-1),
            l_var.unsqueeze(-1),
            self.library_log_mean[codes].unsqueeze(-1),
            self.library_log_var[codes].unsqueeze(-1),
        )
        return (reparameterize(l_mean, l_var) if sample else l_mean), kl


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
        raise ParameterError("library", f"must be 'observed' (log total counts) or 'learned', got {library!r}")
    if library != "learned":
        return library_log_mean, library_log_var
    n_lib = max(n_batch, 1)
    if library_log_mean is None or library_log_var is None:
        raise ParameterError(
            "library",
            "'learned' needs library_log_mean and library_log_var (prior of the log library "
            "per batch), e.g. `mean, var = data.library_prior(train_idx, batch_key, n_batch)`; "
            "or use library='observed'",
        )
    means = [float(v) for v in library_log_mean]
    variances = [float(v) for v in library_log_var]
    if len(means) != n_lib or len(variances) != n_lib:
        raise ParameterError(
            "library_log_mean",
            f"and library_log_var need max(n_batch, 1) = {n_lib} entries, got {len(means)} and {len(variances)}",
        )
    if min(variances) <= 0:
        raise ParameterError("library_log_var", "entries must be > 0")
    return means, variances
