"""The single training loop shared by every perturbscope model.

:func:`fit` trains any ``nn.Module`` that implements
``loss(batch, kl_weight) -> dict[str, Tensor]`` (see
:class:`~perturbscope.models.base.BaseModel`) with Adam, linear KL warm-up,
early stopping on validation loss, best-weight restoring, optional gradient
clipping and a clear :class:`TrainingError` on NaN/inf losses.

Loss terms are accumulated on the device and synchronised once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import batch_size_of, batch_to
from .distributed import (
    LossForward,
    active_group,
    check_replicas,
    reduce_sums,
    shard_sampler,
    spawn_fit,
    world_size_for,
)
from .modules import matmul_dtype

__all__ = [
    "TrainConfig",
    "History",
    "TrainingError",
    "fit",
    "resolve_device",
    "resolve_precision",
    "seeded",
    "kl_weight_at",
    "torch_threads",
    "PRECISIONS",
]

PRECISIONS = ("auto", "float32", "bfloat16")
"""``TrainConfig.precision`` choices."""


class TrainingError(ValueError):
    """Raised when training diverges (a loss term becomes NaN or infinite)."""


@dataclass
class TrainConfig:
    """Optimisation settings for :func:`fit`.

    Parameters
    ----------
    max_epochs
        Maximum number of passes over the training sampler.
    lr
        Adam learning rate.
    weight_decay
        Adam (L2) weight decay.
    early_stopping
        Stop when the validation loss has not improved by more than
        ``min_delta`` for ``patience`` epochs (needs a validation sampler;
        epochs still inside the KL warm-up do not count).
    patience
        Epochs without improvement before stopping.
    lr_patience
        Learning-rate decay on a plateau (``torch.optim.lr_scheduler.ReduceLROnPlateau`` on the
        validation loss, after the KL warm-up): after more than this many epochs without an
        improvement of ``min_delta`` the learning rate is multiplied by ``lr_factor``, down to
        ``lr_min``. None = a constant learning rate. Make it shorter than ``patience`` so
        that training continues at the lower rate before it stops.
    lr_factor
        Factor of each decay (0 < lr_factor < 1).
    lr_min
        Lowest learning rate the decay reaches.
    min_delta
        Minimum decrease of the validation loss counted as an improvement.
    kl_warmup_epochs
        Linear KL warm-up: ``kl_weight = min(1, (epoch + 1) / kl_warmup_epochs)``
        (epochs counted from 0); 0 disables warm-up.
    grad_clip
        Clip the global gradient norm to this value (None = no clipping).
    seed
        Seeds the torch RNG used during training (dropout, reparameterisation)
        and the samplers (via their ``manual_seed``).
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.
    progress
        Show a tqdm bar over epochs with train/val loss.
    restore_best
        With a validation sampler, load the weights of the best validation
        epoch at the end.
    num_threads
        Torch intra-op CPU threads during the fit (restored afterwards);
        None leaves torch's setting. On a busy machine 1 can be much faster
        than oversubscribed multi-threading.
    precision
        Precision of the large matrix products while training (and
        validating): ``"float32"`` (default); ``"bfloat16"`` (inputs and
        weights rounded to bfloat16, float32 accumulation, outputs back in
        float32; likelihoods, KL terms, weights and optimiser state stay
        float32, see :func:`~perturbscope.models.modules.matmul_dtype`);
        ``"auto"``: bfloat16 where the device multiplies it natively (a CPU
        with AVX512-BF16 or AMX, a CUDA GPU with bfloat16 support), else
        float32. Embedding and scoring after training always run in float32.
    distributed
        Data-parallel training (see :mod:`perturbscope.models.distributed`).
    memory_budget_gb
        Read by the model classes, not by :func:`fit`: when a screen's counts would take more
        than this (as device tensors, about 16 bytes per non-zero) they stream in blocks of
        ``stream_block_size`` cells (:class:`~perturbscope.models.data.StreamingCellData`);
        None = no limit. A screen read from disk always streams.
    stream_block_size
        Cells per block when the counts stream.
    """

    max_epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    early_stopping: bool = True
    patience: int = 10
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
    precision: str = "float32"
    distributed: bool | int | str = False
    memory_budget_gb: float | None = None
    stream_block_size: int = 16384

    def __post_init__(self) -> None:
        if int(self.max_epochs) < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if int(self.patience) < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if self.lr_patience is not None and int(self.lr_patience) < 0:
            raise ValueError(f"lr_patience must be >= 0 or None (constant learning rate), got {self.lr_patience}")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if not 0.0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be in [0, lr={self.lr}], got {self.lr_min}")
        if int(self.kl_warmup_epochs) < 0:
            raise ValueError(f"kl_warmup_epochs must be >= 0, got {self.kl_warmup_epochs}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.num_threads is not None and int(self.num_threads) < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} not understood; use one of {list(PRECISIONS)}")
        if self.memory_budget_gb is not None and not float(self.memory_budget_gb) > 0:
            raise ValueError(f"memory_budget_gb must be a positive number or None, got {self.memory_budget_gb}")
        if int(self.stream_block_size) < 1:
            raise ValueError(f"stream_block_size must be >= 1, got {self.stream_block_size}")
        resolve_device(self.device, check_available=False)
        world_size_for(self.distributed)  # raises for a value it does not understand

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for logging)."""
        return asdict(self)


