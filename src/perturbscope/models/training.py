"""The one training loop of every perturbscope model: :func:`fit`, its :class:`TrainConfig` and :class:`History`.

:func:`fit` trains any ``nn.Module`` that implements ``loss(batch, kl_weight) -> dict[str, Tensor]``
(see :class:`~perturbscope.models.base.BaseModel`): a linear KL warm-up, validation every epoch,
early stopping, the best epoch's weights restored, a clear :class:`TrainingError` on NaN/inf.
The parts live beside it, imported one way: :mod:`.runtime` (device, precision, threads, seeds),
:mod:`.optim` (the optimisation step and one pass over a sampler) and :mod:`.distributed` (the ranks
of a data-parallel fit).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import ParameterError
from .distributed import LossForward, active_group, check_replicas, shard_sampler, spawn_fit, world_size_for
from .modules import matmul_dtype
from .optim import Optimisation, check_finite, epoch_means, run_epoch
from .runtime import PRECISIONS, compute_context, resolve_device, resolve_precision, rng_devices

logger = logging.getLogger(__name__)

EPOCH_COUNTS = ("max_epochs", "kl_warmup_epochs", "patience", "lr_patience")
"""The :class:`TrainConfig` fields counted in epochs, which ``reference_epoch_cells`` scales."""

__all__ = ["History", "TrainConfig", "fit", "kl_weight_at"]


@dataclass
class TrainConfig:
    """How a model trains. The defaults are the project's; each model class adds its own
    (:attr:`perturbscope.models.model.ModelAPI.training_defaults`).

    Parameters
    ----------
    max_epochs
        Maximum number of passes over the training sampler.
    batch_size
        Cells per training step (contrastiveVI: target cells, each paired with a control). Read by
        the model classes, which build the samplers.
    validation_batch_size
        Cells per validation step (no gradients, so larger batches only cost memory).
    lr
        Adam learning rate.
    weight_decay
        Adam (L2) weight decay.
    early_stopping
        Stop when the validation loss has not improved by more than ``min_delta`` for ``patience``
        epochs (needs a validation sampler; epochs inside the KL warm-up do not count).
    patience
        Epochs without improvement before stopping.
    min_delta
        Minimum decrease of the validation loss counted as an improvement.
    lr_patience
        Learning-rate decay on a plateau (torch's ``ReduceLROnPlateau`` on the validation loss, after
        the KL warm-up): after more than this many epochs without an improvement of ``min_delta`` the
        learning rate is multiplied by ``lr_factor``, down to ``lr_min``. None = a constant rate. Make
        it shorter than ``patience`` so that training goes on at the lower rate before it stops.
    lr_factor
        Factor of each decay (0 < lr_factor < 1).
    lr_min
        Lowest learning rate the decay reaches.
    kl_warmup_epochs
        Linear KL warm-up: ``kl_weight = min(1, (epoch + 1) / kl_warmup_epochs)`` (epochs counted from
        0); 0 disables it.
    grad_clip
        Clip the global gradient norm to this value (None = no clipping).
    seed
        Seeds the torch RNG during training (dropout, reparameterisation) and the samplers (their
        ``manual_seed``).
    device
        ``"auto"`` (CUDA if available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    progress
        A tqdm bar over epochs with the train / validation loss.
    restore_best
        With a validation sampler, load the weights of the best validation epoch at the end.
    num_threads
        Torch intra-op CPU threads during the fit (restored afterwards); None leaves torch's setting.
        On a busy machine 1 can be much faster than oversubscribed multi-threading.
    precision
        Precision of the large matrix products while training and validating: ``"float32"``;
        ``"bfloat16"`` (inputs and weights rounded to bfloat16, float32 accumulation, outputs back in
        float32; likelihoods, KL terms, weights and optimiser state stay float32, see
        :func:`~perturbscope.models.modules.matmul_dtype`); ``"auto"`` (default): bfloat16 where the
        device multiplies it natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bfloat16), else
        float32. Embedding and scoring after training always run in float32.
    distributed
        Data-parallel training (:mod:`perturbscope.models.distributed`): False, a number of processes
        on this machine, or ``"auto"`` (one per GPU when there are two or more).
    memory_budget_gb
        Read by the model classes: when a screen's counts would take more than this on the device
        (about 16 bytes per non-zero) they stream in blocks of ``stream_block_size`` cells
        (:class:`~perturbscope.models.data.StreamingCellData`); None = no limit. A screen read from
        disk always streams.
    stream_block_size
        Cells per block when the counts stream.
    compile
        Compile the training and validation loss with ``torch.compile`` (dynamic shapes: batches differ
        in their number of non-zeros). Off by default: it pays on a GPU with many epochs, and costs a
        compilation of tens of seconds first (bench/gpu.sh measures it).
    reference_epoch_cells
        The epoch counts above (``max_epochs``, ``kl_warmup_epochs``, ``patience``, ``lr_patience``) are
        epochs of this many training cells. A screen whose epoch has more cells trains the same number of
        cells, not of epochs: each count is multiplied by ``reference_epoch_cells / cells per epoch``
        (rounded up, at least 1), and the KL warm-up then grows step by step, so that it still spans that
        many reference epochs when it is shorter than one epoch (:meth:`scaled_to`). Every benchmark behind
        the defaults ran on screens with at most 10,000 training cells per epoch, where nothing changes.
        None = epochs are epochs at every size.
    """

    max_epochs: int = 100
    batch_size: int = 128
    validation_batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0
    early_stopping: bool = True
    patience: int = 20
    min_delta: float = 0.0
    lr_patience: int | None = None
    lr_factor: float = 0.5
    lr_min: float = 0.0
    kl_warmup_epochs: int = 0
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    restore_best: bool = True
    num_threads: int | None = None
    precision: str = "auto"
    distributed: bool | int | str = False
    memory_budget_gb: float | None = None
    stream_block_size: int = 16384
    compile: bool = False
    reference_epoch_cells: int | None = 10_000

    def __post_init__(self) -> None:
        def bad(name: str, detail: str) -> ParameterError:
            return ParameterError(name, detail, "training")

        def integer(name: str, minimum: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                extra = " or None" if optional else ""
                raise bad(name, f"must be an integer >= {minimum}{extra}, got {value!r}")

        def number(name: str, ok: Callable[[float], bool], what: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(float(value)):
                raise bad(name, f"must be {what}, got {value!r}")

        integer("max_epochs", 1)
        integer("batch_size", 1)
        integer("validation_batch_size", 1)
        integer("patience", 1)
        integer("lr_patience", 0, optional=True)
        integer("kl_warmup_epochs", 0)
        integer("num_threads", 1, optional=True)
        integer("stream_block_size", 1)
        integer("seed", 0)
        integer("reference_epoch_cells", 1, optional=True)
        number("lr", lambda v: v > 0 and math.isfinite(v), "a positive finite number")
        number("weight_decay", lambda v: v >= 0, "a number >= 0")
        number("min_delta", lambda v: v >= 0, "a number >= 0")
        number("lr_factor", lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
        number("lr_min", lambda v: 0.0 <= v <= self.lr, f"a number in [0, lr={self.lr}]")
        number("grad_clip", lambda v: v > 0, "a positive number or None", optional=True)
        number("memory_budget_gb", lambda v: v > 0, "a positive number or None", optional=True)
        for name in ("early_stopping", "progress", "restore_best", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {list(PRECISIONS)}, got {self.precision!r}")
        try:
            resolve_device(self.device, check_available=False)
        except ParameterError as err:
            raise err.within("training") from None
        world_size_for(self.distributed)  # raises for a value it does not understand

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, **defaults: Any) -> TrainConfig:
        """A config from ``defaults`` updated with ``values`` (e.g. a parameters block); an unknown key
        raises :class:`~perturbscope.models.ParameterError` naming it and the known ones."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            verb = "is" if len(unknown) == 1 else "are"
            raise ParameterError(
                ", ".join(unknown), f"{verb} not a training setting; known: {sorted(known)}", "training"
            )
        return cls(**{**defaults, **values})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for logging)."""
        return asdict(self)

    def epoch_scale(self, cells_per_epoch: int | None) -> float:
        """``reference_epoch_cells / cells_per_epoch`` when an epoch has more cells than the reference, else 1."""
        if self.reference_epoch_cells is None or not cells_per_epoch or cells_per_epoch <= self.reference_epoch_cells:
            return 1.0
        return self.reference_epoch_cells / cells_per_epoch

    def scaled_to(self, cells_per_epoch: int | None) -> TrainConfig:
        """The config in epochs of ``cells_per_epoch`` cells: the epoch counts times :meth:`epoch_scale`,
        rounded up (at least 1; a KL warm-up or ``lr_patience`` of 0 stays 0). Unchanged at scale 1."""
        scale = self.epoch_scale(cells_per_epoch)
        if scale == 1.0:
            return self

        def scaled(value: int | None) -> int | None:
            return value if not value else max(1, math.ceil(value * scale - 1e-9))  # 1e-9: no 10.000...1 -> 11

        return self.replace(**{name: scaled(getattr(self, name)) for name in EPOCH_COUNTS})


@dataclass
class History:
    """Per-epoch training record returned by :func:`fit`.

    Attributes
    ----------
    epoch : list[int]
        Epoch numbers (0-based).
    train_loss, val_loss : list[float]
        Mean ``"loss"`` per cell (``val_loss`` is NaN without a validation sampler). Validation always
        uses ``kl_weight = 1``.
    kl_weight : list[float]
        KL weight used for training in each epoch.
    lr : list[float]
        Learning rate of each epoch (``TrainConfig.lr_patience`` decays it).
    seconds : list[float]
        Wall time per epoch (training + validation).
    train_terms, val_terms : dict[str, list[float]]
        Cell-weighted epoch mean of every term returned by ``model.loss`` (including ``"loss"``).
    best_epoch : int or None
        Epoch whose weights were restored (None if none was eligible).
    stopped_early : bool
        Whether early stopping ended training.
    precision : str
        Precision the matrix products ran in: ``"float32"`` or ``"bfloat16"``.
    epoch_scale : float
        :meth:`TrainConfig.epoch_scale` of the fit: below 1 the epoch counts were scaled to the screen
        (``TrainConfig.reference_epoch_cells``) and the KL warm-up grew step by step.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    kl_weight: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_terms: dict[str, list[float]] = field(default_factory=dict)
    val_terms: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int | None = None
    stopped_early: bool = False
    precision: str = "float32"
    epoch_scale: float = 1.0

    def __len__(self) -> int:
        return len(self.epoch)

    def to_frame(self):  # -> pandas.DataFrame
        """One row per epoch: ``epoch, train_loss, val_loss, kl_weight, lr, seconds, train_<term>...,
        val_<term>..., best`` (``best``: the epoch whose weights were kept)."""
        import pandas as pd

        cols: dict[str, list[Any]] = {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "kl_weight": self.kl_weight,
            "lr": self.lr if len(self.lr) == len(self.epoch) else [math.nan] * len(self.epoch),
            "seconds": self.seconds,
        }
        for k, v in self.train_terms.items():
            if k != "loss":
                cols[f"train_{k}"] = v
        for k, v in self.val_terms.items():
            if k != "loss":
                cols[f"val_{k}"] = v
        cols["best"] = [e == self.best_epoch for e in self.epoch]
        return pd.DataFrame(cols)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of all fields."""
        return asdict(self)


def kl_weight_at(epoch: int, warmup_epochs: int, done: float = 1.0) -> float:
    """Linear warm-up weight ``min(1, (epoch + done) / warmup_epochs)`` (1 if no warm-up), ``done`` the part of
    the epoch trained when the weight is used: 1 (the default) gives every step of an epoch its end weight."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + done) / warmup_epochs)


