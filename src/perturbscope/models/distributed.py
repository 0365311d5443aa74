"""Data-parallel training with ``torch.distributed``: DistributedDataParallel over shards of cells.

:func:`~perturbscope.models.training.fit` trains on several processes when
``TrainConfig.distributed`` asks for them, or when it is called inside a process group that
already exists (a script launched with ``torchrun``). Each process (rank):

* trains on its own shard of the cells (the samplers' :meth:`shard`: every ``world``-th cell, each
  shard the same length so every rank takes the same number of steps) with ``batch_size / world``
  cells per step, so the *global* batch is the configured one;
* holds a replica of the model wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`,
  which averages the gradients of every step across ranks (gloo on CPUs, NCCL on GPUs, one GPU per
  rank);
* evaluates its shard of the validation cells; the epoch's loss terms are summed over ranks, so
  early stopping and the restored best epoch are the same decision on every rank.

On one machine ``fit`` starts the processes itself (``torch.multiprocessing``, ``spawn``), and rank
0 hands the trained weights and the history back to the calling process, so ``kedro run`` with
``training.distributed: 2`` needs no launcher. Past one machine, launch your own script with
``torchrun`` and call the model's ``fit`` inside it (see the README).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._checks import ParameterError
from .runtime import resolve_device

logger = logging.getLogger(__name__)

__all__ = [
    "world_size_for",
    "active_group",
    "LossForward",
    "reduce_sums",
    "shard_sampler",
    "spawn_fit",
    "check_replicas",
]


def world_size_for(distributed: Any) -> int:
    """Processes asked for by ``TrainConfig.distributed`` on this machine (1 = no distribution).

    ``False``/``None``/``0``/``1``: one process. An integer ``n >= 2``: ``n`` processes (on the CPU,
    each gets ``cores / n`` threads; on GPUs each needs its own GPU). ``"auto"`` or ``True``: one
    process per visible GPU when there are at least two, else one.
    """
    if distributed is None or distributed is False:
        return 1
    if distributed is True or distributed == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return count if count >= 2 else 1
    if isinstance(distributed, int) and not isinstance(distributed, bool) and distributed >= 0:
        return max(1, int(distributed))
    raise ParameterError(
        "distributed",
        f"{distributed!r} is not understood; use false, 'auto' (every GPU of this machine) or a number of "
        "processes (>= 2)",
        "training",
    )


def active_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of an initialised process group of two or more ranks, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


class LossForward(nn.Module):
    """Makes ``module.loss(batch, kl_weight)`` the ``forward`` that DistributedDataParallel wraps."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, kl_weight: float) -> dict[str, torch.Tensor]:
        return self.module.loss(batch, kl_weight)


def _group_device() -> torch.device:
    """Where the group's collectives take their tensors: this rank's GPU with NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _cpu_threads(world: int) -> int:
    """Torch threads of each of ``world`` CPU ranks: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // world)


def reduce_sums(weighted_sums: torch.Tensor, total: float) -> tuple[torch.Tensor, float]:
    """Sum an epoch's cell-weighted term sums and its cell count over ranks (no-op without a group)."""
    if active_group() is None:
        return weighted_sums, total
    packed = torch.cat([weighted_sums.double(), torch.tensor([float(total)], dtype=torch.float64)]).to(_group_device())
    dist.all_reduce(packed)
    packed = packed.cpu()
    return packed[:-1], float(packed[-1])


def shard_sampler(sampler: Any, rank: int, world: int, *, training: bool) -> Any:
    """This rank's part of a sampler (its ``shard`` method); a sampler without one cannot be split."""
    if sampler is None:
        return None
    if not hasattr(sampler, "shard"):
        raise TypeError(
            f"{type(sampler).__name__} has no shard(rank, world, equal=...) method: distributed training needs "
            "samplers that split their cells between ranks (MinibatchSampler, PairedSampler)."
        )
    return sampler.shard(rank, world, equal=training)


def check_replicas(model: nn.Module) -> None:
    """Raise unless every rank ended with the same weights (DDP keeps the replicas in step)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(_group_device())
    high, low = sums.clone(), -sums
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    if not torch.equal(high, -low):
        raise RuntimeError("The ranks of the distributed fit ended with different weights: report this as a bug.")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process_group(rank: int, world: int, backend: str, init_method: str) -> Iterator[None]:
    """Join (and afterwards leave) a process group of ``world`` ranks."""
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    try:
        yield
        dist.barrier()  # every rank done before any leaves
    finally:
        gc.collect()  # DistributedDataParallel's reducer must go before its group, or gloo aborts at exit
        dist.destroy_process_group()


def _worker(rank: int, world: int, backend: str, init_method: str, out: str) -> None:
    """One rank of :func:`spawn_fit`: train, then rank 0 saves weights and history for the parent."""
    try:
        job = torch.load(Path(out) / "job.pt", weights_only=False)
        run, model, train, val, config = (job[k] for k in ("run", "model", "train", "val", "config"))
        device = resolve_device(config.device)
        if device.type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        elif config.num_threads is None:
            torch.set_num_threads(_cpu_threads(world))
        with process_group(rank, world, backend, init_method):
            history = run(model, train, val, config, device)
            if rank == 0:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                torch.save({"state": state, "history": history}, Path(out) / "result.pt")
    except BaseException as err:  # the parent re-raises it with the rank's traceback
        torch.save({"error": err, "traceback": traceback.format_exc()}, Path(out) / f"error{rank}.pt")
        raise


def spawn_fit(run: Callable[..., Any], model: nn.Module, train: Any, val: Any, config: Any, world: int) -> Any:
    """Train ``model`` on ``world`` processes of this machine; returns rank 0's history, the weights loaded.

    ``config`` is the :class:`~perturbscope.models.TrainConfig`. Every rank calls
    ``run(model, train, val, config, device)`` (a module-level function: it travels to
    the ranks by name) inside the process group.
    """
    import torch.multiprocessing as mp

    device = resolve_device(config.device)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ParameterError(
            "distributed",
            f"asks for {world} processes but only {torch.cuda.device_count()} GPU(s) are visible: one process "
            "per GPU. Ask for fewer processes, or train on the CPU (device='cpu').",
            "training",
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    logger.info(
        "Training data-parallel on %d processes (%s, %s): %s",
        world,
        backend,
        device.type,
        "one GPU each" if device.type == "cuda" else f"{_cpu_threads(world)} thread(s) each",
    )
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    model = model.cpu()
    with tempfile.TemporaryDirectory(prefix="perturbscope-ddp-") as out:
        # the job goes to the ranks as a file: tensors passed as spawn arguments travel as shared-memory
        # file descriptors, which subprocess start-up rejects
        torch.save({"run": run, "model": model, "train": train, "val": val, "config": config}, Path(out) / "job.pt")
        try:
            mp.start_processes(
                _worker, args=(world, backend, init_method, out), nprocs=world, join=True, start_method="spawn"
            )
        except mp.ProcessRaisedException:
            errors = sorted(Path(out).glob("error*.pt"))
            if errors:
                failed = torch.load(errors[0], weights_only=False)
                raise failed["error"] from None
            raise
        except mp.ProcessExitedException as err:
            raise RuntimeError(
                f"A training process died ({err}); on the CPU each of the {world} processes holds a copy of the "
                "model and its batches: ask for fewer processes (distributed) or a smaller batch_size if memory "
                "ran out."
            ) from None
        result = torch.load(Path(out) / "result.pt", weights_only=False)
    model.load_state_dict(result["state"])
    return result["history"]
