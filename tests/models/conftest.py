"""Fixtures for the model tests."""

from __future__ import annotations

from typing import Iterator

import pytest
import scipy.sparse as sp
import torch

from .synthetic import random_counts


@pytest.fixture(scope="session")
def small_counts() -> sp.csr_matrix:
    return random_counts(60, 40, seed=1)


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster and immune to CPU oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
