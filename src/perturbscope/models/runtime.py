"""Where and how a model computes: the device, the precision of its matrix products, CPU threads and seeds.

Nothing here knows about training; :mod:`.training` (the loop), :mod:`.optim` (the step) and
:mod:`.distributed` (the ranks) use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._checks import ParameterError
from .modules import matmul_dtype

__all__ = [
    "PRECISIONS",
    "compute_context",
    "resolve_device",
    "resolve_precision",
    "rng_devices",
    "seeded",
    "torch_threads",
]

PRECISIONS = ("auto", "float32", "bfloat16")
"""Choices of ``TrainConfig.precision``."""


def resolve_device(device: str | torch.device = "auto", check_available: bool = True) -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device.

    Raises :class:`~perturbscope.models.ParameterError` (``device``) for an unknown name, or CUDA asked
    for where there is none.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ParameterError("device", f"{device!r} is not understood; use 'auto', 'cpu' or 'cuda'") from None
        if dev.type not in ("cpu", "cuda"):
            raise ParameterError("device", f"{device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    if check_available and dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", "is 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
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
    """``TrainConfig.precision`` on ``device`` as the dtype of the large matrix products (None = float32).

    ``"auto"`` picks bfloat16 only where it is native and therefore faster (a CUDA GPU with bfloat16,
    a CPU with AVX512-BF16 or AMX); elsewhere a CPU emulates it and would be several times slower.
    """
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise ParameterError("precision", f"{precision!r} is not understood; use one of {list(PRECISIONS)}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_multiplies_bf16() else None


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG a forked RNG block must save (none on the CPU)."""
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run a block with the torch RNG seeded, restoring the global RNG state afterwards.

    Makes model construction (weight initialisation) reproducible::

        with seeded(0):
            model = ContrastiveVAE(n_genes=2000)
    """
    dev = resolve_device(device, check_available=False)
    with torch.random.fork_rng(devices=rng_devices(dev) if torch.cuda.is_available() else []):
        torch.manual_seed(int(seed))
        yield


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


@contextlib.contextmanager
def compute_context(device: torch.device, seed: int, threads: int | None, dtype: torch.dtype | None) -> Iterator[None]:
    """A training run's surroundings: the RNG forked and seeded with ``seed`` (restored afterwards),
    ``threads`` CPU threads and the matrix products in ``dtype`` (None = float32)."""
    with torch.random.fork_rng(devices=rng_devices(device)), torch_threads(threads), matmul_dtype(dtype):
        torch.manual_seed(int(seed))
        yield