def fit(
    model: nn.Module,
    train_sampler: Iterable[Mapping[str, Any]],
    val_sampler: Iterable[Mapping[str, Any]] | None = None,
    config: TrainConfig | None = None,
    callback: Callable[[int, History, nn.Module], bool | None] | None = None,
) -> History:
    """Train ``model`` with Adam; the one training loop of every perturbscope model.

    Parameters
    ----------
    model
        Module with ``loss(batch, kl_weight) -> dict[str, Tensor]``: key ``"loss"`` (scalar, mean over
        cells) plus scalar component terms.
    train_sampler
        Re-iterable of batches (``MinibatchSampler``, ``PairedSampler`` or anything yielding what
        ``model.loss`` accepts). If it has ``manual_seed(int)`` it is re-seeded with ``config.seed``.
    val_sampler
        Optional validation batches (evaluated each epoch in eval mode, no gradients, ``kl_weight = 1``
        and a fixed RNG seed, so epochs are comparable). Needed for early stopping and the best weights.
    config
        :class:`TrainConfig` (its defaults if None).
    callback
        Optional ``callback(epoch, history, model)`` at the end of every epoch (after validation; the
        model holds the epoch's weights, in eval mode with a validation sampler; matrix products in
        float32). Returning ``True`` stops training (``history.stopped_early`` stays False). It runs
        under a forked RNG and outside the timed part of the epoch, so it changes neither the fit nor
        its timings.

    Returns
    -------
    History
        Per-epoch losses and timings. The model is left on the training device, in eval mode, with the
        best validation weights loaded (with ``config.restore_best`` and a validation sampler).

    Raises
    ------
    TrainingError
        If a training or validation loss term becomes NaN or infinite.
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    world = world_size_for(config.distributed)
    if active_group() is None and world > 1:
        if callback is not None:
            raise ParameterError(
                "callback",
                "cannot follow a distributed fit (the epochs run in other processes); train with "
                "distributed=False to use one",
            )
        history = spawn_fit(_fit_one, model, train_sampler, val_sampler, config, world)
        model.to(device).eval()
        return history
    return _fit_one(model, train_sampler, val_sampler, config, device, callback)


class _EarlyStopping:
    """The best validation epoch so far, its weights, and whether patience has run out."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.best_loss = math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0

    def update(self, val_loss: float, epoch: int, model: nn.Module, history: History) -> bool:
        """Record an eligible epoch's validation loss; True when training should stop."""
        if val_loss < self.best_loss - self.config.min_delta:
            self.best_loss = val_loss
            history.best_epoch = epoch
            if self.config.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        return self.config.early_stopping and self.bad_epochs >= self.config.patience


