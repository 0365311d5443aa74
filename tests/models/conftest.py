"""Fixtures for the model tests."""

from __future__ import annotations

import pytest
import scipy.sparse as sp

from .synthetic import random_counts


@pytest.fixture(scope="session")
def small_counts() -> sp.csr_matrix:
    return random_counts(60, 40, seed=1)