@dataclass
class History:
    """Per-epoch training record returned by :func:`fit`.

    Attributes
    ----------
    epoch : list[int]
        Epoch numbers (0-based).
    train_loss, val_loss : list[float]
        Mean ``"loss"`` per cell (``val_loss`` is NaN without a validation
        sampler). Validation is always evaluated with ``kl_weight = 1``.
    kl_weight : list[float]
        KL weight used for training in each epoch.
    lr : list[float]
        Learning rate of each epoch (``TrainConfig.lr_patience`` decays it).
    seconds : list[float]
        Wall time per epoch (training + validation).
    train_terms, val_terms : dict[str, list[float]]
        Cell-weighted epoch mean of every term returned by ``model.loss``
        (including ``"loss"``).
    best_epoch : int or None
        Epoch whose weights were restored (None if none was eligible).
    stopped_early : bool
        Whether early stopping ended training.
    precision : str
        Precision the matrix products ran in (``TrainConfig.precision``
        resolved for the device): ``"float32"`` or ``"bfloat16"``.
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

    def __len__(self) -> int:
        return len(self.epoch)

    def to_frame(self):  # -> pandas.DataFrame
        """One row per epoch: ``epoch, train_loss, val_loss, kl_weight, lr, seconds,
        train_<term>..., val_<term>..., best`` (``best``: the epoch whose weights were kept)."""
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


def resolve_device(device: str | torch.device = "auto", check_available: bool = True) -> torch.device:
    """Resolve ``"auto"``/``"cpu"``/``"cuda[:N]"`` to a :class:`torch.device`.

    Raises
    ------
    ValueError
        For an unknown device string, or CUDA requested but unavailable.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r} not understood; use 'auto', 'cpu' or 'cuda'") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} not supported; use 'auto', 'cpu' or 'cuda'")
    if check_available and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def _cpu_multiplies_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX512-BF16 or AMX)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``TrainConfig.precision`` on ``device`` -> the matmul dtype (None = float32).

    ``"auto"`` picks bfloat16 only where it is native and therefore faster:
    elsewhere a CPU emulates it and would be several times slower.
    """
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision={precision!r} not understood; use one of {list(PRECISIONS)}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_multiplies_bf16() else None


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run a block with the torch RNG seeded, restoring the global RNG state afterwards.

    Use it to make model construction (weight initialisation) reproducible::

        with seeded(0):
            model = ContrastiveVAE(n_genes=2000)
    """
    dev = resolve_device(device, check_available=False)
    with torch.random.fork_rng(devices=_rng_devices(dev) if torch.cuda.is_available() else []):
        torch.manual_seed(int(seed))
        yield