def _record(
    history: History, epoch: int, beta: float, lr: float, train: dict[str, float], val: dict[str, float]
) -> None:
    history.epoch.append(epoch)
    history.train_loss.append(float(train["loss"]))
    history.val_loss.append(float(val.get("loss", math.nan)))
    history.kl_weight.append(beta)
    history.lr.append(lr)
    for k, v in train.items():
        history.train_terms.setdefault(k, []).append(float(v))
    for k, v in val.items():
        history.val_terms.setdefault(k, []).append(float(v))


def _scaled_config(config: TrainConfig, cells: int | None, owner: str) -> TrainConfig:
    """:meth:`TrainConfig.scaled_to` ``cells``, logged (by the first rank) when it changes an epoch count."""
    scaled = config.scaled_to(cells)
    if scaled is not config and (active_group() or (0, 1))[0] == 0:
        changed = [
            f"{n} {getattr(config, n)} -> {getattr(scaled, n)}"
            for n in EPOCH_COUNTS
            if getattr(config, n) != getattr(scaled, n)
        ]
        logger.info(
            "An epoch of %s is %d cells, over training.reference_epoch_cells (%d): %s.",
            owner,
            cells,
            config.reference_epoch_cells,
            ", ".join(changed) or "no epoch count changes",
        )
    return scaled


