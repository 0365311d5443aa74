"""The optimisation step and one pass over a sampler: what :func:`~perturbscope.models.fit` repeats.

* :class:`Optimisation` -- Adam (the fused kernel where supported) over a module's trainable
  parameters, optional gradient clipping and the learning-rate decay on a validation plateau;
* :func:`run_epoch` -- one pass over a sampler, training or evaluating, with the loss terms of
  every step kept on the device (one host synchronisation per pass, not per step);
* :func:`epoch_means` and :func:`check_finite` -- the pass's cell-weighted means (summed over the
  ranks of a distributed fit) and the divergence check that names the step and term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import batch_size_of, batch_to
from .distributed import reduce_sums

__all__ = ["REMEDIES", "EpochTerms", "Optimisation", "TrainingError", "check_finite", "epoch_means", "run_epoch"]

REMEDIES: dict[str, tuple[str, str]] = {
    "lr": ("training", "a lower learning rate (e.g. 10x smaller)"),
    "grad_clip": ("training", "gradient clipping (e.g. 10)"),
    "likelihood": ("model", "'nb' instead of 'zinb'"),
    "kl_warmup_epochs": ("training", "a longer KL warm-up"),
}
"""What to try when training diverges: argument -> (its group, the advice)."""


class TrainingError(ValueError):
    """Training diverged: a loss term became NaN or infinite.

    ``what`` says where (epoch, step, term and values); ``remedies`` maps the arguments worth
    changing to their group (``"model"`` / ``"training"``) and advice. :meth:`render` writes the
    message with each argument named by ``name_of(group, argument)``: the Python name by default,
    a configuration key when a pipeline translates it.
    """

    def __init__(self, what: str, remedies: Mapping[str, tuple[str, str]] = REMEDIES) -> None:
        self.what = what
        self.remedies = dict(remedies)
        super().__init__(self.render())

    def renamed(self, name_of: Callable[[str, str], str]) -> TrainingError:
        """The same error, its message naming each argument by ``name_of(group, argument)``."""
        out = TrainingError(self.what, self.remedies)
        out.args = (self.render(name_of),)
        return out

    def render(self, name_of: Callable[[str, str], str] = lambda group, name: name) -> str:
        advice = "; ".join(f"{text} ({name_of(group, name)})" for name, (group, text) in self.remedies.items())
        return (
            f"{self.what} Check that the input holds raw, finite, non-negative counts (not log-normalised or "
            f"scaled data) and that no cell has zero total counts. Things to try: {advice}."
        )


class Optimisation:
    """Adam over ``params`` with optional gradient clipping and learning-rate decay on a plateau.

    ``lr_patience`` (None = a constant rate) is torch's ``ReduceLROnPlateau`` on the validation loss:
    after more than ``lr_patience`` epochs without an improvement of ``min_delta`` the rate is
    multiplied by ``lr_factor``, down to ``lr_min``.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float,
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        lr_patience: int | None = None,
        lr_factor: float = 0.5,
        lr_min: float = 0.0,
        min_delta: float = 0.0,
    ) -> None:
        self.params = params
        self.grad_clip = grad_clip
        try:  # one kernel per parameter instead of ~10
            self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        self.scheduler = None
        if lr_patience is not None:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer,
                mode="min",
                factor=lr_factor,
                patience=int(lr_patience),
                threshold=min_delta,
                threshold_mode="abs",
                min_lr=lr_min,
            )

    @property
    def lr(self) -> float:
        """The current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, loss: Tensor) -> None:
        """One optimisation step on ``loss`` (a scalar on the device; nothing is read back to the host)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()

    def validated(self, val_loss: float) -> None:
        """Tell the plateau decay an epoch's validation loss (the same on every rank: they decay together)."""
        if self.scheduler is not None:
            self.scheduler.step(val_loss)


EpochTerms = tuple[list[str], np.ndarray, np.ndarray]
"""A pass: the term names, the ``(steps, terms)`` matrix of per-step values and the cells of each step."""


def run_epoch(
    loss: Callable[[Any, float], Mapping[str, Tensor]],
    sampler: Iterable[Mapping[str, Any]],
    device: torch.device,
    kl_weight: float | Callable[[int], float],
    optimisation: Optimisation | None = None,
) -> EpochTerms:
    """One pass over ``sampler``: ``loss(batch, kl_weight)`` per batch, a step of ``optimisation`` when given.

    ``kl_weight`` is one weight for the pass or a function of the step (0, 1, ...). The per-step terms stay
    on the device and are read back once, at the end.
    """
    names: list[str] | None = None
    rows: list[Tensor] = []
    sizes: list[int] = []
    for step, batch in enumerate(sampler):
        batch = batch_to(batch, device)
        out = loss(batch, kl_weight(step) if callable(kl_weight) else kl_weight)
        if names is None:
            if "loss" not in out:
                owner = type(getattr(loss, "__self__", loss)).__name__
                raise KeyError(f"{owner}.loss must return a dict with key 'loss'; got {list(out)}")
            names = ["loss"] + [k for k in out if k != "loss"]
        if optimisation is not None:
            optimisation.step(out["loss"])
        rows.append(torch.stack([out[k].detach().float().reshape(()) for k in names]))
        sizes.append(batch_size_of(batch))
    if names is None:
        raise ValueError("the sampler yielded no batches")
    return names, torch.stack(rows).cpu().numpy().astype(np.float64), np.asarray(sizes, dtype=np.float64)


def epoch_means(terms: EpochTerms) -> dict[str, float]:
    """Cell-weighted mean of each term over the pass (over every rank's cells when training is distributed)."""
    names, mat, sizes = terms
    sums, total = reduce_sums(torch.as_tensor(sizes @ mat), float(sizes.sum()))
    return dict(zip(names, (sums / total).tolist(), strict=True))


def check_finite(terms: EpochTerms, epoch: int, phase: str, means: Mapping[str, float]) -> None:
    """Raise :class:`TrainingError` naming the step and term that went NaN/inf.

    ``means`` are the pass's means over every rank, so in distributed training all ranks stop together,
    whichever diverged.
    """
    names, mat, _ = terms
    finite = np.isfinite(mat)
    if finite.all():
        if all(math.isfinite(v) for v in means.values()):
            return
        raise TrainingError(
            f"The {phase} loss became non-finite in epoch {epoch} (0-based) on another rank of the distributed "
            f"fit: epoch means {dict(means)}."
        )
    step = int(np.flatnonzero(~finite.all(axis=1))[0])
    bad = [n for n, ok in zip(names, finite[step], strict=True) if not ok]
    if len(bad) > 1:  # "loss" is the weighted sum; name the component(s) that broke it
        bad = [n for n in bad if n != "loss"]
    values = {n: float(v) for n, v in zip(names, mat[step], strict=True)}
    raise TrainingError(
        f"The {phase} loss became non-finite in epoch {epoch} (0-based; step {step} of {len(mat)}): term(s) "
        f"{bad} NaN/inf (values at that step: {values})."
    )