def kl_weight_at(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up weight: ``min(1, (epoch + 1) / warmup_epochs)`` (1 if no warm-up)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


def divergence_advice(settings: str | None = None) -> str:
    """What to change when training diverges, named where the user edits it.

    ``settings`` is the parameter section of a pipeline (``"contrastive_model"``: the advice names
    ``contrastive_model.training.lr`` and ``contrastive_model.model.likelihood``); None names the
    Python fields (``TrainConfig.lr``) for direct users of :func:`fit`.
    """
    training = f"{settings}.training." if settings else "TrainConfig."
    likelihood = f"{settings}.model.likelihood: nb" if settings else "likelihood='nb'"
    return (
        f"Things to try: a lower learning rate ({training}lr, e.g. 10x smaller); gradient clipping "
        f"({training}grad_clip: 10); check that the input holds raw, finite, non-negative counts "
        "(not log-normalised or scaled data) and that no cell has zero total counts; "
        f"{likelihood} instead of zinb; a longer KL warm-up ({training}kl_warmup_epochs)."
    )


def _make_adam(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam; the fused kernel (one op per parameter instead of ~10) where supported."""
    try:
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _run_epoch(
    loss: Callable[[Any, float], Mapping[str, Tensor]],
    sampler: Iterable[Mapping[str, Any]],
    device: torch.device,
    kl_weight: float,
    optimizer: torch.optim.Optimizer | None,
    grad_clip: float | None,
    params: list[nn.Parameter],
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One pass; returns term names, the (steps, terms) matrix of per-step values and batch sizes."""
    names: list[str] | None = None
    rows: list[Tensor] = []
    sizes: list[int] = []
    for batch in sampler:
        batch = batch_to(batch, device)
        out = loss(batch, kl_weight)
        if names is None:
            if "loss" not in out:
                owner = type(getattr(loss, "__self__", loss)).__name__
                raise KeyError(f"{owner}.loss must return a dict with key 'loss'; got {list(out)}")
            names = ["loss"] + [k for k in out if k != "loss"]
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
        rows.append(torch.stack([out[k].detach().float().reshape(()) for k in names]))
        sizes.append(batch_size_of(batch))
    if names is None:
        raise ValueError("sampler yielded no batches")
    return names, torch.stack(rows).cpu().numpy().astype(np.float64), np.asarray(sizes, dtype=np.float64)


def _epoch_means(names: list[str], mat: np.ndarray, sizes: np.ndarray) -> dict[str, float]:
    """Cell-weighted epoch mean of each term, over every rank's cells when training is distributed."""
    sums, total = reduce_sums(torch.as_tensor(sizes @ mat), float(sizes.sum()))
    return dict(zip(names, (sums / total).tolist()))


def _check_finite(
    names: list[str], mat: np.ndarray, epoch: int, phase: str, settings: str | None, means: Mapping[str, float]
) -> None:
    """Raise :class:`TrainingError` naming the step and term that went NaN/inf. ``means`` are the epoch's
    means over every rank, so in distributed training all ranks stop together, whichever diverged."""
    finite = np.isfinite(mat)
    if finite.all():
        if all(math.isfinite(v) for v in means.values()):
            return
        raise TrainingError(
            f"{phase} loss became non-finite in epoch {epoch} (0-based) on another rank of the distributed fit: "
            f"epoch means {dict(means)}. {divergence_advice(settings)}"
        )
    step = int(np.flatnonzero(~finite.all(axis=1))[0])
    bad = [n for n, ok in zip(names, finite[step]) if not ok]
    if len(bad) > 1:  # "loss" is the weighted sum; name the component(s) that broke it
        bad = [n for n in bad if n != "loss"]
    values = {n: float(v) for n, v in zip(names, mat[step])}
    raise TrainingError(
        f"{phase} loss became non-finite in epoch {epoch} (0-based; step {step} of {len(mat)}): "
        f"term(s) {bad} NaN/inf (values at that step: {values}). {divergence_advice(settings)}"
    )


def fit(
    model: nn.Module,
    train_sampler: Iterable[Mapping[str, Any]],
    val_sampler: Iterable[Mapping[str, Any]] | None = None,
    config: TrainConfig | None = None,
    callback: Callable[[int, History, nn.Module], bool | None] | None = None,
    settings: str | None = None,
) -> History:
    """Train ``model`` with Adam; the one training loop of all perturbscope models.

    Parameters
    ----------
    model
        Module with ``loss(batch, kl_weight) -> dict[str, Tensor]``: key
        ``"loss"`` (scalar, mean over cells) plus scalar component terms.
    train_sampler
        Re-iterable of batches (``MinibatchSampler``, ``PairedSampler`` or
        anything yielding what ``model.loss`` accepts). If it has
        ``manual_seed(int)`` it is re-seeded with ``config.seed``.
    val_sampler
        Optional validation batches (evaluated each epoch in eval mode, no
        gradients, ``kl_weight = 1`` and a fixed RNG seed, so epochs are
        comparable). Required for early stopping and best-weight restoring.
    config
        :class:`TrainConfig` (default settings if None).
    callback
        Optional ``callback(epoch, history, model)`` called at the end of
        every epoch (after validation; ``history`` already holds the epoch,
        the model holds the epoch's weights, in eval mode if there is a
        validation sampler; matrix products in float32). Returning ``True`` stops training
        (``history.stopped_early`` stays False). It runs under a
        forked RNG and outside the timed part of the epoch
        (``history.seconds``), so it changes neither the fit nor its timings,
        e.g. to evaluate embeddings every few epochs.
    settings
        The parameter section the settings came from (a pipeline passes
        ``"contrastive_model"``), so that a :class:`TrainingError` names the
        knob the user edits (``contrastive_model.training.lr``) rather than
        the Python field (``TrainConfig.lr``).

    Returns
    -------
    History
        Per-epoch losses and timings. The model is left on the training
        device, in eval mode, with the best validation weights loaded
        (if ``config.restore_best`` and a validation sampler was given).

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
            raise ValueError(
                "fit: a callback cannot follow a distributed fit (the epochs run in other processes); "
                "set distributed: false to use one."
            )
        history = spawn_fit(model, train_sampler, val_sampler, config, world, settings)
        model.to(device).eval()
        return history
    return _fit_one(model, train_sampler, val_sampler, config, device, callback, settings)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op CPU threads (None: leave torch's setting), restoring it after."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit_one(
    model: nn.Module,
    train_sampler: Iterable[Mapping[str, Any]],
    val_sampler: Iterable[Mapping[str, Any]] | None,
    config: TrainConfig,
    device: torch.device,
    callback: Callable[[int, History, nn.Module], bool | None] | None = None,
    settings: str | None = None,
) -> History:
    """:func:`fit` in this process: alone, or as one rank of an initialised process group."""
    dtype = resolve_precision(config.precision, device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_adam(params, config)
    scheduler = None
    if config.lr_patience is not None and val_sampler is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=config.lr_factor,
            patience=int(config.lr_patience),
            threshold=config.min_delta,
            threshold_mode="abs",
            min_lr=config.lr_min,
        )
    train_loss: Callable[[Any, float], Mapping[str, Tensor]] = model.loss
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

    history = History()
    best_loss = math.inf
    best_state: dict[str, Tensor] | None = None
    bad_epochs = 0
    rng_devices = _rng_devices(device)

    from tqdm.auto import tqdm

    bar = tqdm(
        range(config.max_epochs),
        disable=not config.progress or rank > 0,
        desc=f"fit {type(model).__name__}",
        unit="epoch",
    )
    with torch.random.fork_rng(devices=rng_devices), torch_threads(config.num_threads), matmul_dtype(dtype):
        torch.manual_seed(config.seed + 7919 * rank)
        for epoch in bar:
            start = time.perf_counter()
            beta = kl_weight_at(epoch, config.kl_warmup_epochs)
            model.train()
            names, mat, sizes = _run_epoch(train_loss, train_sampler, device, beta, optimizer, config.grad_clip, params)
            train_means = _epoch_means(names, mat, sizes)
            _check_finite(names, mat, epoch, "training", settings, train_means)

            val_means: dict[str, float] = {}
            if val_sampler is not None:
                model.eval()
                with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                    torch.manual_seed(config.seed + 1_000_003)
                    vnames, vmat, vsizes = _run_epoch(model.loss, val_sampler, device, 1.0, None, None, params)
                val_means = _epoch_means(vnames, vmat, vsizes)
                _check_finite(vnames, vmat, epoch, "validation", settings, val_means)

            history.epoch.append(epoch)
            history.train_loss.append(float(train_means["loss"]))
            history.val_loss.append(float(val_means.get("loss", math.nan)))
            history.kl_weight.append(beta)
            history.lr.append(float(optimizer.param_groups[0]["lr"]))
            for k, v in train_means.items():
                history.train_terms.setdefault(k, []).append(float(v))
            for k, v in val_means.items():
                history.val_terms.setdefault(k, []).append(float(v))

            stop = False
            if val_sampler is not None and beta >= 1.0:
                val_loss = val_means["loss"]
                if val_loss < best_loss - config.min_delta:
                    best_loss = val_loss
                    history.best_epoch = epoch
                    if config.restore_best:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                    stop = config.early_stopping and bad_epochs >= config.patience
                if scheduler is not None:  # the same validation loss on every rank: the ranks decay together
                    scheduler.step(val_loss)
            history.seconds.append(time.perf_counter() - start)
            postfix = {"train": f"{train_means['loss']:.4g}"}
            if val_means:
                postfix["val"] = f"{val_means['loss']:.4g}"
            bar.set_postfix(postfix, refresh=False)
            if callback is not None:
                with torch.random.fork_rng(devices=rng_devices), matmul_dtype(None):
                    if callback(epoch, history, model):
                        break
            if stop:
                history.stopped_early = True
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    elif val_sampler is None:
        history.best_epoch = history.epoch[-1]
    if world > 1:
        check_replicas(model)
    model.eval()
    history.precision = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    return history