def _fit_one(
    model: nn.Module,
    train_sampler: Iterable[Mapping[str, Any]],
    val_sampler: Iterable[Mapping[str, Any]] | None,
    config: TrainConfig,
    device: torch.device,
    callback: Callable[[int, History, nn.Module], bool | None] | None = None,
) -> History:
    """:func:`fit` in this process: alone, or as one rank of an initialised process group."""
    cells = getattr(train_sampler, "cells_per_epoch", None)  # every rank's cells: read before sharding
    scale = config.epoch_scale(cells)
    config = _scaled_config(config, cells, type(model).__name__)
    dtype = resolve_precision(config.precision, device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimisation = Optimisation(
        params,
        config.lr,
        config.weight_decay,
        config.grad_clip,
        config.lr_patience if val_sampler is not None else None,
        config.lr_factor,
        config.lr_min,
        config.min_delta,
    )
    train_loss: Callable[[Any, float], Mapping[str, Tensor]] = model.loss
    val_loss: Callable[[Any, float], Mapping[str, Tensor]] = model.loss
    if config.compile:
        train_loss = val_loss = torch.compile(model.loss, dynamic=True)
    rank, world = active_group() or (0, 1)
    if world > 1:  # this process is one rank: its shard of the cells, gradients averaged by DDP
        train_sampler = shard_sampler(train_sampler, rank, world, training=True)
        val_sampler = shard_sampler(val_sampler, rank, world, training=False)
        for sampler in (train_sampler, val_sampler):
            for data in (getattr(sampler, "data", None), getattr(sampler, "background_data", None)):
                if data is not None:
                    data.to(device)
        train_loss = nn.parallel.DistributedDataParallel(
            LossForward(model), device_ids=[device.index] if device.type == "cuda" else None
        )
    for offset, sampler in ((0, train_sampler), (1, val_sampler)):
        if sampler is not None and hasattr(sampler, "manual_seed"):
            sampler.manual_seed(config.seed + offset + 7919 * rank)

    history = History(epoch_scale=scale)
    stopping = _EarlyStopping(config)
    # a scaled screen: the warm-up grows every step (an epoch is several reference epochs), its epochs' end
    # weights those of the epoch-wise warm-up
    steps = len(train_sampler) if hasattr(train_sampler, "__len__") else 0
    stepwise = scale < 1.0 and config.kl_warmup_epochs > 0 and steps > 0

    def warmup(epoch: int) -> Callable[[int], float]:
        return lambda step: kl_weight_at(epoch, config.kl_warmup_epochs, (step + 1) / steps)

    from tqdm.auto import tqdm

    bar = tqdm(
        range(config.max_epochs),
        disable=not config.progress or rank > 0,
        desc=f"fit {type(model).__name__}",
        unit="epoch",
    )
    with compute_context(device, config.seed + 7919 * rank, config.num_threads, dtype):
        for epoch in bar:
            start = time.perf_counter()
            beta = kl_weight_at(epoch, config.kl_warmup_epochs)
            lr = optimisation.lr
            model.train()
            terms = run_epoch(train_loss, train_sampler, device, warmup(epoch) if stepwise else beta, optimisation)
            train_means = epoch_means(terms)
            check_finite(terms, epoch, "training", train_means)
            val_means: dict[str, float] = {}
            if val_sampler is not None:
                model.eval()
                with torch.no_grad(), compute_context(device, config.seed + 1_000_003, None, dtype):
                    vterms = run_epoch(val_loss, val_sampler, device, 1.0)
                val_means = epoch_means(vterms)
                check_finite(vterms, epoch, "validation", val_means)
            _record(history, epoch, beta, lr, train_means, val_means)

            stop = False
            if val_sampler is not None and beta >= 1.0:
                stop = stopping.update(val_means["loss"], epoch, model, history)
                optimisation.validated(val_means["loss"])
            history.seconds.append(time.perf_counter() - start)
            postfix = {"train": f"{train_means['loss']:.4g}"}
            if val_means:
                postfix["val"] = f"{val_means['loss']:.4g}"
            bar.set_postfix(postfix, refresh=False)
            if callback is not None:
                with torch.random.fork_rng(devices=rng_devices(device)), matmul_dtype(None):
                    if callback(epoch, history, model):
                        break
            if stop:
                history.stopped_early = True
                break
    bar.close()
    if stopping.best_state is not None:
        model.load_state_dict(stopping.best_state)
    elif val_sampler is None:
        history.best_epoch = history.epoch[-1]
    if world > 1:
        check_replicas(model)
    model.eval()
    history.precision = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    return history
